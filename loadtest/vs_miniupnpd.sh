#!/usr/bin/env bash
# pcpd against miniupnpd on the same bed: both programming nftables, both
# answering PCP, driven by the same generator (pcp-loadtest) with the same
# arguments, alternately, round after round.
#
# * miniupnpd: Debian's miniupnpd-nftables (installed here if missing),
#   PCP/NAT-PMP only, its rules in a table of its own, secure mode.
# * pcpd: loadtest/pcpd-load.yaml with `dataplane.backend: nftables` and
#   durable state on (the journal, fdatasync per group commit).
#
# Each server runs in a network namespace of its own, made here: loopback
# up, a veth as its external interface (11.0.0.1/24; the namespace never
# routes anywhere), loopback traffic untracked so that the generator's own
# packets pass the NAT tables untouched. Subscribers are the generator's
# source addresses on 127.64.0.0/10 (one subscriber, many mappings: the
# rows below are about mappings, and miniupnpd has one LAN host here).
#
# Rows: (mappings, requests in flight), renewals of the prefilled
# mappings cycled; SECONDS_PER_RUN (default 5) per run, ROUNDS (default 3)
# rounds, medians printed as a markdown table, raw JSON in $OUT.
# Needs root, nft, ip.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
OUT=${OUT:-target/vs-miniupnpd}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-3}
LT=target/release/pcp-loadtest
PCPD=target/release/pcpd
if [ "$(id -u)" != 0 ] || ! command -v nft >/dev/null || ! command -v ip >/dev/null; then
  echo "needs root, nft and ip (apt-get install nftables iproute2)" >&2
  exit 1
fi
if ! command -v miniupnpd >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q miniupnpd-nftables >/dev/null
fi
miniupnpd --version 2>&1 | grep -q nftables || {
  echo "miniupnpd is not the nftables build (apt-get install miniupnpd-nftables)" >&2
  exit 1
}
cargo build --release -q -p pcpd -p pcp-loadtest
rm -rf "$OUT" && mkdir -p "$OUT/state"

MU_NS=vs-miniupnpd-$$
PCPD_NS=vs-pcpd-$$
MU_PID= PCPD_PID=
cleanup() {
  for p in $MU_PID $PCPD_PID; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  ip netns delete "$MU_NS" 2>/dev/null || true
  ip netns delete "$PCPD_NS" 2>/dev/null || true
}
trap cleanup EXIT

bed() { # namespace
  ip netns add "$1"
  ip -n "$1" link set lo up
  ip -n "$1" link add wan0 type veth peer name wan1
  ip -n "$1" addr add 11.0.0.1/24 dev wan0
  ip -n "$1" link set wan0 up
  ip -n "$1" link set wan1 up
  ip netns exec "$1" nft -f - <<'NFT'
table ip bed {
  chain out { type filter hook output priority raw; ip daddr 127.0.0.0/8 notrack; }
  chain pre { type filter hook prerouting priority raw; ip daddr 127.0.0.0/8 notrack; }
}
NFT
}
bed "$MU_NS"
bed "$PCPD_NS"

# miniupnpd: the chains its nftables backend fills (what Debian's
# nft_init.sh makes, in a table of its own), then the daemon.
ip netns exec "$MU_NS" nft -f - <<'NFT'
table inet miniupnpd {
  chain miniupnpd { }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
}
NFT
cat >"$OUT/miniupnpd.conf" <<'CONF'
ext_ifname=wan0
listening_ip=lo
port=0
enable_upnp=no
enable_natpmp=yes
secure_mode=yes
min_lifetime=120
max_lifetime=86400
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
allow 1024-65535 127.0.0.0/8 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
CONF
ip netns exec "$MU_NS" miniupnpd -f "$OUT/miniupnpd.conf" -d -P "$OUT/miniupnpd.pid" 2>"$OUT/miniupnpd.log" &
MU_PID=$!

# pcpd: the load test's configuration, the kernel dataplane, state under $OUT.
{ sed "s#target/loadtest-report/state#$OUT/state#g" loadtest/pcpd-load.yaml
  printf 'dataplane:\n  backend: nftables\n  nftables: { table: pcpdload }\n'; } >"$OUT/pcpd.yaml"
"$PCPD" check-config "$OUT/pcpd.yaml" >/dev/null
ip netns exec "$PCPD_NS" "$PCPD" --config "$OUT/pcpd.yaml" 2>"$OUT/pcpd.log" &
PCPD_PID=$!
wait_ready ip netns exec "$PCPD_NS"
# miniupnpd says nothing when ready: wait for its PCP port.
for _ in $(seq 50); do
  ip netns exec "$MU_NS" ss -uln | grep -q ':5351 ' && break
  sleep 0.1
done

# label, mappings, in flight, first internal port (rows keep apart).
ROWS=(
  "1 mapping renewed, 1 in flight|1|1|10000"
  "1 mapping, 8 in flight|1|8|11000"
  "100 mappings cycled, 8 in flight|100|8|12000"
  "1,000 mappings cycled, 8 in flight|1000|8|14000"
  "1,000 mappings, 64 in flight|1000|64|16000"
)

run() { # server namespace target pid row-index round
  local ns=$1 target=$2 pid=$3 i=$4 round=$5 name
  IFS='|' read -r _ maps conc port <<<"${ROWS[$i]}"
  name=$([ "$ns" = "$MU_NS" ] && echo miniupnpd || echo pcpd)
  ip netns exec "$ns" timeout 300 "$LT" run --json --concurrency "$conc" --seconds "$SECONDS_PER_RUN" \
    --target "$target" --mix renew --subscribers 1 --mappings "$maps" --first-port "$port" \
    --server-pid "$pid" >"$OUT/$name-$i-$round.json"
}

journal_mean_ms() { # pcpd's mean group commit so far (write + fdatasync)
  ip netns exec "$PCPD_NS" curl -s 127.0.0.20:9351/metrics |
    awk '/^pcpd_journal_commit_seconds_sum/ {s=$2} /^pcpd_journal_commit_seconds_count/ {c=$2}
         END { if (c > 0) printf "%.2f", s / c * 1000; else print "-" }'
}

for round in $(seq "$ROUNDS"); do
  for i in "${!ROWS[@]}"; do
    # Alternate which server goes first.
    if [ $((round % 2)) = 1 ]; then
      run "$MU_NS" 127.0.0.1:5351 "$MU_PID" "$i" "$round"
      run "$PCPD_NS" 127.0.0.20:5351 "$PCPD_PID" "$i" "$round"
    else
      run "$PCPD_NS" 127.0.0.20:5351 "$PCPD_PID" "$i" "$round"
      run "$MU_NS" 127.0.0.1:5351 "$MU_PID" "$i" "$round"
    fi
  done
done
JOURNAL_MS=$(journal_mean_ms)

python3 - "$OUT" "$ROUNDS" "$JOURNAL_MS" "${ROWS[@]}" <<'PY'
import json, statistics, sys
out, rounds, journal_ms, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
def rate(name, i, r):
    d = json.load(open(f"{out}/{name}-{i}-{r}.json"))
    bad = d["lost"] + d["invalid"]
    ok = sum(v.get("SUCCESS", 0) for v in d["results"].values())
    return d["replies_per_sec"], bad, ok, d["latency_us"]["p50"]
print(f"| scenario | miniupnpd replies/s | pcpd replies/s | pcpd / miniupnpd (median of paired) | pcpd p50 µs |")
print("|---|---|---|---|---|")
for i, row in enumerate(rows):
    label = row.split("|")[0]
    mu = [rate("miniupnpd", i, r) for r in range(1, rounds + 1)]
    pc = [rate("pcpd", i, r) for r in range(1, rounds + 1)]
    ratio = statistics.median(p[0] / m[0] if m[0] else float("inf") for m, p in zip(mu, pc))
    note = ""
    if any(x[2] == 0 for x in mu + pc):
        note = " (a run had no successful reply)"
    print(f"| {label} | {statistics.median(x[0] for x in mu):,.0f} | {statistics.median(x[0] for x in pc):,.0f} | {ratio:.2f}{note} | {statistics.median(x[3] for x in pc):,.0f} |")
print()
print(f"pcpd's mean journal group commit (write + fdatasync) over the run: {journal_ms} ms")
PY
