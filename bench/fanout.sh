#!/usr/bin/env bash
# Fan-out on one machine: six independent `sleep 3` stages and a final stage copying from
# each, built with dbuild and with BuildKit on the same daemon (no cache either side).
# Prints a Markdown table: wall times, and dbuild's per-instruction overhead (stage wall
# time minus the time its commands ran, per instruction run; median over stages), and the
# floor the daemon's container API sets for the same six commands (six concurrent `docker
# run`, keeping nothing). The result rows use the flags a user types (default --jobs,
# default network, the image loaded into the daemon); the tuned rows (--network none,
# -o type=none, --jobs 6) come after, marked as such.
# Usage: bench/fanout.sh [RUNS]   (LEGACY=1 also times the legacy builder)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
examples/base-images.sh >/dev/null
. bench/images.sh
# DBUILD_BIN=path measures a given binary instead of building one.
if [ -z "${DBUILD_BIN:-}" ]; then cargo build --release -q; fi
dbuild=${DBUILD_BIN:-$PWD/target/release/dbuild}

ctx=$(mktemp -d)
data=$(mktemp -d)
tag=dbuild-bench/fanout:$$
trap 'rm -rf "$ctx" "$data"; docker rmi -f "$tag" >/dev/null 2>&1 || true; drop_new_images' EXIT
{
  for i in 1 2 3 4 5 6; do
    printf 'FROM alpine:latest AS s%s\nRUN sleep 3 && echo %s-$RANDOM > /out\n\n' "$i" "$i"
  done
  printf 'FROM alpine:latest\n'
  for i in 1 2 3 4 5 6; do printf 'COPY --from=s%s /out /o%s\n' "$i" "$i"; done
} >"$ctx/Dockerfile"

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
now() { date +%s.%N; }

bk=(); bk_tuned=(); db=(); db6=(); legacy=(); overhead=(); overhead6=(); floor=()
# Per instruction run: a stage's wall time minus the time its commands ran (median).
per_instruction() {
  python3 - "$1" <<'PY'
import json, sys, statistics
per = []
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["event"] == "stage_finished" and e["executed"]:
        per.append((e["duration_ms"] - e["command_ms"]) / e["executed"])
print(statistics.median(per) if per else 0)
PY
}
for _ in $(seq "$runs"); do
  # The floor of any executor that goes through the daemon's container API: the six
  # commands as six concurrent `docker run` (create, start, wait, remove), nothing kept.
  t0=$(now)
  for i in 1 2 3 4 5 6; do
    docker run --rm --network none alpine:latest sh -c "sleep 3 && echo $i > /out" &
  done
  wait
  floor+=("$(echo "$(now) - $t0" | bc)")

  # As a user types them.
  t0=$(now)
  DOCKER_BUILDKIT=1 /usr/bin/docker build --no-cache -q -t "$tag" "$ctx" >/dev/null
  bk+=("$(echo "$(now) - $t0" | bc)")
  t0=$(now)
  DBUILD_DATA_DIR=$data "$dbuild" submit --no-cache -t "$tag" --progress json "$ctx" >"$data/events.json"
  db+=("$(echo "$(now) - $t0" | bc)")
  overhead+=("$(per_instruction "$data/events.json")")
  # Tuned: no network for RUN, nothing loaded, six stages at once.
  t0=$(now)
  DOCKER_BUILDKIT=1 /usr/bin/docker build --no-cache --network=none -q "$ctx" >/dev/null
  bk_tuned+=("$(echo "$(now) - $t0" | bc)")
  t0=$(now)
  DBUILD_DATA_DIR=$data "$dbuild" submit --no-cache --network none --jobs 6 --progress json --output type=none "$ctx" >"$data/events6.json"
  db6+=("$(echo "$(now) - $t0" | bc)")
  overhead6+=("$(per_instruction "$data/events6.json")")
  if [ "${LEGACY:-0}" = 1 ]; then
    t0=$(now)
    DOCKER_BUILDKIT=0 /usr/bin/docker build --no-cache -q "$ctx" >/dev/null 2>&1
    legacy+=("$(echo "$(now) - $t0" | bc)")
  fi
done

echo "| builder (fan-out: 6 x sleep 3 + final, median of $runs) | wall s |"
echo "| --- | ---: |"
printf '| critical-path bound (one sleep 3) | 3.00 |\n'
printf '| container API floor (6 concurrent docker run, no layer kept) | %.2f |\n' "$(printf '%s\n' "${floor[@]}" | median)"
printf '| BuildKit (DOCKER_BUILDKIT=1 docker build -t) | %.2f |\n' "$(printf '%s\n' "${bk[@]}" | median)"
printf '| dbuild submit -t (embedded) | %.2f |\n' "$(printf '%s\n' "${db[@]}" | median)"
printf '| ratio dbuild / BuildKit | %.2f |\n' "$(echo "$(printf '%s\n' "${db[@]}" | median) / $(printf '%s\n' "${bk[@]}" | median)" | bc -l)"
printf '| tuned: BuildKit --network=none | %.2f |\n' "$(printf '%s\n' "${bk_tuned[@]}" | median)"
printf '| tuned: dbuild --network none -o type=none --jobs 6 | %.2f |\n' "$(printf '%s\n' "${db6[@]}" | median)"
if [ ${#legacy[@]} -gt 0 ]; then
  printf '| legacy builder | %.2f |\n' "$(printf '%s\n' "${legacy[@]}" | median)"
fi
echo
echo "| dbuild per-instruction overhead (median) | ms |"
echo "| --- | ---: |"
printf '| wall time minus command time, per instruction run | %.0f |\n' "$(printf '%s\n' "${overhead[@]}" | median)"
printf '| the same, tuned run | %.0f |\n' "$(printf '%s\n' "${overhead6[@]}" | median)"
