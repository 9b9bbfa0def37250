#!/usr/bin/env bash
# Stage cache: warm rebuilds of a 5-stage Dockerfile. Stages s1..s4 each copy their own
# 1,000-file / 20 MB folder and run a command; the final stage copies a file from each,
# then its own 20 MB folder, and runs a command. Built on the same daemon by BuildKit, by
# dbuild embedded and by dbuild on a farm (one coordinator, one two-slot worker): cold
# (--no-cache), no-op rebuild (median of RUNS) and one-file-edited rebuild (one 20 KB
# file of d3 rewritten before each run; median of RUNS). For the farm, the bytes the
# client uploaded (its "context uploaded" log line). Prints a Markdown table, what dbuild
# rebuilt on each rebuild, and the issue's two goals, met or not. Both builders run with
# the flags a user types (default network, the image loaded into the daemon).
# Usage: bench/cache.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
examples/base-images.sh >/dev/null
. bench/images.sh
# DBUILD_BIN=path measures a given binary instead of building one.
if [ -z "${DBUILD_BIN:-}" ]; then cargo build --release -q -p dbuild; fi
dbuild=${DBUILD_BIN:-$PWD/target/release/dbuild}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
  drop_new_images
}
trap cleanup EXIT
trap 'exit 130' INT TERM

files=1000 size=20480 # 1,000 x 20 KB = 20 MB per folder
ctx=$work/ctx edited=d3/f500
mkdir -p "$ctx"
for i in 1 2 3 4 5; do
  mkdir "$ctx/d$i"
  head -c $((files * size)) /dev/urandom | split -b "$size" -d -a 3 - "$ctx/d$i/f"
done
{
  for i in 1 2 3 4; do
    printf 'FROM alpine:latest AS s%s\nCOPY d%s/ /d%s/\nRUN ls /d%s | wc -l > /count%s\n\n' "$i" "$i" "$i" "$i" "$i"
  done
  printf 'FROM alpine:latest\n'
  for i in 1 2 3 4; do printf 'COPY --from=s%s /count%s /\n' "$i" "$i"; done
  printf 'COPY d5/ /d5/\nRUN cat /count* > /counts && ls /d5 | wc -l >> /counts\n'
} >"$ctx/Dockerfile"

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
maxof() { sort -n | tail -1; }
now() { date +%s.%N; }
edit() { head -c "$size" /dev/urandom >"$ctx/$edited"; }
# timed CMD...: runs CMD, appends its wall time in seconds to $work/t.
timed() { local t0; t0=$(now); "$@"; echo "$(now) - $t0" | bc >>"$work/t"; }
last_time() { tail -1 "$work/t"; }
# What a dbuild build did, from its --progress json events: "5 cached" or "3 cached;
# built s3 (2 run, 1.2 s), #4 (4 run, 3.4 s)" (instructions run, stage wall time).
did() {
  python3 - "$1" <<'PY'
import json, sys
cached, built = 0, []
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["event"] == "stage_cached":
        cached += 1
    elif e["event"] == "stage_finished":
        built.append("%s (%d run, %.1f s)" % (e["name"] or "#%d" % e["stage"], e["executed"], e["duration_ms"] / 1000))
print("%d cached" % cached + ("; built " + ", ".join(built) if built else ""))
PY
}
# The client's "context uploaded ... bytes=N" log line, or "?" if it logged none.
uploaded() {
  sed 's/\x1b\[[0-9;]*m//g' "$1" | awk '/context uploaded/ { for (i = 1; i <= NF; i++) if ($i ~ /^bytes=/) { sub(/^bytes=/, "", $i); b = $i } } END { print (b == "" ? "?" : b) }'
}

# Seconds from the start of a submit (epoch in $1.start) to its "context uploaded" line.
upload_secs() {
  python3 - "$1" <<'PY'
import re, sys
from datetime import datetime
start = float(open(sys.argv[1] + ".start").read())
for line in open(sys.argv[1] + ".err"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if "context uploaded" in line:
        print("%.1f" % (datetime.fromisoformat(line.split()[0][:26] + "Z").timestamp() - start))
        break
else:
    print("?")
PY
}

# ---- BuildKit ----
bk() { DOCKER_BUILDKIT=1 /usr/bin/docker build "$@" -q "$ctx" >/dev/null; }
: >"$work/t"
timed bk --no-cache
bk_cold=$(last_time)
bk # a warm build before the no-op runs
: >"$work/t"
for _ in $(seq "$runs"); do timed bk; done
bk_noop=$(median <"$work/t")
: >"$work/t"
for _ in $(seq "$runs"); do edit; timed bk; done
bk_edit=$(median <"$work/t")

# ---- dbuild: $1 = mode (embedded | farm); extra submit flags after it ----
declare -A t_cold t_noop t_edit up_noop up_edit notes
run_dbuild() {
  local mode=$1 d=$work/$1 r
  shift
  mkdir -p "$d"
  # sub NAME [flags]: one submit; events in $d/NAME.json, stderr in $d/NAME.err.
  sub() {
    local name=$1
    shift
    now >"$d/$name.start"
    DBUILD_DATA_DIR="$d/client" DBUILD_LOG=dbuild=info NO_COLOR=1 \
      "$dbuild" submit "$@" --progress json "$ctx" >"$d/$name.json" 2>"$d/$name.err" ||
      { echo "cache.sh: dbuild $mode $name failed:" >&2; tail -20 "$d/$name.err" >&2; exit 1; }
  }
  : >"$work/t"
  timed sub cold --no-cache "$@"
  t_cold[$mode]=$(last_time)
  notes[$mode]="cold: $(did "$d/cold.json")"
  sub warm "$@" # a warm build before the no-op runs
  notes[$mode]+="<br>first warm build: $(did "$d/warm.json")"
  if [ "$mode" = farm ]; then
    notes[$mode]+="<br>uploaded: cold $(uploaded "$d/cold.err") B (done $(upload_secs "$d/cold") s after start), first warm build $(uploaded "$d/warm.err") B"
  fi
  : >"$work/t"
  for r in $(seq "$runs"); do
    timed sub "noop$r" "$@"
    notes[$mode]+="<br>no-op $r: $(did "$d/noop$r.json")"
    uploaded "$d/noop$r.err" >>"$d/up-noop"
  done
  t_noop[$mode]=$(median <"$work/t")
  : >"$work/t"
  for r in $(seq "$runs"); do
    edit
    timed sub "edit$r" "$@"
    notes[$mode]+="<br>edit $r: $(did "$d/edit$r.json")"
    uploaded "$d/edit$r.err" >>"$d/up-edit"
  done
  t_edit[$mode]=$(median <"$work/t")
  if grep -q '?' "$d/up-noop"; then up_noop[$mode]='?'; else up_noop[$mode]=$(maxof <"$d/up-noop"); fi
  if grep -q '?' "$d/up-edit"; then up_edit[$mode]='?'; else up_edit[$mode]=$(maxof <"$d/up-edit"); fi
}

run_dbuild embedded

f=$work/farm-procs
mkdir -p "$f"
"$dbuild" coordinator --listen 127.0.0.1:0 --data-dir "$f/coord" >"$f/coord.out" 2>"$f/coord.err" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$f/coord.out" && break; sleep 0.1; done
url="http://$(awk '{print $NF}' "$f/coord.out")"
"$dbuild" worker --coordinator "$url" --name w1 --slots 2 --data-dir "$f/w1" 2>"$f/w1.err" &
pids+=($!)
for _ in $(seq 300); do
  "$dbuild" workers --coordinator "$url" 2>/dev/null | grep -q ready && break
  sleep 0.1
done
"$dbuild" workers --coordinator "$url" | grep -q ready || { echo "cache.sh: worker w1 never became ready" >&2; exit 1; }
run_dbuild farm --coordinator "$url"

# ---- report ----
echo "| builder (5 stages x 20 MB / 1,000 files; rebuilds: median of $runs) | cold s | no-op rebuild s | one-file-edit rebuild s | uploaded no-op B (max) | uploaded edit B (max) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
printf '| BuildKit (DOCKER_BUILDKIT=1) | %.2f | %.2f | %.2f | n/a | n/a |\n' "$bk_cold" "$bk_noop" "$bk_edit"
printf '| dbuild embedded | %.2f | %.2f | %.2f | n/a | n/a |\n' "${t_cold[embedded]}" "${t_noop[embedded]}" "${t_edit[embedded]}"
printf '| dbuild farm (1 worker, 2 slots) | %.2f | %.2f | %.2f | %s | %s |\n' "${t_cold[farm]}" "${t_noop[farm]}" "${t_edit[farm]}" "${up_noop[farm]}" "${up_edit[farm]}"
echo
echo "| dbuild | what each build did |"
echo "| --- | --- |"
for m in embedded farm; do echo "| $m | ${notes[$m]} |"; done
echo

le() { [ "$(echo "$1 <= $2" | bc -l)" = 1 ]; }
verdict() { if "$@"; then echo met; else echo "not met"; fi; }
bound=$(echo "0.8 * $bk_noop" | bc -l)
goal1() { # $1 mode; bytes only count for the farm
  le "${t_noop[$1]}" "$bound" && { [ "$1" = embedded ] || [ "${up_noop[$1]}" = 0 ]; }
}
goal2() {
  le "${t_edit[$1]}" "$bk_edit" && { [ "$1" = embedded ] || { [ "${up_edit[$1]}" != '?' ] && le "${up_edit[$1]}" $((2 * size)); }; }
}
echo "Goals (BuildKit: no-op $(printf %.2f "$bk_noop") s, edit $(printf %.2f "$bk_edit") s; the edited file is $size B):"
printf -- '- no-op rebuild ≤ 0.8 × BuildKit'"'"'s (%.2f s) with 0 bytes uploaded: embedded %.2f s: %s; farm %.2f s, %s B: %s\n' \
  "$bound" "${t_noop[embedded]}" "$(verdict goal1 embedded)" "${t_noop[farm]}" "${up_noop[farm]}" "$(verdict goal1 farm)"
printf -- '- one file edited no slower than BuildKit, uploading about that file (≤ 2 × %s B): embedded %.2f s: %s; farm %.2f s, %s B: %s\n' \
  "$size" "${t_edit[embedded]}" "$(verdict goal2 embedded)" "${t_edit[farm]}" "${up_edit[farm]}" "$(verdict goal2 farm)"
