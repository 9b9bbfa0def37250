#!/usr/bin/env bash
# A second Docker daemon on the overlay2 storage driver, for running the benches where
# the machine's own daemon uses another driver (fuse-overlayfs, vfs), whose layer
# registration, container start and diffs cost far more. In its own network namespace
# (no bridge, no iptables), data under /var/tmp/dbuild-bench-d2, with the base images.
#   bench/overlay2-daemon.sh start   prints the DOCKER_HOST to export for the benches
#   bench/overlay2-daemon.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
dir=/var/tmp/dbuild-bench-d2
sock=unix://$dir/sock
case "${1:-}" in
  start)
    mkdir -p "$dir"
    echo '{}' >"$dir/daemon.json"
    unshare --net --fork dockerd --config-file "$dir/daemon.json" --data-root "$dir/root" \
      --exec-root "$dir/exec" --pidfile "$dir/pid" --host "$sock" --bridge=none \
      --iptables=false --storage-driver=overlay2 >"$dir/log" 2>&1 &
    for _ in $(seq 100); do
      DOCKER_HOST=$sock docker version >/dev/null 2>&1 && break
      sleep 0.3
    done
    driver=$(DOCKER_HOST=$sock docker info --format '{{.Driver}}')
    [ "$driver" = overlay2 ] || { echo "the second daemon runs $driver, not overlay2" >&2; exit 1; }
    DOCKER_HOST=$sock examples/base-images.sh >/dev/null
    echo "$sock"
    ;;
  stop)
    [ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true
    for _ in $(seq 60); do [ -e "$dir/pid" ] || break; sleep 0.3; done
    umount -R "$dir/root" 2>/dev/null || true
    umount -R "$dir/exec" 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
