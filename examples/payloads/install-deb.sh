#!/bin/sh
# The installer the install-deb payload runs: installs the .debs named in
# its arguments (files of the bundle) into the terminal's root
# ($TENET_ROOT, / on a real terminal) in one dpkg run, which unpacks and
# configures them in the order of their dependencies.
#
# dpkg is never left half-configured by it: when dpkg cannot configure
# them all, one dpkg run takes out again what this run brought and was not
# installed before (purged; removed only, when its configuration files
# were kept before), and the last line says what dpkg said, what went and
# what stayed. A package that was installed before and is now left
# unconfigured (an upgrade that failed) cannot be put back without its old
# .deb: the last line says so. A package the terminal already has at the
# bundle's version or a newer one is left as it is: never a downgrade,
# unless an --allow-downgrade=NAME before the .debs names it (the standard
# library payload does, for a package whose policy excludes the newer
# version the terminal has).
set -u
root="${TENET_ROOT:-/}"
admindir="$root/var/lib/dpkg"
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
# dpkg's log is the terminal's audit trail; a test root's goes nowhere.
log=""
[ "$root" = / ] || log="--log=/dev/null"
downgradable=" "
while [ "$#" -ge 1 ]; do
  case "$1" in
    --allow-downgrade=*) downgradable="$downgradable${1#--allow-downgrade=} "; shift ;;
    *) break ;;
  esac
done
[ "$#" -ge 1 ] || { echo "no .deb named" >&2; exit 64; }

# The second letter of dpkg's status: i installed, c configuration files
# only, U unpacked, F half-configured, ... (empty: not known).
state() { dpkg-query --admindir="$admindir" -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | cut -c2; }

debs=""
names=""
before=""
kept=""
for deb in "$@"; do
  case "$deb" in
    -*|*/*) echo "$deb: a file of the bundle is named by its plain name" >&2; exit 2 ;;
  esac
  name=$(dpkg-deb -f "./$deb" Package) || { echo "$deb is not a Debian package" >&2; exit 2; }
  version=$(dpkg-deb -f "./$deb" Version)
  was=$(state "$name")
  # Never a downgrade: a package installed at this version or a newer one
  # (the terminal is ahead of the root the bundle was built for) stays.
  case "$downgradable" in *" $name "*) was_ok=1 ;; *) was_ok="" ;; esac
  if [ "$was" = i ] && [ -z "$was_ok" ]; then
    installed=$(dpkg-query --admindir="$admindir" -W -f='${Version}' "$name" 2>/dev/null)
    if dpkg --compare-versions "$installed" ge "$version"; then
      kept="$kept $name $installed;"
      continue
    fi
  fi
  debs="$debs ./$deb"
  names="$names $name"
  before="$before $name=$was"
done
if [ -z "$debs" ]; then
  echo "nothing to install: already at these versions or newer:${kept%;}" >&2
  exit 0
fi
[ -n "$kept" ] && echo "kept, already at these versions or newer:${kept%;}" >&2

err=$(mktemp)
# shellcheck disable=SC2086 # file names of the bundle: no spaces
if dpkg --root="$root" $log --force-confold -i $debs 2>"$err"; then
  cat "$err" >&2
  rm -f "$err"
  exit 0
fi
cat "$err" >&2
said=$(grep -m1 '^dpkg: ' "$err" | cut -c1-300)
rm -f "$err"

purge=""
remove=""
for name in $names; do
  [ "$(state "$name")" = i ] && continue
  was=""
  for b in $before; do [ "${b%%=*}" = "$name" ] && was="${b#*=}"; done
  case "$was" in
    i) ;;                                # installed before: cannot go back
    c) remove="$remove $name" ;;         # keep its configuration files
    *) purge="$purge $name" ;;
  esac
done
# One run each, so dpkg orders the removals by their dependencies.
# shellcheck disable=SC2086
[ -n "$purge" ] && dpkg --root="$root" $log --purge $purge >/dev/null 2>&1
# shellcheck disable=SC2086
[ -n "$remove" ] && dpkg --root="$root" $log --remove $remove >/dev/null 2>&1

gone=""
stayed=""
for name in $names; do
  case "$(state "$name")" in
    i) ;;
    ""|c|n) case " $purge $remove " in *" $name "*) gone="$gone $name" ;; esac ;;
    *) stayed="$stayed $name" ;;
  esac
done
msg="dpkg could not install every package${said:+ ($said)}"
[ -n "$gone" ] && msg="$msg; taken out again, not installed before:$gone"
[ -n "$stayed" ] && msg="$msg; left not fully installed:$stayed"
echo "$msg" >&2
exit 1
