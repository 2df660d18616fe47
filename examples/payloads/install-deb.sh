#!/bin/sh
# The installer the install-deb payload runs: installs the .deb named in $1
# into the terminal's root ($TENET_ROOT, / on a real terminal) with dpkg.
set -eu
deb="$1"
exec dpkg --root="${TENET_ROOT:-/}" --log=/dev/null -i "$deb"
