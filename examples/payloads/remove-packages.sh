#!/bin/sh
# The remover the remove-packages payload runs: purges the named packages
# from the terminal's root ($TENET_ROOT, / on a real terminal). Packages
# that are not installed are skipped by dpkg.
set -eu
exec dpkg --root="${TENET_ROOT:-/}" --log=/dev/null --purge "$@"
