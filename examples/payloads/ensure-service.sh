#!/bin/sh
# The helper the ensure-service payload runs: starts service $1 and enables
# it at boot. On a running system (root /) through systemd; in another root
# (a terminal image, a test root) by recording the state where the agent's
# inventory reads it, since no service manager runs there.
set -eu
svc="$1"
root="${TENET_ROOT:-/}"
if [ "$root" = "/" ]; then
  exec systemctl enable --now "$svc"
fi
mkdir -p "$root/var/lib/tenet/services"
printf 'running enabled\n' > "$root/var/lib/tenet/services/$svc"
