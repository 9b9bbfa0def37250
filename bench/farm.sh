#!/usr/bin/env bash
# Farm fan-out: six independent `sleep 3` stages (each leaving a 1 MiB file) and a final
# stage copying from each, on 1, 2 and 3 one-slot workers (all on the local daemon; the
# coordinator still moves every artifact through its blob store). Prints wall time against
# the critical-path bound (ceil(6/workers) x 3 s + the final stage), and the bytes the
# workers uploaded against the bytes the COPY --from paths hold.
# Usage: bench/farm.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1}
examples/base-images.sh >/dev/null
cargo build --release -q
dbuild=$PWD/target/release/dbuild
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
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

echo "| workers | bound s | wall s (median of $runs) | over bound | uploaded MiB | COPY --from MiB |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: |"
for n in 1 2 3; do
  walls=(); up=0
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
    DBUILD_DATA_DIR="$d/client" "$dbuild" submit --coordinator "$url" --no-cache --progress json --output type=none "$work/ctx" >"$d/events.json"
    t1=$(date +%s.%N)
    walls+=("$(echo "$t1 - $t0" | bc)")
    final_ms=$(python3 -c "
import json,sys
for l in open('$d/events.json'):
    e=json.loads(l)
    if e['event']=='stage_finished' and e['stage']==6: print(e['duration_ms'])")
    up=$(du -sb "$d/coord/blobs" | awk '{print $1}')
    kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=()
  done
  wall=$(printf '%s\n' "${walls[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  bound=$(echo "$(( (6 + n - 1) / n )) * 3 + $final_ms / 1000" | bc -l)
  printf '| %d | %.2f | %.2f | %+.0f%% | %.2f | %.2f |\n' "$n" "$bound" "$wall" \
    "$(echo "($wall - $bound) / $bound * 100" | bc -l)" "$(echo "$up / 1048576" | bc -l)" "$(echo "$copied / 1048576" | bc -l)"
done
