#!/usr/bin/env bash
# A soak of pcpd under realistic churn, on loopback only, bounded in time.
#
# For SOAK_SECONDS (default 3600): runs of open-loop load back to back, each
# STEP seconds (60 for the hour, shorter for short soaks), of creates,
# renewals, deletes, PEER and NAT-PMP at SOAK_RATE requests/s over
# SOAK_SUBSCRIBERS subscribers. Lifetimes are capped at 30 s, so mappings
# that are not renewed expire while it runs. Every 3rd step a SIGHUP
# reload, every 5th a drain and undrain of one pool address (RFC 6887
# §14.2 updates). After each step it records RSS, open files, latency
# percentiles, lost and invalid replies and the answers by result code.
#
# Exit 1 on any lost or invalid reply, on pcpd exiting, or on RSS growth
# after warm-up (the first third; half of a short soak) above
# SOAK_RSS_GROWTH_PCT percent. A reply is lost when it has not come within
# 2.7 s: the earliest a PCP client retransmits (RFC 6887 §8.1.1, IRT 3 s
# less its 10 % jitter), so a reply later than that is one a client would
# not wait for. On failure, pcpd's warnings and errors are printed (a slow
# disk shows there as journal commits over 25 ms).
#
#   loadtest/soak.sh                         # the hour, release build
#   SOAK_SECONDS=120 PROFILE=debug loadtest/soak.sh   # CI's two minutes
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
SOAK_SECONDS=${SOAK_SECONDS:-3600}
SOAK_RATE=${SOAK_RATE:-2000}
SOAK_SUBSCRIBERS=${SOAK_SUBSCRIBERS:-5000}
SOAK_RSS_GROWTH_PCT=${SOAK_RSS_GROWTH_PCT:-10}
PROFILE=${PROFILE:-release}
STEP=$(( SOAK_SECONDS >= 1800 ? 60 : (SOAK_SECONDS / 6 > 5 ? SOAK_SECONDS / 6 : 5) ))
if [ "$PROFILE" = release ]; then
  cargo build --release -q -p pcpd -p pcp-loadtest
else
  cargo build -q -p pcpd -p pcp-loadtest
fi
# A build (or CI's test run before it) leaves gigabytes dirty; written back
# 30 s later, they held journal commits for up to a second in CI.
settle_disk
LT=target/$PROFILE/pcp-loadtest
PCPD=target/$PROFILE/pcpd
IP=127.0.0.21
OUT=target/soak
rm -rf "$OUT" && mkdir -p "$OUT/state"

cat >"$OUT/pcpd.yaml" <<YAML
listen: ["$IP:5351"]
shards: 2
pcp:
  lifetimes: { min: 10, max: 30, short_error: 30, long_error: 1800 }
  pools:
    soak:
      prefixes: [198.18.0.0/24]
      ports: { first: 1024, last: 65535 }
      block_size: 1008
      mode: dynamic
      reuse_delay_secs: 5
      block_hold_secs: 20
  profiles:
    soak: { max_mappings: 64, max_blocks: 2, rate_per_sec: 100000, burst: 100000 }
  subscribers:
    - prefixes: [127.0.0.0/8]
      pool: soak
      profile: soak
  unsolicited:
    announce_targets: []
state_dir: $OUT/state
journal_max_mib: 4
admin:
  listen: $IP:8351
  allow_plaintext_on_loopback: true
  tokens:
    - { name: soak, scope: write, sha256: d0d51598111a7bb395cab677d997c8e9075aa07169cb1fc1cc23d1c2ce1ffa58 }
metrics:
  listen: $IP:9351
log:
  format: text
  nat_events: $OUT/nat-events.jsonl
YAML

"$PCPD" --config "$OUT/pcpd.yaml" 2>"$OUT/pcpd.log" &
PCPD_PID=$!
trap 'kill $PCPD_PID 2>/dev/null || true' EXIT
wait_ready || { cat "$OUT/pcpd.log" >&2; exit 1; }
API=(-sf -H "Authorization: Bearer pcpd-dev-token" -H "Content-Type: application/json")

steps=$(( SOAK_SECONDS / STEP ))
echo "soak: $SOAK_SECONDS s in $steps steps of $STEP s, $SOAK_RATE requests/s, $SOAK_SUBSCRIBERS subscribers" >&2
for i in $(seq 1 "$steps"); do
  kill -0 "$PCPD_PID" 2>/dev/null || { echo "pcpd exited" >&2; exit 1; }
  if [ $(( i % 3 )) = 0 ]; then kill -HUP "$PCPD_PID"; fi
  if [ $(( i % 5 )) = 0 ]; then
    curl "${API[@]}" -d '{"address":"198.18.0.7"}' "http://$IP:8351/v1/pools/drain" >/dev/null
    curl "${API[@]}" -d '{"address":"198.18.0.7"}' "http://$IP:8351/v1/pools/undrain" >/dev/null
  fi
  timeout $(( STEP + 120 )) "$LT" run --json --target "$IP:5351" \
    --mix create=2,renew=5,delete=1,peer=1,natpmp=1 --subscribers "$SOAK_SUBSCRIBERS" --mappings 1 \
    --rate "$SOAK_RATE" --timeout-ms 2700 --seconds "$(( STEP > 8 ? STEP - 3 : STEP ))" --server-pid "$PCPD_PID" >"$OUT/step-$i.json"
  echo "$(ls "/proc/$PCPD_PID/fd" | wc -l)" >"$OUT/fds-$i.txt"
done
kill -0 "$PCPD_PID" 2>/dev/null || { echo "pcpd exited" >&2; exit 1; }

if ! python3 - "$OUT" "$steps" "$STEP" "$SOAK_RSS_GROWTH_PCT" <<'PY'
import json, os, sys
out, steps, step, growth_pct = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rows, failures = [], []
for i in range(1, steps + 1):
    r = json.load(open(os.path.join(out, f"step-{i}.json")))
    fds = int(open(os.path.join(out, f"fds-{i}.txt")).read())
    codes = {}
    for kind, by in r["results"].items():
        for code, n in by.items():
            codes[code] = codes.get(code, 0) + n
    rows.append((i, r, fds, codes))
    if r["lost"] or r["invalid"]:
        failures.append(f"step {i}: {r['lost']} lost, {r['invalid']} invalid replies")
print(f"| minute | replies/s | p50 / p99 / p99.9 / max µs | lost | invalid | RSS MiB | open files | answers |")
print("|---|---|---|---|---|---|---|---|")
for i, r, fds, codes in rows:
    lat = r["latency_us"]
    at = i * step / 60
    answers = ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))
    print(f"| {at:.1f} | {r['replies_per_sec']:,.0f} | {lat['p50']} / {lat['p99']} / {lat['p999']} / {lat['max']} | {r['lost']} | {r['invalid']} | {r['server_rss_bytes']/1048576:.1f} | {fds} | {answers} |")
# Warm-up: until mappings have lived and expired a few times (a third of
# the hour; half of a short soak).
warm = max(1, steps // 3 if steps >= 10 else steps // 2)
base = max(r["server_rss_bytes"] for _, r, _, _ in rows[:warm])
peak = max(r["server_rss_bytes"] for _, r, _, _ in rows[warm:]) if steps > warm else base
grown = (peak - base) * 100 / base
print(f"\nRSS after warm-up: {base/1048576:.1f} MiB, peak after: {peak/1048576:.1f} MiB ({grown:+.1f} %); open files {rows[0][2]} -> {rows[-1][2]}")
if grown > growth_pct:
    failures.append(f"RSS grew {grown:.1f} % after warm-up (limit {growth_pct} %)")
if rows[-1][2] > rows[0][2] + 8:
    failures.append(f"open files grew {rows[0][2]} -> {rows[-1][2]}")
for f in failures:
    print("FAIL: " + f, file=sys.stderr)
sys.exit(1 if failures else 0)
PY
then
  echo "pcpd's warnings and errors ($OUT/pcpd.log):" >&2
  grep -E ' (WARN|ERROR) ' "$OUT/pcpd.log" | tail -n 40 >&2 || true
  exit 1
fi
