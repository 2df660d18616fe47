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
root="${TENET_ROOT:-/}"
admindir="$root/var/lib/dpkg"
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
log=""
[ "$root" = / ] || log="--log=/dev/null"
[ "$#" -ge 1 ] || { echo "no step given" >&2; exit 64; }

fail() { echo "$*" >&2; exit 1; }
# A path on the terminal's root.
on_root() { if [ "$root" = / ]; then printf '%s' "$1"; else printf '%s%s' "${root%/}" "$1"; fi; }
# Whether package $1 is installed (ii) at a version satisfying the
# comparisons that follow (OP VERSION pairs).
satisfied() {
  name="$1"; shift
  status=$(dpkg-query --admindir="$admindir" -W -f='${db:Status-Abbrev}|${Version}' "$name" 2>/dev/null) || return 1
  case "$status" in "ii "*) ;; *) return 1 ;; esac
  have="${status#*|}"
  while [ "$#" -ge 2 ]; do
    dpkg --compare-versions "$have" "$1" "$2" || return 1
    shift 2
  done
}

# Each function takes one step; its fields become its arguments.
kind() { printf '%s' "${1%% *}"; }

# Every step is checked before anything is done.
for step in "$@"; do
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
  while [ "$#" -ge 2 ]; do
    dpkg --compare-versions "$version" "$1" "$2" || fail "the bundle's $name $version does not satisfy $1 $2"
    shift 2
  done
  wanted="$wanted $deb"
  allow="$allow --allow-downgrade=$name"
}
for step in "$@"; do
  # shellcheck disable=SC2086 # fields are separated by single spaces
  [ "$(kind "$step")" = install ] && { set -f; install_step $step; set +f; }
done
if [ -n "$wanted" ]; then
  others=""
  for f in *.deb; do
    [ -f "$f" ] || continue
    case " $primaries " in *" ${f%%_*} "*) continue ;; esac
    others="$others $f"
  done
  # shellcheck disable=SC2086
  sh ./install-deb.sh $allow $wanted $others || exit 1
fi

file_step() { # file PATH SHA256
  set +f
  dest=$(on_root "$2")
  if [ -f "$dest" ] && [ "$(sha256sum < "$dest" | cut -d' ' -f1)" = "$3" ]; then
    echo "$2: already has its content"
    return
  fi
  src=""
  for f in *; do
    [ -f "$f" ] && [ "$(sha256sum < "$f" | cut -d' ' -f1)" = "$3" ] && { src="$f"; break; }
  done
  [ -n "$src" ] || fail "the bundle carries no file with the SHA-256 $2 must have"
  [ -d "$dest" ] && fail "$2 is a directory"
  mkdir -p "$(dirname "$dest")" || fail "cannot create the directory of $2"
  cp "$src" "$dest.tenet-new" && chmod 0644 "$dest.tenet-new" && mv -f "$dest.tenet-new" "$dest" \
    || { rm -f "$dest.tenet-new"; fail "cannot write $2"; }
  echo "$2: written"
}
file_absent_step() { # file-absent PATH
  dest=$(on_root "$2")
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
