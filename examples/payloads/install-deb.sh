#!/bin/sh
# The installer the install-deb payload runs: installs the .debs named in
# its arguments into the terminal's root ($TENET_ROOT, / on a real
# terminal) in one dpkg run, which unpacks and configures them in the
# order of their dependencies.
#
# dpkg is never left half-configured by it: when dpkg cannot configure
# them all (a dependency neither on the terminal nor in the bundle), the
# packages this run brought that are not fully installed and were not
# installed before are removed again, and the last line says which and
# why. A package that was installed before and is now left unconfigured
# (an upgrade that failed) cannot be put back without its old .deb: the
# last line says so.
set -u
root="${TENET_ROOT:-/}"
admindir="$root/var/lib/dpkg"
export LC_ALL=C
[ "$#" -ge 1 ] || { echo "no .deb named" >&2; exit 64; }

state() { dpkg-query --admindir="$admindir" -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | cut -c1-2; }

names=""
before=""
for deb in "$@"; do
  name=$(dpkg-deb -f "$deb" Package) || { echo "$deb is not a Debian package" >&2; exit 2; }
  names="$names $name"
  before="$before $name=$(state "$name")"
done

if dpkg --root="$root" --log=/dev/null --force-confold -i "$@"; then
  exit 0
fi

removed=""
left=""
for name in $names; do
  now=$(state "$name")
  [ "$now" = "ii" ] && continue
  was=""
  for b in $before; do [ "${b%%=*}" = "$name" ] && was="${b#*=}"; done
  if [ "$was" = "ii" ] || [ "$was" = "hi" ]; then
    left="$left $name"
  else
    dpkg --root="$root" --log=/dev/null --purge "$name" >/dev/null 2>&1 || true
    removed="$removed $name"
  fi
done
msg="dpkg could not configure every package (a dependency is missing from the terminal and the bundle)"
[ -n "$removed" ] && msg="$msg; removed what was not installed before:$removed"
[ -n "$left" ] && msg="$msg; left unconfigured, installed before:$left"
echo "$msg" >&2
exit 1
