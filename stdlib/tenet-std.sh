#!/bin/sh
# The standard library payload's script: carries out the steps Tenet
# computed from a policy's requirements (`remediation: {auto: {}}`), one
# argument per step, on the terminal's root ($TENET_ROOT, / on a real
# terminal). The grammar is protocol/src/stdlib.rs's:
#
#   purge NAME                       purge package NAME
#   install NAME [OP VERSION]...     unless NAME is installed (ii) at a
#                                    version V with `dpkg --compare-versions
#                                    V OP VERSION` for each pair, install the
#                                    bundle's NAME_*.deb (up or down), with
#                                    the bundle's other .debs it lacks
#   file PATH SHA256                 write the bundle's file with that SHA-256
#   file-absent PATH                 remove the file PATH
#   service NAME running|stopped [enabled|disabled]
#
# Each step does nothing when its requirement already holds. Purges run
# first (one dpkg run), then the installs (one run of install-deb.sh, which
# never leaves dpkg half-configured), then files, then services. The first
# step that fails stops the payload; its last line says why.
set -u
umask 022
root="${TENET_ROOT:-/}"
admindir="$root/var/lib/dpkg"
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
log=""
[ "$root" = / ] || log="--log=/dev/null"
[ "$#" -ge 1 ] || { echo "no step given" >&2; exit 64; }

fail() { echo "$*" >&2; exit 1; }
# A path on the terminal's root.
on_root() { if [ "$root" = / ]; then printf '%s' "$1"; else printf '%s%s' "${root%/}" "$1"; fi; }
# Whether version $1 satisfies the comparisons that follow (OP VERSION pairs).
satisfies() {
  v="$1"; shift
  while [ "$#" -ge 2 ]; do
    dpkg --compare-versions "$v" "$1" "$2" || return 1
    shift 2
  done
}
# Whether package $1 is installed (ii) at a version satisfying the
# comparisons that follow; a package installed for several architectures,
# in each of them.
satisfied() {
  name="$1"; shift
  status=$(dpkg-query --admindir="$admindir" -W -f='${db:Status-Abbrev}|${Version}\n' "$name" 2>/dev/null) || return 1
  [ -n "$status" ] || return 1
  [ "$(printf '%s\n' "$status" | cut -d'|' -f1 | sort -u)" = "ii " ] || return 1
  for have in $(printf '%s\n' "$status" | cut -d'|' -f2 | sort -u); do
    satisfies "$have" "$@" || return 1
  done
}

# Refuse to write or remove PATH ($1) when one of its directories that
# exist under the root is a symbolic link, not a directory, or one another
# user could change under us (not ours, or writable by group or others:
# whoever may rename in it can swap what we write for a link elsewhere).
# Missing directories are made by us (umask 022).
safe_dirs() {
  p="${root%/}"
  rest="${1#/}"
  me=$(id -u)
  while :; do
    case "$rest" in */*) ;; *) return 0 ;; esac
    p="$p/${rest%%/*}"
    rest="${rest#*/}"
    [ -L "$p" ] && fail "$1: $p is a symbolic link; not followed"
    [ -e "$p" ] || return 0
    [ -d "$p" ] || fail "$1: $p is not a directory"
    owner=$(stat -c %u "$p") && mode=$(stat -c %a "$p") || fail "$1: cannot read $p"
    [ "$owner" = "$me" ] || fail "$1: $p belongs to another user"
    case "$mode" in *[2367]? | *[2367]) fail "$1: $p is writable by others" ;; esac
  done
}

# Each function takes one step; its fields become its arguments.
kind() { printf '%s' "${1%% *}"; }

# Every step is checked before anything is done: its kind, and only the
# characters the operator's grammar lets through (no quoting, globbing or
# shell characters, single spaces between fields).
for step in "$@"; do
  case "$step" in
    *[!A-Za-z0-9\ ./_+:~@,=-]* | *"  "* | " "* | *" ") fail "not a standard library step: $step" ;;
  esac
  case "$(kind "$step")" in
    purge|install|file|file-absent|service) ;;
    *) fail "not a standard library step: $step" ;;
  esac
done

purges=""
for step in "$@"; do
  [ "$(kind "$step")" = purge ] && purges="$purges ${step#purge }"
done
if [ -n "$purges" ]; then
  # shellcheck disable=SC2086
  out=$(dpkg --root="$root" $log --purge $purges 2>&1) || {
    echo "$out" >&2
    fail "dpkg could not purge$purges ($(echo "$out" | grep -m1 '^dpkg: ' | cut -c1-300))"
  }
  echo "purged (where installed):$purges"
fi

# The installs: each package that does not satisfy its step yet is
# installed from its .deb (downgrades allowed: the policy says which
# versions); the bundle's other .debs go along where the terminal lacks
# them (install-deb.sh keeps what it already has at their version or newer).
primaries=""
wanted=""
allow=""
# Called with globbing off (so the step's fields stay as they are); the
# steps turn it on again to find the bundle's files.
install_step() { # install NAME [OP VERSION]...
  set +f
  name="$2"; shift 2
  primaries="$primaries $name"
  if satisfied "$name" "$@"; then
    echo "$name: already installed at a version the policy allows"
    return
  fi
  deb=""
  for f in "${name}"_*.deb; do
    [ -f "$f" ] || continue
    [ -z "$deb" ] || fail "the bundle carries more than one .deb of $name"
    deb="$f"
  done
  [ -n "$deb" ] || fail "the bundle carries no .deb of $name"
  [ "$(dpkg-deb -f "./$deb" Package)" = "$name" ] || fail "$deb is not a .deb of $name"
  version=$(dpkg-deb -f "./$deb" Version)
  satisfies "$version" "$@" || fail "the bundle's $name $version does not satisfy $*"
  wanted="$wanted $deb"
  allow="$allow --allow-downgrade=$name"
}
for step in "$@"; do
  # shellcheck disable=SC2086 # fields are separated by single spaces
  [ "$(kind "$step")" = install ] && { set -f; install_step $step; set +f; }
done
if [ -n "$wanted" ]; then
  others=""
  # Not what is purged above: a bundle carrying one never brings it back.
  for f in *.deb; do
    [ -f "$f" ] || continue
    case " $primaries $purges " in *" ${f%%_*} "*) continue ;; esac
    others="$others $f"
  done
  # shellcheck disable=SC2086
  sh ./install-deb.sh $allow $wanted $others || exit 1
fi

file_step() { # file PATH SHA256
  set +f
  dest=$(on_root "$2")
  safe_dirs "$2"
  [ -L "$dest" ] && fail "$2 is a symbolic link; not followed"
  [ -d "$dest" ] && fail "$2 is a directory"
  if [ -f "$dest" ] && [ "$(sha256sum < "$dest" | cut -d' ' -f1)" = "$3" ]; then
    echo "$2: already has its content"
    return
  fi
  src=""
  for f in *; do
    [ -f "$f" ] && [ "$(sha256sum < "$f" | cut -d' ' -f1)" = "$3" ] && { src="$f"; break; }
  done
  [ -n "$src" ] || fail "the bundle carries no file with the SHA-256 $2 must have"
  mkdir -p "$(dirname "$dest")" || fail "cannot create the directory of $2"
  # A new file of our own beside it, then renamed over it: never half
  # written; an existing file keeps its mode.
  tmp=$(mktemp "$(dirname "$dest")/.tenet-XXXXXX") || fail "cannot write $2"
  mode=644
  [ -f "$dest" ] && mode=$(stat -c %a "$dest")
  if cat "$src" > "$tmp" && chmod "$mode" "$tmp" && mv -f "$tmp" "$dest"; then
    echo "$2: written"
  else
    rm -f "$tmp"
    fail "cannot write $2"
  fi
}
file_absent_step() { # file-absent PATH
  dest=$(on_root "$2")
  safe_dirs "$2"
  [ -d "$dest" ] && [ ! -L "$dest" ] && fail "$2 is a directory; remove it by hand"
  if [ -e "$dest" ] || [ -L "$dest" ]; then
    rm -f "$dest" || fail "cannot remove $2"
    echo "$2: removed"
  fi
}
for step in "$@"; do
  set -f
  case "$(kind "$step")" in
    file) file_step $step ;;
    file-absent) file_absent_step $step ;;
  esac
  set +f
done

service_step() { # service NAME running|stopped [enabled|disabled]
  name="$2"; state="$3"; boot="${4:-}"
  if [ "$root" = / ]; then
    # A unit that is not there is stopped and not enabled already.
    if [ "$state" = stopped ] && [ "$boot" != enabled ] && ! systemctl cat "$name" >/dev/null 2>&1; then
      echo "service $name: not installed"
      return
    fi
    case "$boot" in
      enabled) systemctl enable "$name" || fail "systemctl could not enable $name" ;;
      disabled) systemctl disable "$name" || fail "systemctl could not disable $name" ;;
    esac
    case "$state" in
      running) systemctl start "$name" || fail "systemctl could not start $name" ;;
      stopped) systemctl stop "$name" || fail "systemctl could not stop $name" ;;
    esac
  else
    # No service manager runs in another root: the state is recorded where
    # the agent's inventory reads it.
    record="$root/var/lib/tenet/services/$name"
    if [ -z "$boot" ]; then
      boot=disabled
      [ -f "$record" ] && grep -qw enabled "$record" && boot=enabled
    fi
    mkdir -p "$root/var/lib/tenet/services" && printf '%s %s\n' "$state" "$boot" > "$record" \
      || fail "cannot record the state of $name"
  fi
  echo "service $name: $state${boot:+, $boot}"
}
for step in "$@"; do
  # shellcheck disable=SC2086
  [ "$(kind "$step")" = service ] && { set -f; service_step $step; set +f; }
done
exit 0
