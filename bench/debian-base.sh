#!/usr/bin/env bash
# Makes `dbuild-bench/debian:bookworm`, a real Debian (mmdebstrap minbase) for the real-
# build bench, with the host's CA bundle at /usr/local/share/ca-bundle.pem (pip behind
# this machine's egress proxy needs it; /etc/ssl/certs is rewritten when a RUN installs
# ca-certificates) and PIP_CERT pointing at it. Idempotent.
set -euo pipefail
image=${DEBIAN_IMAGE:-dbuild-bench/debian:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then exit 0; fi
command -v mmdebstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq mmdebstrap >/dev/null; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mmdebstrap --quiet --variant=minbase \
  --customize-hook='mkdir -p "$1/usr/local/share"' \
  --customize-hook="copy-in /etc/ssl/certs/ca-certificates.crt /usr/local/share/" \
  --customize-hook='mv "$1/usr/local/share/ca-certificates.crt" "$1/usr/local/share/ca-bundle.pem"' \
  bookworm "$work/rootfs.tar"
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/usr/local/share/ca-bundle.pem' \
  --change 'CMD ["bash"]' \
  "$work/rootfs.tar" "$image" >/dev/null
echo "$image"
