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
# mappings cycled, after a prefill with the row's requests in flight;
# replies may take up to 60 s (miniupnpd answers a request at a time); SECONDS_PER_RUN (default 5) per run, ROUNDS (default 3)
# rounds, medians printed as a markdown table, raw JSON in $OUT. A run
# (prefill included) is stopped after RUN_LIMIT seconds (default 60) and
# shown as such.
# Needs root, nft, ip.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
OUT=${OUT:-target/vs-miniupnpd}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-3}
RUN_LIMIT=${RUN_LIMIT:-60}
LT=target/release/pcp-loadtest
PCPD=target/release/pcpd
IP=127.0.0.20
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
settle_disk
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
# pcpd: the load test's configuration, the kernel dataplane, state under $OUT.
{ sed "s#target/loadtest-report/state#$OUT/state#g" loadtest/pcpd-load.yaml
  printf 'dataplane:\n  backend: nftables\n  nftables: { table: pcpdload }\n'; } >"$OUT/pcpd.yaml"
"$PCPD" check-config "$OUT/pcpd.yaml" >/dev/null

# Every run starts each server afresh, empty: a run one server could not
# finish (its socket full of a prefill's requests) must not slow the
# next one, of either server.
start_miniupnpd() {
  for c in miniupnpd prerouting_miniupnpd postrouting_miniupnpd; do
    ip netns exec "$MU_NS" nft flush chain inet miniupnpd "$c"
  done
  ip netns exec "$MU_NS" miniupnpd -f "$OUT/miniupnpd.conf" -d -P "$OUT/miniupnpd.pid" 2>>"$OUT/miniupnpd.log" &
  MU_PID=$!
  # miniupnpd says nothing when ready: wait for its PCP port.
  for _ in $(seq 100); do
    ip netns exec "$MU_NS" ss -uln | grep -q ':5351 ' && return 0
    sleep 0.05
  done
  echo "miniupnpd did not open port 5351 (see $OUT/miniupnpd.log)" >&2
  return 1
}
start_pcpd() {
  rm -rf "$OUT/state" && mkdir -p "$OUT/state"
  ip netns exec "$PCPD_NS" "$PCPD" --config "$OUT/pcpd.yaml" 2>>"$OUT/pcpd.log" &
  PCPD_PID=$!
  wait_ready ip netns exec "$PCPD_NS"
}
stop() { # pid
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# label, mappings, in flight, first internal port (rows keep apart).
ROWS=(
  "1 mapping renewed, 1 in flight|1|1|10000"
  "1 mapping, 8 in flight|1|8|11000"
  "100 mappings cycled, 8 in flight|100|8|12000"
  "1,000 mappings cycled, 8 in flight|1000|8|14000"
  "1,000 mappings, 64 in flight|1000|64|16000"
)

run() { # server (miniupnpd or pcpd), row index, round
  local name=$1 i=$2 round=$3 ns target pid
  IFS='|' read -r _ maps conc port <<<"${ROWS[$i]}"
  if [ "$name" = miniupnpd ]; then
    start_miniupnpd; ns=$MU_NS target=127.0.0.1:5351 pid=$MU_PID
  else
    start_pcpd; ns=$PCPD_NS target=127.0.0.20:5351 pid=$PCPD_PID
  fi
  # A run that cannot finish (a prefill the server cannot keep up with)
  # is stopped and reported as such.
  ip netns exec "$ns" timeout "$RUN_LIMIT" "$LT" run --json --concurrency "$conc" --seconds "$SECONDS_PER_RUN" \
    --target "$target" --mix renew --subscribers 1 --mappings "$maps" --first-port "$port" \
    --timeout-ms 60000 --prefill-concurrency "$conc" \
    --server-pid "$pid" >"$OUT/$name-$i-$round.json" 2>>"$OUT/loadtest.log" ||
    echo "{\"stopped_after_s\": $RUN_LIMIT}" >"$OUT/$name-$i-$round.json"
  if [ "$name" = pcpd ]; then
    journal_mean_ms >"$OUT/journal-$i-$round.txt"
    stop "$PCPD_PID"; PCPD_PID=
  else
    stop "$MU_PID"; MU_PID=
  fi
}

journal_mean_ms() { # pcpd's mean group commit in this run (write + fdatasync)
  ip netns exec "$PCPD_NS" curl -s 127.0.0.20:9351/metrics |
    awk '/^pcpd_journal_commit_seconds_sum/ {s=$2} /^pcpd_journal_commit_seconds_count/ {c=$2}
         END { if (c > 0) printf "%.2f", s / c * 1000; else print "-" }'
}

for round in $(seq "$ROUNDS"); do
  for i in "${!ROWS[@]}"; do
    # Alternate which server goes first.
    if [ $((round % 2)) = 1 ]; then
      run miniupnpd "$i" "$round"; run pcpd "$i" "$round"
    else
      run pcpd "$i" "$round"; run miniupnpd "$i" "$round"
    fi
  done
done
JOURNAL_MS=$(for f in "$OUT"/journal-0-*.txt; do printf '%s ' "$(cat "$f")"; done)

python3 - "$OUT" "$ROUNDS" "$JOURNAL_MS" "${ROWS[@]}" <<'PY'
import json, statistics, sys
out, rounds, journal_ms, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
def run(name, i, r):
    d = json.load(open(f"{out}/{name}-{i}-{r}.json"))
    if "stopped_after_s" in d:
        return None
    return d
def cell(runs):
    done = [d["replies_per_sec"] for d in runs if d]
    if not done:
        return "no result (stopped)", None
    note = "" if len(done) == len(runs) else f" ({len(runs) - len(done)} of {len(runs)} stopped)"
    return f"{statistics.median(done):,.0f}{note}", statistics.median(done)
print("| scenario | miniupnpd replies/s | pcpd replies/s | pcpd / miniupnpd (median of paired) | pcpd p50 µs | prefilled (miniupnpd / pcpd, last round) |")
print("|---|---|---|---|---|---|")
for i, row in enumerate(rows):
    label, maps = row.split("|")[0], int(row.split("|")[1])
    mu = [run("miniupnpd", i, r) for r in range(1, rounds + 1)]
    pc = [run("pcpd", i, r) for r in range(1, rounds + 1)]
    mu_text, _ = cell(mu)
    pc_text, _ = cell(pc)
    pairs = [p["replies_per_sec"] / m["replies_per_sec"] for m, p in zip(mu, pc)
             if m and p and m["replies_per_sec"] > 0]
    ratio = f"{statistics.median(pairs):.2f}" if pairs else "n/a"
    p50 = statistics.median(p["latency_us"]["p50"] for p in pc if p) if any(pc) else 0
    pre = lambda d: d["prefilled"] if d else "stopped"
    print(f"| {label} | {mu_text} | {pc_text} | {ratio} | {p50:,.0f} | {pre(mu[-1])} / {pre(pc[-1])} of {maps} |")
print()
print(f"pcpd's mean journal group commit (write + fdatasync) in the 1-in-flight runs: {journal_ms} ms")
PY
