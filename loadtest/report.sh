#!/usr/bin/env bash
# Reproduces the daemon figures of docs/performance.md, on loopback only,
# bounded in time (about 5 minutes on a 2-core machine):
#   1. three rounds of: reflector baseline, then pcpd with create, renew
#      and mixed workloads (same load generator, same settings);
#   2. scale: renewals with 1 k, 100 k and 1 M live mappings, and pcpd's
#      resident memory per mapping;
#   3. restart: with the 1 M mappings, kill -9 and time until ready (journal
#      replay), then a clean restart (from the snapshots written at start).
# Prints a Markdown summary; raw JSON goes to target/loadtest-report/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p pcpd -p pcp-loadtest
LT=target/release/pcp-loadtest
PCPD=target/release/pcpd
IP=127.0.0.20
OUT=target/loadtest-report
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
CONC=${CONC:-256}
rm -rf "$OUT" && mkdir -p "$OUT/state"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start_pcpd() {
  rm -rf "$OUT/state" && mkdir -p "$OUT/state"
  launch_pcpd
}
launch_pcpd() {
  "$PCPD" --config loadtest/pcpd-load.yaml 2>>"$OUT/pcpd.log" &
  PCPD_PID=$!
  PIDS+=("$PCPD_PID")
  for _ in $(seq 600); do
    curl -sf "http://$IP:8351/readyz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "pcpd did not start" >&2; cat "$OUT/pcpd.log" >&2; exit 1
}
stop_pcpd() { kill "$PCPD_PID"; wait "$PCPD_PID" 2>/dev/null || true; }

run() { # name, then loadtest arguments
  local name=$1; shift
  timeout 900 "$LT" run --json --concurrency "$CONC" --seconds "$SECONDS_PER_RUN" "$@" >"$OUT/$name.json"
}

"$LT" reflect --listen "$IP:5399" --threads 2 --seconds 900 2>/dev/null &
REFLECT_PID=$!
PIDS+=("$REFLECT_PID")
# The independent check of the baseline: a plain C recvmmsg/sendmmsg
# reflector, driven by the same generator in the same rounds.
cc -O2 -pthread -o target/reflect-c loadtest/baseline/reflect.c
target/reflect-c "$IP" 5398 2 900 &
CREFLECT_PID=$!
PIDS+=("$CREFLECT_PID")
sleep 0.5

for round in 1 2 3; do
  run "reflect-$round" --target "$IP:5399" --echo --mix create --subscribers 10000 --server-pid "$REFLECT_PID"
  run "reflect-c-$round" --target "$IP:5398" --echo --mix create --subscribers 10000 --server-pid "$CREFLECT_PID"
  start_pcpd
  run "create-$round" --target "$IP:5351" --mix create --subscribers 10000 --mappings 0 --server-pid "$PCPD_PID"
  run "renew-$round" --target "$IP:5351" --mix renew --subscribers 10000 --mappings 4 --server-pid "$PCPD_PID"
  run "mixed-$round" --target "$IP:5351" --mix mixed --subscribers 10000 --mappings 4 --server-pid "$PCPD_PID"
  stop_pcpd
done

for spec in 1000:1 10000:10 1000000:1; do
  subs=${spec%:*}; maps=${spec#*:}
  start_pcpd
  idle=$(awk '/VmRSS/ {print $2 * 1024}' "/proc/$PCPD_PID/status")
  echo "$idle" >"$OUT/idle-rss-$subs.txt"
  run "scale-$subs" --target "$IP:5351" --mix renew --subscribers "$subs" --mappings "$maps" --server-pid "$PCPD_PID"
  if [ "$subs" = 1000000 ]; then
    # Restart with 1 M mappings: after kill -9 (journal replay), then clean.
    for how in KILL TERM; do
      kill -"$how" "$PCPD_PID"; wait "$PCPD_PID" 2>/dev/null || true
      t0=$(date +%s%N)
      launch_pcpd
      t1=$(date +%s%N)
      echo "$(( (t1 - t0) / 1000000 ))" >"$OUT/restart-$how.txt"
    done
  fi
  stop_pcpd
done

python3 - "$OUT" <<'PY'
import json, statistics, sys, os
out = sys.argv[1]
load = lambda n: json.load(open(os.path.join(out, n + ".json")))
print("| workload | pcpd replies/s (median of 3) | reflector replies/s (same rounds) | ratio (median of paired) | p50 / p99 / p99.9 µs | pcpd CPU µs per reply |")
print("|---|---|---|---|---|---|")
refl = [load(f"reflect-{r}") for r in (1, 2, 3)]
for w in ("create", "renew", "mixed"):
    runs = [load(f"{w}-{r}") for r in (1, 2, 3)]
    ratios = [a["replies_per_sec"] / b["replies_per_sec"] for a, b in zip(runs, refl)]
    med = sorted(runs, key=lambda x: x["replies_per_sec"])[1]
    cpu = med["server_cpu_seconds"] * 1e6 / max(med["replies"], 1)
    lat = med["latency_us"]
    bad = sum(x["invalid"] + x["lost"] for x in runs)
    print(f"| {w} | {statistics.median(r['replies_per_sec'] for r in runs):,.0f} | {statistics.median(r['replies_per_sec'] for r in refl):,.0f} | {statistics.median(ratios):.0%} | {lat['p50']} / {lat['p99']} / {lat['p999']} | {cpu:.1f} |" + ("" if bad == 0 else f" ({bad} lost or invalid)"))
print()
crefl = [load(f"reflect-c-{r}") for r in (1, 2, 3)]
cr = [a["replies_per_sec"] / b["replies_per_sec"] for a, b in zip(refl, crefl)]
print(f"Baseline check: pcp-loadtest reflect {statistics.median(r['replies_per_sec'] for r in refl):,.0f}/s, C reflector (loadtest/baseline/reflect.c) {statistics.median(r['replies_per_sec'] for r in crefl):,.0f}/s, ratio {statistics.median(cr):.2f} (median of paired rounds).")
print()
print("| live mappings | subscribers | renew replies/s | p99 µs | pcpd RSS | bytes per mapping (RSS growth) |")
print("|---|---|---|---|---|---|")
base = None
for subs in (1000, 10000, 1000000):
    r = load(f"scale-{subs}")
    idle = int(open(os.path.join(out, f"idle-rss-{subs}.txt")).read())
    grown = (r["server_rss_bytes"] - idle) / max(r["prefilled"], 1)
    print(f"| {r['prefilled']:,} | {subs:,} | {r['replies_per_sec']:,.0f} | {r['latency_us']['p99']} | {r['server_rss_bytes']/1048576:.0f} MiB | {grown:.0f} |")
print()
kill = open(os.path.join(out, "restart-KILL.txt")).read().strip()
term = open(os.path.join(out, "restart-TERM.txt")).read().strip()
print(f"Restart with {load('scale-1000000')['prefilled']:,} mappings, time until /readyz: {kill} ms after kill -9 (journal replay), {term} ms after a clean stop (snapshots).")
PY
