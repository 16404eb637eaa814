#!/usr/bin/env bash
# Installs what the test suite needs and runs all of it: formatting, lints,
# unit, property, crash and integration tests. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
# Cluster tests start a private ZooKeeper from Debian's package (its jars;
# not zookeeperd, which would start a system daemon).
[ -f /usr/share/java/zookeeper.jar ] || need_apt+=(zookeeper)
command -v java >/dev/null || need_apt+=(default-jre-headless)
# The partition test puts brokers in network namespaces (`ip netns`).
command -v ip >/dev/null || need_apt+=(iproute2)
# The Python client's TLS tests make their certificates with openssl.
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# promtool (Debian's prometheus package) checks the broker's /metrics
# output in tests/tests/prometheus.rs. Only the tool is wanted: a
# policy-rc.d keeps the package's daemon from starting.
if ! command -v promtool >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } ||
    echo "promtool could not be installed; /metrics is checked by the tests' own parser only"
  if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
if command -v promtool >/dev/null; then export SHOAL_REQUIRE_PROMTOOL=1; fi

# Clients in the tests must not fill ~/.cache/shoal with broker lists.
export SHOAL_DISCOVERY_CACHE=off
# glommio locks its I/O buffers in memory.
ulimit -l unlimited 2>/dev/null || true

# The checked-in flatbuffers code must be what flatc 25.12 generates.
bash wire/generate.sh --check
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Integration tests in tests/ start the real shoal binary.
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The benchmark harness runs end to end so it never rots (no figure is
# asserted here: benchmarks measure, tests check).
bin=${CARGO_TARGET_DIR:-target}/debug
if [ "$status" -eq 0 ]; then
  "$bin"/shoal-perf e2e --spawn --duration 2s --warmup 500ms --rate 2000 --json > /dev/null || status=$?
  "$bin"/shoal-perf ping --spawn --duration 1s --warmup 200ms --rate 2000 --json > /dev/null || status=$?
  "$bin"/shoal-perf hiccup --duration 1s --json > /dev/null || status=$?
  "$bin"/shoal-perf groups --spawn --commits 500 --members 3 --partitions 6 --rebalances 1 --session-timeout 3s --json > /dev/null || status=$?
fi
SHOAL_BIN=${SHOAL_BIN:-$bin/shoal} bash scripts/test-python.sh 2>&1 | tee -a "$log" || status=$?  # the Python client (client/python)
# One closing line over every test binary (the last one cargo prints is
# often an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
