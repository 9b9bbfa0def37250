#!/usr/bin/env bash
# A real three-stage build on a real Debian (bench/debian-base.sh): apt-get + gcc in one
# stage, python3-venv + pip in another, and a final stage that apt-gets python3 before it
# copies from both. Built with the flags a user types (default --jobs, default network,
# the image loaded into the local daemon) by BuildKit and by dbuild, in the same run:
# cold (BuildKit --no-cache; dbuild --no-cache on a fresh data dir), no-op rebuild, and
# one context file edited. Needs the network to Debian's and PyPI's servers.
# Usage: bench/real.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-2}
bench/debian-base.sh >/dev/null
. bench/images.sh
if [ -z "${DBUILD_BIN:-}" ]; then cargo build --release -q -p dbuild; fi
dbuild=${DBUILD_BIN:-$PWD/target/release/dbuild}

ctx=$(mktemp -d)
data=$(mktemp -d)
tag=dbuild-bench/real:$$
trap 'rm -rf "$ctx" "$data"; docker rmi -f "$tag" >/dev/null 2>&1 || true; drop_new_images' EXIT
cat >"$ctx/hello.c" <<'C'
#include <stdio.h>
int main(void) { puts("hello from C"); return 0; }
C
echo 'import six; print("hello from python", six.__version__)' >"$ctx/app.py"
cat >"$ctx/Dockerfile" <<'DF'
FROM dbuild-bench/debian:bookworm AS native
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY hello.c /src/hello.c
RUN gcc -O2 -o /usr/local/bin/hello /src/hello.c

FROM dbuild-bench/debian:bookworm AS py
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /venv && /venv/bin/pip install --no-cache-dir six==1.16.0

FROM dbuild-bench/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*
COPY --from=native /usr/local/bin/hello /usr/local/bin/hello
COPY --from=py /venv /venv
COPY app.py /app/app.py
CMD ["/venv/bin/python", "/app/app.py"]
DF

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
now() { date +%s.%N; }
timed() { local t0; t0=$(now); "$@" >/dev/null 2>"$data/err" || { cat "$data/err" >&2; exit 1; }; echo "$(now) - $t0" | bc; }
bk() { DOCKER_BUILDKIT=1 /usr/bin/docker build -q -t "$tag" "$@" "$ctx"; }
db() { DBUILD_DATA_DIR=$data/d "$dbuild" submit -t "$tag" --progress plain "$@" "$ctx"; }

bk_cold=(); bk_noop=(); bk_edit=(); db_cold=(); db_noop=(); db_edit=()
for r in $(seq "$runs"); do
  bk_cold+=("$(timed bk --no-cache)")
  bk_noop+=("$(timed bk)")
  echo "print('edit $r')" >>"$ctx/app.py"
  bk_edit+=("$(timed bk)")
  rm -rf "$data/d"
  db_cold+=("$(timed db --no-cache)")
  db_noop+=("$(timed db)")
  echo "print('edit $r again')" >>"$ctx/app.py"
  db_edit+=("$(timed db)")
done
# The result runs, and says what both stages made.
docker run --rm "$tag" sh -c '/usr/local/bin/hello && /venv/bin/python /app/app.py' | head -2 >&2

m() { printf '%s\n' "$@" | median; }
printf '| builder (real Debian build, default flags, median of %s) | cold s | no-op s | one file edited s |\n' "$runs"
echo "| --- | ---: | ---: | ---: |"
printf '| BuildKit (DOCKER_BUILDKIT=1) | %.2f | %.2f | %.2f |\n' "$(m "${bk_cold[@]}")" "$(m "${bk_noop[@]}")" "$(m "${bk_edit[@]}")"
printf '| dbuild embedded | %.2f | %.2f | %.2f |\n' "$(m "${db_cold[@]}")" "$(m "${db_noop[@]}")" "$(m "${db_edit[@]}")"
printf '| ratio dbuild / BuildKit | %.2f | %.2f | %.2f |\n' \
  "$(echo "$(m "${db_cold[@]}") / $(m "${bk_cold[@]}")" | bc -l)" \
  "$(echo "$(m "${db_noop[@]}") / $(m "${bk_noop[@]}")" | bc -l)" \
  "$(echo "$(m "${db_edit[@]}") / $(m "${bk_edit[@]}")" | bc -l)"
