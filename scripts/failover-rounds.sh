#!/usr/bin/env bash
# The long version of the failover test (issue 11): kill -9 of the leader
# under continuous acks=all load, then a restart, ROUNDS times (default 50;
# `.ci/run` does 10). Prints each round's failover gap and the summary;
# fails if any acknowledged message is missing, duplicated or moved, or the
# replicas' logs differ below the high watermark. Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-50}
cargo build --release --locked -p shoal-core --bin shoal
export SHOAL_BIN="$PWD/target/release/shoal" SHOAL_DISCOVERY_CACHE=off SHOAL_KILL_ROUNDS="$rounds"
ulimit -l unlimited 2>/dev/null || true
cargo test --release --locked -p shoal-tests --test replication \
  acknowledged_messages_survive_leader_kills -- --nocapture 2>&1 |
  grep -E '^round|failover gap|truncations|test result|panicked|assert'
