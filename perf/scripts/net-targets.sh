#!/usr/bin/env bash
# The broker performance targets of the perf issue, measured in one run:
# loopback (broker on core 0, harness on core 1) and across the simulated
# 1 GbE link against iperf3 on the same link. Needs root (namespaces) and
# installs iperf3 if missing. Prints the figures; asserts nothing.
#   perf/scripts/net-targets.sh [SECONDS]
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
secs=${1:-10}
cd "$here"
cargo build --release -p shoal-core -p shoal-perf
perf=target/release/shoal-perf
shoal=target/release/shoal
command -v iperf3 >/dev/null || { apt-get update -qq && apt-get install -y -qq iperf3; }
py_mib='import json,sys; j=json.load(sys.stdin); print(round(j["mib_per_s"],1))'
py_lat='import json,sys; j=json.load(sys.stdin); l=j["latency_us"]; print("p50 %d us, p99 %d us, p99.9 %d us" % (l["p50"], l["p99"], l["p999"]))'

# Let the disk finish earlier work (writeback, deletes) before a run.
settle() { sync; sleep 3; }
echo "== loopback, broker on core 0, harness on core 1"
settle
echo "e2e 10k/s interval: $($perf e2e --spawn --rate 10000 --size 1024 --duration 20s --json | python3 -c "$py_lat") (target p99 <= 200, p99.9 <= 1000)"
settle
echo "e2e 10k/s always:   $($perf e2e --spawn --rate 10000 --size 1024 --duration 20s --sync always --json | python3 -c "$py_lat") (target p99.9 <= 2000)"
# Same-run baselines for the latency figures:
# - the platform alone: a zero-cost service under the same open-loop
#   schedule, given the stalls measured on both cores (sleeping meter);
# - round trips that touch no data (ping): protocol, network stack, client
#   and the shard's request loop, without the log;
# - the same e2e with the broker's data directory on tmpfs: broker,
#   network stack and harness without the disk;
# - the same e2e without the tail cache: every delivery read from disk.
settle
echo "baseline, platform stalls only (hiccup, zero-cost service at 10k/s): $($perf hiccup --cores 0,1 --duration 20s --sleep-us 100 --resolution-us 50 --json | python3 -c "$py_lat")"
settle
echo "baseline, ping 10k/s (round trips touching no data): $($perf ping --spawn --rate 10000 --duration 20s --json | python3 -c "$py_lat")"
settle
echo "baseline, e2e 10k/s interval on tmpfs (no disk): $(TMPDIR=/dev/shm $perf e2e --spawn --rate 10000 --size 1024 --duration 20s --json | python3 -c "$py_lat")"
nocache=$(mktemp); echo "tail_cache_bytes = 0" > "$nocache"
settle
echo "baseline, e2e 10k/s interval without the tail cache: $($perf e2e --spawn --rate 10000 --size 1024 --duration 20s --broker-config "$nocache" --json | python3 -c "$py_lat")"
rm -f "$nocache"
# The throughput runs last: their gigabytes of writes and deletes keep the
# disk busy for a while, which would show in the latency runs.
settle
echo "produce 1 KiB, acks=leader, sync interval: $($perf produce --spawn --size 1024 --duration ${secs}s --partitions 4 --producers 4 --json | python3 -c "$py_mib") MiB/s (target >= 1024)"
settle
echo "consume 2 GiB fill: $($perf consume --spawn --size 1024 --partitions 4 --consumers 4 --json | python3 -c "$py_mib") MiB/s (target >= 1536)"

echo "== simulated 1 GbE link"
tuning/netns-1gbe.sh down >/dev/null
tuning/netns-1gbe.sh up
trap 'pkill -f "serve --listen 10.213.0.1:9400" || true; tuning/netns-1gbe.sh down >/dev/null' EXIT
ip netns exec shoal-broker iperf3 -s -D -1
sleep 0.5
iperf=$(ip netns exec shoal-client iperf3 -c 10.213.0.1 -t "$secs" -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/8/1048576,1))')
data=$(mktemp -d)
ip netns exec shoal-broker "$shoal" serve --listen 10.213.0.1:9400 --data-dir "$data" --cores 0 2>/dev/null &
sleep 2
nsperf() { ip netns exec shoal-client "$perf" "$@" --broker 10.213.0.1:9400 --core 1 --json; }
p=$(nsperf produce --duration ${secs}s --partitions 2 --producers 2 | python3 -c "$py_mib")
c=$(nsperf consume --partitions 2 --topic fill --fill --fill-bytes 600000000 | python3 -c "$py_mib")
settle
e=$(nsperf e2e --rate 57000 --duration ${secs}s | python3 -c "$py_lat")
echo "iperf3 goodput $iperf MiB/s"
echo "produce $p MiB/s = $(python3 -c "print(round(100*$p/$iperf,1))") % of iperf3 (target >= 95)"
echo "consume $c MiB/s = $(python3 -c "print(round(100*$c/$iperf,1))") % of iperf3 (target >= 95)"
settle
echo "e2e at half line rate (57k msgs/s): $e (target p99.9 <= 2000)"
rm -rf "$data"
