#!/usr/bin/env bash
# The tail consumer's latency while another consumer catches up on the same
# partition (issue 16): shoal-perf e2e at 10k msgs/s of 1 KiB after a
# 2 GiB fill, with no catch-up reader (the baseline), a fetching one and a
# pushing one (a nice-19 shoal-perf consume on the harness's core), in
# interleaved rounds; prints every run, then medians. SHOAL_BIN picks the
# broker binary; BASE_BIN adds a second one to every round (before/after).
#   perf/scripts/catchup-targets.sh [ROUNDS] [READERS]
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${1:-3}
readers=${2:-none fetch push}
# Paths given relative to where the script was started from.
[ -n "${BASE_BIN:-}" ] && BASE_BIN=$(realpath -m "$BASE_BIN")
[ -n "${SHOAL_BIN:-}" ] && SHOAL_BIN=$(realpath -m "$SHOAL_BIN")
cd "$here"
cargo build --release -p shoal-core -p shoal-perf
perf=target/release/shoal-perf
py='import json,sys; j=json.load(sys.stdin); l=j["latency_us"]; c=j["settings"].get("catch_up") or {}; print(l["p50"], l["p99"], l["p999"], round(c.get("mib_per_s", 0)), round(c.get("msgs_per_s", 0)))'
# BASE_BIN: another broker binary (e.g. the commit before a change), run
# beside this tree's in every round, interleaved, for a before/after pair
# from one run.
brokers=(this)
[ -n "${BASE_BIN:-}" ] && brokers=(this before)
bin_of() { case $1 in before) echo "$BASE_BIN" ;; *) echo "${SHOAL_BIN:-target/release/shoal}" ;; esac; }
declare -A p99 p999
for r in $(seq 1 "$rounds"); do
  for reader in $readers; do
    for b in "${brokers[@]}"; do
      k="$reader${BASE_BIN:+ ($b)}"
      sync; sleep 3
      read -r p50 a c mib msgs < <(SHOAL_BIN=$(bin_of "$b") "$perf" e2e --spawn --rate 10000 --size 1024 \
        --duration 8s --catch-up-bytes 2147483648 --catch-up-reader "$reader" --json 2>/dev/null | python3 -c "$py")
      echo "round $r, catch-up $k: tail e2e p50 $p50 us, p99 $a us, p99.9 $c us; catch-up reader $mib MiB/s, $msgs msgs/s"
      p99[$k]+="$a "; p999[$k]+="$c "
    done
  done
done
med() { printf '%s\n' $1 | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for reader in $readers; do
  for b in "${brokers[@]}"; do
    k="$reader${BASE_BIN:+ ($b)}"
    echo "median, catch-up $k: tail p99 $(med "${p99[$k]}") us, p99.9 $(med "${p999[$k]}") us"
  done
done
