#!/usr/bin/env bash
# The read-side targets of issue 16, measured in one run: a consumer
# reading back a 2 GiB fill (1 KiB messages, one partition) cold from the
# disk, by fetch and by push, against fio's cold buffered sequential read
# of the same disk, and the same reads again with the pages warm.
# Rounds are interleaved (these machines are noisy); prints every round,
# then medians and ratios. Needs root (drop_caches) and fio.
#   perf/scripts/read-targets.sh [ROUNDS] [DATA_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${1:-3}
dir=${2:-$(mktemp -d /var/tmp/shoal-read.XXXXXX)}
cd "$here"
# BIN_DIR: measure binaries built elsewhere (another commit, for a
# before/after pair) instead of building this tree.
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -p shoal-core -p shoal-perf
  BIN_DIR=target/release
fi
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio; }
perf=$BIN_DIR/shoal-perf
shoal=$BIN_DIR/shoal
port=$((20000 + RANDOM % 20000))
py_mib='import json,sys; j=json.load(sys.stdin); print("%.1f/%d" % (j["mib_per_s"], j["msgs_per_s"]))'
py_fio='import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["bw"]/1024,1))'
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

mkdir -p "$dir/broker"
taskset -c 0 "$shoal" serve --listen "127.0.0.1:$port" --data-dir "$dir/broker" --cores 0 2>"$dir/broker.log" &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; rm -rf "$dir"' EXIT
sleep 1
run() { "$perf" consume --broker "127.0.0.1:$port" --core 1 --topic catchup --size 1024 --json "$@" 2>/dev/null | python3 -c "$py_mib"; }
# The fill (written with direct I/O: none of it is in the page cache).
run --fill --fill-bytes 2147483648 >/dev/null

fio_cold=(); fetch_cold=(); push_cold=(); fetch_warm=(); push_warm=()
for r in $(seq 1 "$rounds"); do
  fio --name=w --filename="$dir/fio.dat" --rw=write --bs=1M --direct=1 --size=2G --output-format=terse >/dev/null
  cold; fio_cold+=("$(fio --name=r --filename="$dir/fio.dat" --rw=read --bs=1M --direct=0 --size=2G --output-format=json | python3 -c "$py_fio")")
  rm -f "$dir/fio.dat"
  cold; fetch_cold+=("$(run)")
  fetch_warm+=("$(run)")
  cold; push_cold+=("$(run --push)")
  push_warm+=("$(run --push)")
  echo "round $r: fio cold buffered ${fio_cold[-1]} MiB/s; shoal (MiB/s/msgs/s) fetch cold ${fetch_cold[-1]}, warm ${fetch_warm[-1]}; push cold ${push_cold[-1]}, warm ${push_warm[-1]}"
done
mib() { for v in "$@"; do echo "${v%%/*}"; done; }
msgs() { for v in "$@"; do echo "${v##*/}"; done; }
f=$(med "${fio_cold[@]}"); fc=$(med $(mib "${fetch_cold[@]}")); pc=$(med $(mib "${push_cold[@]}"))
echo "median: fio cold buffered read $f MiB/s"
echo "median: shoal fetch cold $fc MiB/s ($(med $(msgs "${fetch_cold[@]}")) msgs/s) = $(python3 -c "print(round($fc/$f,2))")x fio (target >= 0.9); warm $(med $(mib "${fetch_warm[@]}")) MiB/s"
echo "median: shoal push cold $pc MiB/s ($(med $(msgs "${push_cold[@]}")) msgs/s) = $(python3 -c "print(round($pc/$f,2))")x fio (target >= 0.9); warm $(med $(mib "${push_warm[@]}")) MiB/s"
