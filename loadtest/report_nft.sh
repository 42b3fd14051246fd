#!/usr/bin/env bash
# The daemon figures with the kernel dataplane: the same workloads and
# generator as report.sh, pcpd with `dataplane.backend: nftables`
# (elements over in-process netlink, conntrack entries of removed mappings
# flushed over ctnetlink), durable state on. pcpd and the generator run in
# a network namespace of their own (its own loopback and nftables), so the
# NAT table never sees the host's traffic. Needs root and nft.
#
# Called by report.sh (writes nft-<workload>-<round>.json into its output
# directory); runs alone too: loadtest/report_nft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
OUT=${OUT:-target/loadtest-report}
LT=target/release/pcp-loadtest
PCPD=target/release/pcpd
IP=127.0.0.20
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
CONC=${CONC:-256}
if [ "$(id -u)" != 0 ] || ! command -v nft >/dev/null || ! command -v ip >/dev/null; then
  echo "the nftables rows need root, nft and ip (apt-get install nftables iproute2)" >&2
  exit 1
fi
[ -x "$PCPD" ] || cargo build --release -q -p pcpd -p pcp-loadtest
settle_disk
mkdir -p "$OUT"
NS=pcpd-report-$$
ip netns add "$NS"
NPID=
cleanup() { [ -n "$NPID" ] && kill "$NPID" 2>/dev/null; ip netns delete "$NS" 2>/dev/null || true; }
trap cleanup EXIT
ip -n "$NS" link set lo up
in_ns() { ip netns exec "$NS" "$@"; }
# The generator's subscribers are local processes on 127/8, which pcpd's
# port-block SNAT would translate on their way out (a router never sees its
# subscribers' packets in OUTPUT; here it would): loopback traffic is left
# untracked, so it passes the NAT table untouched.
in_ns nft -f - <<'NFT'
table ip bed {
  chain out { type filter hook output priority raw; ip daddr 127.0.0.0/8 notrack; }
  chain pre { type filter hook prerouting priority raw; ip daddr 127.0.0.0/8 notrack; }
}
NFT
# The load test's configuration with the kernel dataplane.
# State and NAT log under $OUT (the file names target/loadtest-report).
{ sed "s#target/loadtest-report/state#$OUT/state#g" loadtest/pcpd-load.yaml; printf 'dataplane:\n  backend: nftables\n  nftables: { table: pcpdload }\n'; } >"$OUT/pcpd-load-nft.yaml"
"$PCPD" check-config "$OUT/pcpd-load-nft.yaml" >/dev/null

for round in 1 2 3; do
  rm -rf "$OUT/state" && mkdir -p "$OUT/state"
  # Not through in_ns: $! must be pcpd itself (ip netns exec execs it).
  ip netns exec "$NS" "${SERVER_PIN[@]}" "$PCPD" --config "$OUT/pcpd-load-nft.yaml" 2>>"$OUT/pcpd-nft.log" &
  NPID=$!
  wait_ready ip netns exec "$NS"
  for w in create renew mixed; do
    # Each workload on ports of its own, as in report.sh (mixed creates
    # must not meet the create run's mappings).
    case $w in create) maps=0 port=10000 ;; renew) maps=4 port=20000 ;; *) maps=4 port=40000 ;; esac
    in_ns "${GEN_PIN[@]}" timeout 900 "$LT" run --json --concurrency "$CONC" --seconds "$SECONDS_PER_RUN" \
      --target "$IP:5351" --mix "$w" --subscribers 10000 --mappings "$maps" --first-port "$port" \
      --server-pid "$NPID" >"$OUT/nft-$w-$round.json"
  done
  kill "$NPID"; wait "$NPID" 2>/dev/null || true
  NPID=
done
echo "nftables rows: $OUT/nft-*.json"
