#!/usr/bin/env bash
# Makes the base images the examples and tests name, on a machine with no registry:
# a busybox rootfs imported into Docker and tagged alpine:latest, busybox:latest,
# golang:1.7.3 (with a stand-in `go` that "builds" a shell program) and nginx:latest.
# Idempotent: images that exist are left alone. Needs busybox-static (apt-get install -y
# busybox-static) and a running Docker daemon.
set -euo pipefail

BUSYBOX=${BUSYBOX:-$(command -v busybox || true)}
if [ -z "$BUSYBOX" ]; then
  echo "base-images.sh: busybox not found: apt-get install -y busybox-static" >&2
  exit 1
fi

have() { docker image inspect "$1" >/dev/null 2>&1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

rootfs() { # $1: directory to fill with a busybox userland
  mkdir -p "$1/bin" "$1/etc" "$1/tmp" "$1/root" "$1/home/app"
  chmod 1777 "$1/tmp"
  cp "$BUSYBOX" "$1/bin/busybox"
  for applet in $("$1/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$1/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$1/etc/passwd"
  printf 'root:x:0:\napp:x:1000:\nnogroup:x:65534:\n' >"$1/etc/group"
  chown 1000:1000 "$1/home/app"
}

PATH_ENV='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

if ! have dbuild-base/busybox:latest; then
  rootfs "$root/busybox"
  tar -C "$root/busybox" -cf "$root/busybox.tar" .
  docker import --change "$PATH_ENV" --change 'CMD ["/bin/sh"]' \
    "$root/busybox.tar" dbuild-base/busybox:latest >/dev/null
fi
for name in alpine:latest busybox:latest; do
  have "$name" || docker tag dbuild-base/busybox:latest "$name"
done

if ! have golang:1.7.3; then
  rootfs "$root/golang"
  mkdir -p "$root/golang/usr/local/go/bin" "$root/golang/go/src"
  # A stand-in compiler: `go build ... -o OUT .` writes a program that prints what the
  # real href-counter prints for a page with no links. `go get` succeeds offline.
  cat >"$root/golang/usr/local/go/bin/go" <<'GO'
#!/bin/sh
out=app
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out=$2; shift ;;
  esac
  shift
done
printf '#!/bin/sh\necho "{\\"external\\":0,\\"internal\\":0}"\n' >"$out"
chmod 755 "$out"
GO
  chmod 755 "$root/golang/usr/local/go/bin/go"
  tar -C "$root/golang" -cf "$root/golang.tar" .
  docker import \
    --change 'ENV PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV GOPATH=/go' --change 'WORKDIR /go' \
    "$root/golang.tar" golang:1.7.3 >/dev/null
fi

if ! have nginx:latest; then
  rootfs "$root/nginx"
  mkdir -p "$root/nginx/etc/nginx"
  printf 'events {}\nhttp { server { listen 80; } }\n' >"$root/nginx/etc/nginx/nginx.conf"
  tar -C "$root/nginx" -cf "$root/nginx.tar" .
  docker import --change "$PATH_ENV" "$root/nginx.tar" nginx:latest >/dev/null
fi
echo "base images ready: alpine:latest busybox:latest golang:1.7.3 nginx:latest"
