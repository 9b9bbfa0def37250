#!/usr/bin/env bash
# Makes the base images the examples and tests name, on a machine with no registry:
# a busybox rootfs imported into Docker and tagged alpine:latest, busybox:latest,
# golang:1.7.3 (with a stand-in `go` that "builds" a shell program), nginx:latest and the
# tests' own. The tests make them the same way (testkit/src/images.rs), so both agree on
# every image. Idempotent: an image already made from the same spec is left alone.
# Needs busybox-static (apt-get install -y busybox-static) and a running Docker daemon
# (DOCKER_HOST is honoured).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /bin/busybox ]; then
  echo "base-images.sh: /bin/busybox not found: apt-get install -y busybox-static" >&2
  exit 1
fi
exec cargo run -q -p dbuild-testkit --bin dbuild-base-images
