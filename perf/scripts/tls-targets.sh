#!/usr/bin/env bash
# Issue 14's benchmark: what authentication and TLS cost, same run.
# Three broker settings, interleaved round by round (these machines are
# noisy), broker on core 0 and harness on core 1:
#   plain     no auth, no TLS (sendfile: zero-copy reads)
#   auth      SCRAM-SHA-256 + ACLs (the harness as a superuser)
#   tls+auth  the same over TLS 1.3 (rustls, ring); log bytes are copied
#             through user space to be encrypted (no kTLS on this kernel)
# For each: produce throughput (1 KiB, acks=leader, 10 s, fresh broker),
# consume throughput (a warm catch-up read of a 2 GiB fill by fetch, then
# by push: sendfile against the copy path), and e2e latency at a fixed
# rate (10k msgs/s of 1 KiB, open loop, fresh broker). Prints every round,
# then medians and ratios to plain. Asserts nothing.
#   perf/scripts/tls-targets.sh [ROUNDS] [SECONDS]
# BIN_DIR: measure binaries built elsewhere instead of building this tree.
# FILL_BYTES: the read fill (default 2 GiB; smaller for a quick try).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${1:-3}
secs=${2:-10}
cd "$here"
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -p shoal-core -p shoal-perf
  BIN_DIR=${CARGO_TARGET_DIR:-target}/release
fi
perf=$BIN_DIR/shoal-perf
shoal=$BIN_DIR/shoal
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }
work=$(mktemp -d /var/tmp/shoal-tls.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# A CA and a broker certificate for 127.0.0.1 (P-256, like most
# deployments' ECDSA certificates).
(
  cd "$work"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=shoal bench CA" -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=broker" -keyout broker.key -out broker.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' > ext.cnf
  openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile ext.cnf -out broker.pem 2>/dev/null
)
: > "$work/plain.toml"
printf 'auth = true\nsuperuser = "admin"\n' > "$work/auth.toml"
printf 'auth = true\nsuperuser = "admin"\ntls_cert = "%s"\ntls_key = "%s"\n' \
  "$work/broker.pem" "$work/broker.key" > "$work/tls.toml"
export SHOAL_ADMIN_PASSWORD=bench-secret SHOAL_BIN=$shoal

modes=(plain auth tls)
# Client settings per mode: credentials from the environment, the CA flag.
client() {
  case $1 in
    plain) env -u SHOAL_USER -u SHOAL_PASSWORD "${@:2}" ;;
    auth) SHOAL_USER=admin SHOAL_PASSWORD=bench-secret "${@:2}" ;;
    tls) SHOAL_USER=admin SHOAL_PASSWORD=bench-secret "${@:2}" --tls-ca "$work/ca.pem" ;;
  esac
}
py_mib='import json,sys; j=json.load(sys.stdin); print("%.1f" % j["mib_per_s"])'
py_lat='import json,sys; l=json.load(sys.stdin)["latency_us"]; print("%d/%d/%d" % (l["p50"], l["p99"], l["p999"]))'
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
settle() { sync; sleep 2; }

# One long-lived broker per mode for the reads, each filled once (2 GiB of
# 1 KiB messages) and read once untimed so the reads measured are warm:
# the CPU cost of sendfile against copy and encryption, not the disk.
declare -A port
for m in "${modes[@]}"; do
  port[$m]=$((20000 + RANDOM % 20000))
  mkdir -p "$work/data-$m"
  taskset -c 0 "$shoal" serve --listen "127.0.0.1:${port[$m]}" --cores 0 \
    --data-dir "$work/data-$m" --config "$work/$m.toml" 2>"$work/broker-$m.log" &
  pids+=($!)
done
sleep 2
read_fill() { # MODE [consume flags...]
  client "$1" "$perf" consume --broker "127.0.0.1:${port[$1]}" --core 1 --topic fill \
    --size 1024 --json "${@:2}" 2>/dev/null | python3 -c "$py_mib"
}
for m in "${modes[@]}"; do
  read_fill "$m" --fill --fill-bytes "${FILL_BYTES:-2147483648}" >/dev/null
  read_fill "$m" >/dev/null
done

declare -A produce fetch push e2e
for r in $(seq 1 "$rounds"); do
  line="round $r:"
  for m in "${modes[@]}"; do
    settle
    p=$(client "$m" "$perf" produce --spawn --broker-config "$work/$m.toml" --size 1024 \
      --duration "${secs}s" --json 2>/dev/null | python3 -c "$py_mib")
    f=$(read_fill "$m")
    u=$(read_fill "$m" --push)
    settle
    e=$(client "$m" "$perf" e2e --spawn --broker-config "$work/$m.toml" --rate 10000 --size 1024 \
      --duration "${secs}s" --json 2>/dev/null | python3 -c "$py_lat")
    produce[$m]+="$p "; fetch[$m]+="$f "; push[$m]+="$u "; e2e[$m]+="$e "
    line+=" $m: produce $p MiB/s, fetch $f MiB/s, push $u MiB/s, e2e p50/p99/p99.9 $e us;"
  done
  echo "$line"
done

pick() { for v in $1; do echo "$v" | cut -d/ -f"$2"; done; }
ratio() { python3 -c "print('%.2f' % ($1 / $2) if $2 else 'n/a')"; }
echo "medians of $rounds rounds (ratio to plain):"
for m in "${modes[@]}"; do
  # shellcheck disable=SC2086
  pm=$(med ${produce[$m]}); fm=$(med ${fetch[$m]}); um=$(med ${push[$m]})
  e50=$(med $(pick "${e2e[$m]}" 1)); e99=$(med $(pick "${e2e[$m]}" 2)); e999=$(med $(pick "${e2e[$m]}" 3))
  if [ "$m" = plain ]; then bp=$pm; bf=$fm; bu=$um; b99=$e99; b999=$e999; fi
  printf '  %-9s produce %8s MiB/s (%sx)  fetch %8s MiB/s (%sx)  push %8s MiB/s (%sx)  e2e p50 %s us, p99 %s us (%sx), p99.9 %s us (%sx)\n' \
    "$m" "$pm" "$(ratio "$pm" "$bp")" "$fm" "$(ratio "$fm" "$bf")" "$um" "$(ratio "$um" "$bu")" \
    "$e50" "$e99" "$(ratio "$e99" "$b99")" "$e999" "$(ratio "$e999" "$b999")"
done
