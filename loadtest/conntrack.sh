#!/usr/bin/env bash
# The cost of a busy conntrack table: the mixed workload (creates,
# renewals, deletes) with the kernel dataplane while the table holds N
# tracked flows that no mapping owns (a carrier's table is mostly
# port-block SNAT flows). Removing a mapping must find its own flows
# without walking all the others (pcp-dataplane's conntrack.rs).
#
#   loadtest/conntrack.sh [PCPD_BINARY...]   (root; default target/release/pcpd)
#
# For each binary and each table size (FLOWS, default "0 100000"), in a
# network namespace of its own: pcpd with `dataplane.backend: nftables`,
# FLOWS unreplied UDP flows made from inside the namespace (to addresses
# on its loopback, tracked), then 5 s of mixed load at 256 in flight.
# Prints replies/s, latency and pcpd's conntrack counters. A namespace's
# table holds at most the host's nf_conntrack_max (262,144 here).
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, nftables)" >&2; exit 1; }
cargo build --release -q -p pcpd -p pcp-loadtest
LT=target/release/pcp-loadtest
IP=127.0.0.20
OUT=target/loadtest-conntrack
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=(target/release/pcpd)
NS=pcpd-ct-$$
NPID=
cleanup() { [ -n "$NPID" ] && kill "$NPID" 2>/dev/null; ip netns delete "$NS" 2>/dev/null || true; }
trap cleanup EXIT
in_ns() { ip netns exec "$NS" "$@"; }

echo "| pcpd | tracked flows | mixed replies/s | p50 / p99 / p99.9 µs | pcpd CPU µs per reply | conntrack dumps | entries removed (index / dump) |"
echo "|---|---|---|---|---|---|---|"
for flows in ${FLOWS:-0 100000}; do
  for bin in "${BINS[@]}"; do
    rm -rf "$OUT" && mkdir -p "$OUT/state"
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" addr add 10.99.0.1/16 dev lo
    # The generator's own traffic (loopback 127/8) is left untracked, as
    # in report_nft.sh; UDP flows live 10 minutes unanswered.
    in_ns nft -f - <<'NFT'
table ip bed {
  chain out { type filter hook output priority raw; ip daddr 127.0.0.0/8 notrack; }
  chain pre { type filter hook prerouting priority raw; ip daddr 127.0.0.0/8 notrack; }
}
NFT
    in_ns sysctl -qw net.netfilter.nf_conntrack_udp_timeout=600
    { sed "s#target/loadtest-report/state#$OUT/state#g" loadtest/pcpd-load.yaml
      printf 'dataplane:\n  backend: nftables\n  nftables: { table: pcpdct }\n'; } >"$OUT/pcpd.yaml"
    ip netns exec "$NS" "$bin" --config "$OUT/pcpd.yaml" 2>"$OUT/pcpd.log" &
    NPID=$!
    wait_ready ip netns exec "$NS"
    # The flows (conntrack tracks them once pcpd's NAT table is there).
    in_ns python3 - "$flows" <<'PY'
import socket, sys
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.99.0.1", 0))
for i in range(n):
    s.sendto(b"x", ("10.99.%d.%d" % (1 + i // 60000 % 200, 2 + i % 250), 1024 + i % 60000))
PY
    tracked=$(in_ns cat /proc/sys/net/netfilter/nf_conntrack_count)
    in_ns timeout 120 "$LT" run --json --target "$IP:5351" --mix mixed --subscribers 10000 \
      --mappings 4 --first-port 40000 --seconds 5 --concurrency 256 --server-pid "$NPID" >"$OUT/run.json"
    metrics=$(in_ns curl -sf "http://$IP:9351/metrics" | grep '^pcpd_conntrack_' || true)
    python3 - "$bin" "$tracked" "$OUT/run.json" "$metrics" <<'PY'
import json, sys
bin_, tracked, path, metrics = sys.argv[1:5]
r = json.load(open(path))
m = dict(l.rsplit(" ", 1) for l in metrics.splitlines() if l)
get = lambda k: m.get(k, "-")
lat = r["latency_us"]
cpu = r["server_cpu_seconds"] * 1e6 / max(r["replies"], 1)
index = get('pcpd_conntrack_removed_total{via="index"}')
dump = get('pcpd_conntrack_removed_total{via="dump"}')
bad = "" if r["lost"] + r["invalid"] == 0 else f" ({r['lost']} lost, {r['invalid']} invalid)"
print(f"| {bin_} | {int(tracked):,} | {r['replies_per_sec']:,.0f} | {lat['p50']} / {lat['p99']} / {lat['p999']} | {cpu:.1f} | "
      f"{get('pcpd_conntrack_dumps_total')} | {index} / {dump} |{bad}")
PY
    kill "$NPID"; wait "$NPID" 2>/dev/null || true
    NPID=
    ip netns delete "$NS"
  done
done
