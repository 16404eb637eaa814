#!/usr/bin/env bash
# A simulated 1 Gbit/s link on this machine: two network namespaces joined
# by a veth pair, each end shaped with tc (tbf). The broker runs in one
# namespace, the clients in the other; traffic never leaves the machine.
#
#   tuning/netns-1gbe.sh up [RATE]    create (RATE default 1gbit)
#   tuning/netns-1gbe.sh status       show namespaces, addresses, qdiscs
#   tuning/netns-1gbe.sh down         remove everything
#
# Broker side: namespace shoal-broker, address 10.213.0.1
# Client side: namespace shoal-client, address 10.213.0.2
# Needs root and iproute2 (ip, tc).
set -euo pipefail

NS_B=shoal-broker
NS_C=shoal-client
DEV_B=shoal-vb
DEV_C=shoal-vc
IP_B=10.213.0.1
IP_C=10.213.0.2

cmd=${1:-status}
rate=${2:-1gbit}

up() {
  if ip netns list | grep -qw "$NS_B"; then
    echo "already up (tuning/netns-1gbe.sh down first to change it)"; return
  fi
  ip netns add "$NS_B"
  ip netns add "$NS_C"
  ip link add "$DEV_B" type veth peer name "$DEV_C"
  ip link set "$DEV_B" netns "$NS_B"
  ip link set "$DEV_C" netns "$NS_C"
  ip -n "$NS_B" addr add "$IP_B/24" dev "$DEV_B"
  ip -n "$NS_C" addr add "$IP_C/24" dev "$DEV_C"
  for ns in "$NS_B" "$NS_C"; do ip -n "$ns" link set lo up; done
  ip -n "$NS_B" link set "$DEV_B" up
  ip -n "$NS_C" link set "$DEV_C" up
  # Token bucket at the line rate on both directions; the burst covers a
  # GSO super-packet so nothing is dropped for size, the queue holds ~2 ms.
  tc -n "$NS_B" qdisc add dev "$DEV_B" root tbf rate "$rate" burst 256kb latency 2ms
  tc -n "$NS_C" qdisc add dev "$DEV_C" root tbf rate "$rate" burst 256kb latency 2ms
  echo "up: broker $NS_B $IP_B <-> client $NS_C $IP_C at $rate"
}

down() {
  ip netns del "$NS_B" 2>/dev/null || true
  ip netns del "$NS_C" 2>/dev/null || true
  echo "down"
}

status() {
  if ! ip netns list | grep -qw "$NS_B"; then echo "down"; return; fi
  for ns in "$NS_B" "$NS_C"; do
    echo "== $ns"
    ip -n "$ns" -br addr
    tc -n "$ns" -s qdisc show | sed 's/^/  /'
  done
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up [RATE] | status | down" >&2; exit 2 ;;
esac
