#!/usr/bin/env bash
# Farm fan-out: six independent `sleep 3` stages (each leaving a 1 MiB file) and a final
# stage copying from each, on 1, 2 and 3 one-slot workers (all on the local daemon; the
# coordinator still moves every artifact through its blob store). Prints wall time against
# two bounds: the ideal one (ceil(6/workers) x 3 s of sleep, nothing else), and the
# scheduling bound from the stages' own measured durations d_i (max(sum d_i / workers,
# max d_i) + d_final: what a perfect scheduler could do with this executor), the floor the
# daemon's container API sets (the six commands as `docker run`s, n at a time), and the bytes
# the workers uploaded against the bytes the COPY --from paths hold.
# Usage: bench/farm.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1}
examples/base-images.sh >/dev/null
. bench/images.sh
# DBUILD_BIN=path measures a given binary instead of building one.
if [ -z "${DBUILD_BIN:-}" ]; then cargo build --release -q; fi
dbuild=${DBUILD_BIN:-$PWD/target/release/dbuild}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; drop_new_images; }
trap cleanup EXIT

mkdir -p "$work/ctx"
{
  for i in 1 2 3 4 5 6; do
    printf 'FROM alpine:latest AS s%s\nRUN sleep 3 && head -c 1048576 /dev/urandom > /out%s\n\n' "$i" "$i"
  done
  printf 'FROM alpine:latest\n'
  for i in 1 2 3 4 5 6; do printf 'COPY --from=s%s /out%s /o%s\n' "$i" "$i" "$i"; done
} >"$work/ctx/Dockerfile"
copied=$((6 * 1048576))

echo "| workers | ideal bound s | container API floor s | scheduling bound s | wall s (median of $runs) | over sched. bound | uploaded MiB | COPY --from MiB |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for n in 1 2 3; do
  # What the daemon's container API alone costs for the six commands on n one-slot
  # workers sharing this daemon: ceil(6/n) rounds of n concurrent `docker run`.
  t0=$(date +%s.%N)
  left=6
  while [ "$left" -gt 0 ]; do
    for _ in $(seq "$(( left < n ? left : n ))"); do
      docker run --rm --network none alpine:latest sh -c 'sleep 3 && head -c 1048576 /dev/urandom > /out' &
    done
    wait
    left=$(( left - n ))
  done
  floor=$(echo "$(date +%s.%N) - $t0" | bc)
  walls=(); scheds=(); up=0
  for r in $(seq "$runs"); do
    d="$work/run-$n-$r"; mkdir -p "$d"
    "$dbuild" coordinator --listen 127.0.0.1:0 --data-dir "$d/coord" >"$d/coord.out" 2>"$d/coord.err" &
    pids+=($!)
    for _ in $(seq 50); do grep -q listening "$d/coord.out" && break; sleep 0.1; done
    url="http://$(awk '{print $NF}' "$d/coord.out")"
    for w in $(seq "$n"); do
      "$dbuild" worker --coordinator "$url" --name "w$w" --slots 1 --data-dir "$d/w$w" 2>"$d/w$w.err" &
      pids+=($!)
    done
    until [ "$("$dbuild" workers --coordinator "$url" | grep -c ready)" -ge "$n" ]; do sleep 0.1; done
    # The final stage alone (its COPYs and the image export) is part of the bound: time it
    # with all inputs cached on the same farm.
    t0=$(date +%s.%N)
    DBUILD_DATA_DIR="$d/client" "$dbuild" submit --coordinator "$url" --no-cache --network none --progress json --output type=none "$work/ctx" >"$d/events.json"
    t1=$(date +%s.%N)
    walls+=("$(echo "$t1 - $t0" | bc)")
    sched=$(python3 - "$d/events.json" "$n" <<'PY'
import json, sys
d = {}
for l in open(sys.argv[1]):
    e = json.loads(l)
    if e["event"] == "stage_finished":
        d[e["stage"]] = e["duration_ms"] / 1000
n = int(sys.argv[2])
fan = [v for k, v in d.items() if k != 6]
print(max(sum(fan) / n, max(fan)) + d[6])
PY
)
    scheds+=("$sched")
    up=$(du -sb "$d/coord/blobs" | awk '{print $1}')
    kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=()
  done
  med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  wall=$(printf '%s\n' "${walls[@]}" | med)
  sched=$(printf '%s\n' "${scheds[@]}" | med)
  ideal=$(( (6 + n - 1) / n * 3 ))
  printf '| %d | %d | %.2f | %.2f | %.2f | %+.0f%% | %.2f | %.2f |\n' "$n" "$ideal" "$floor" "$sched" "$wall" \
    "$(echo "($wall - $sched) / $sched * 100" | bc -l)" "$(echo "$up / 1048576" | bc -l)" "$(echo "$copied / 1048576" | bc -l)"
done
