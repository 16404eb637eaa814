#!/usr/bin/env bash
# Runs the storage benchmark targets of the storage issue against same-run
# fio baselines on the same disk, interleaved, and prints medians and ratios.
#   perf/scripts/storage-targets.sh [DIR] [ROUNDS]
# Needs fio (apt-get install fio) and a release build of shoal-perf.
set -euo pipefail
dir=${1:-/tmp/shoal-bench}
rounds=${2:-3}
here=$(cd "$(dirname "$0")/../.." && pwd)
perf="$here/target/release/shoal-perf"
[ -x "$perf" ] || cargo build --release -p shoal-perf --manifest-path "$here/Cargo.toml"
command -v fio >/dev/null || { echo "fio is needed: apt-get install -y fio" >&2; exit 1; }
mkdir -p "$dir"
core=$(( $(nproc) > 1 ? 1 : 0 ))
jq_bw='import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["bw"]/1024)'
jq_mib='import json,sys; print(json.load(sys.stdin)["mib_per_s"])'
median() { python3 -c 'import sys,statistics; print(round(statistics.median(float(x) for x in sys.argv[1:]),1))' "$@"; }

raw=(); none=(); none16=(); fsync1=(); always=()
for r in $(seq "$rounds"); do
  raw+=("$(fio --name=raw --filename="$dir/fio.dat" --rw=write --bs=1M --direct=1 --ioengine=io_uring --iodepth=8 --size=2G --output-format=json | python3 -c "$jq_bw")")
  rm -f "$dir/fio.dat"
  none+=("$("$perf" storage --dir "$dir/log" --sync none --bytes $((2<<30)) --batch-bytes 65536 --record-bytes 1024 --appenders 8 --core $core --json | python3 -c "$jq_mib")")
  none16+=("$("$perf" storage --dir "$dir/log" --sync none --bytes $((2<<30)) --batch-bytes 65536 --record-bytes 1024 --appenders 16 --core $core --json | python3 -c "$jq_mib")")
  fsync1+=("$(fio --name=fsync --filename="$dir/fio.dat" --rw=write --bs=64k --direct=1 --iodepth=1 --fdatasync=1 --size=512M --output-format=json | python3 -c "$jq_bw")")
  rm -f "$dir/fio.dat"
  always+=("$("$perf" storage --dir "$dir/log" --sync always --bytes $((512<<20)) --batch-bytes 65536 --record-bytes 1024 --appenders 8 --core $core --json | python3 -c "$jq_mib")")
  echo "round $r: fio-raw ${raw[-1]} MiB/s, none x8 ${none[-1]} MiB/s, none x16 ${none16[-1]} MiB/s, fio-fdatasync ${fsync1[-1]} MiB/s, always ${always[-1]} MiB/s"
done
mr=$(median "${raw[@]}"); mn=$(median "${none[@]}"); mn16=$(median "${none16[@]}"); mf=$(median "${fsync1[@]}"); ma=$(median "${always[@]}")
echo "median: fio raw $mr MiB/s, shoal none x8 $mn MiB/s, ratio $(python3 -c "print(round($mn/$mr,2))") (target >= 0.8)"
echo "median: fio raw $mr MiB/s, shoal none x16 $mn16 MiB/s, ratio $(python3 -c "print(round($mn16/$mr,2))") (target >= 0.8)"
echo "median: fio fdatasync-per-write $mf MiB/s, shoal always x8 $ma MiB/s, ratio $(python3 -c "print(round($ma/$mf,2))") (target >= 2)"
echo "reopen of a 4 GiB partition:"
"$perf" storage --dir "$dir/log" --sync none --bytes $((4<<30)) --batch-bytes 65536 --record-bytes 1024 --appenders 8 --core $core --reopen
rm -rf "$dir"
