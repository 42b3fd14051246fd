#!/usr/bin/env bash
# Reproduces the daemon figures of docs/performance.md, on loopback only,
# bounded in time (about 8 minutes on a 2-core machine):
#   1. three rounds of: pcpd with create, renew and mixed workloads, each
#      right after a run of the reflector baseline (same load generator,
#      same settings);
#   2. scale, three rounds: renewals with 1 k, 100 k and 1 M live mappings
#      (1 M both over 100 k subscribers and over 1 M, one each: the two
#      memory goals), and pcpd's resident memory per mapping;
#   3. restart: with the 1 M mappings, kill -9 and time until ready (journal
#      replay), then a clean restart (from the snapshots written at start);
#   4. the workloads of 1 with the nftables dataplane (loadtest/report_nft.sh,
#      in a network namespace; needs root).
# Prints a Markdown summary and writes the plots docs/perf-scale.svg and
# docs/perf-latency.svg; raw JSON goes to target/loadtest-report/.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
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
  "${SERVER_PIN[@]}" "$PCPD" --config loadtest/pcpd-load.yaml 2>>"$OUT/pcpd.log" &
  PCPD_PID=$!
  PIDS+=("$PCPD_PID")
  wait_ready || { cat "$OUT/pcpd.log" >&2; exit 1; }
}
stop_pcpd() { kill "$PCPD_PID"; wait "$PCPD_PID" 2>/dev/null || true; }

run() { # name, then loadtest arguments
  local name=$1; shift
  "${GEN_PIN[@]}" timeout 900 "$LT" run --json --concurrency "$CONC" --seconds "$SECONDS_PER_RUN" "$@" >"$OUT/$name.json"
}

"${SERVER_PIN[@]}" "$LT" reflect --listen "$IP:5399" --threads "$SERVER_CPUS" --seconds 900 2>/dev/null &
REFLECT_PID=$!
PIDS+=("$REFLECT_PID")
# The independent check of the baseline: a plain C recvmmsg/sendmmsg
# reflector, driven by the same generator in the same rounds.
cc -O2 -pthread -o target/reflect-c loadtest/baseline/reflect.c
"${SERVER_PIN[@]}" target/reflect-c "$IP" 5398 "$SERVER_CPUS" 900 &
CREFLECT_PID=$!
PIDS+=("$CREFLECT_PID")
settle_disk
sleep 0.5

for round in 1 2 3; do
  run "reflect-$round" --target "$IP:5399" --echo --mix create --subscribers 10000 --server-pid "$REFLECT_PID"
  run "reflect-c-$round" --target "$IP:5398" --echo --mix create --subscribers 10000 --server-pid "$CREFLECT_PID"
  start_pcpd
  run "create-$round" --target "$IP:5351" --mix create --subscribers 10000 --mappings 0 --first-port 10000 --server-pid "$PCPD_PID"
  # Each workload is paired with a reflector run just before it (pcpd
  # idles meanwhile): this shared machine's speed drifts by a third within
  # a minute, so a baseline measured 15 s earlier is not the same machine.
  run "reflect-renew-$round" --target "$IP:5399" --echo --mix create --subscribers 10000 --server-pid "$REFLECT_PID"
  run "renew-$round" --target "$IP:5351" --mix renew --subscribers 10000 --mappings 4 --server-pid "$PCPD_PID"
  run "reflect-mixed-$round" --target "$IP:5399" --echo --mix create --subscribers 10000 --server-pid "$REFLECT_PID"
  run "mixed-$round" --target "$IP:5351" --mix mixed --subscribers 10000 --mappings 4 --first-port 40000 --server-pid "$PCPD_PID"
  stop_pcpd
done

# Three rounds of every size, like the workloads above: the ratio against
# 1 k is the median of the rounds' own ratios (one 5 s run alone swung by
# 0.85-0.95 between reports on this shared machine).
for round in 1 2 3; do
for spec in 1000:1 10000:10 100000:10 1000000:1; do
  subs=${spec%:*}; maps=${spec#*:}
  start_pcpd
  idle=$(awk '/VmRSS/ {print $2 * 1024}' "/proc/$PCPD_PID/status")
  echo "$idle" >"$OUT/idle-rss-$subs-$round.txt"
  run "scale-$subs-$round" --target "$IP:5351" --mix renew --subscribers "$subs" --mappings "$maps" --server-pid "$PCPD_PID"
  if [ "$subs" = 1000000 ] && [ "$round" = 3 ]; then
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
done

# The same workloads with the kernel dataplane (in a namespace of its own).
OUT="$OUT" loadtest/report_nft.sh >&2

python3 - "$OUT" <<'PY'
import json, statistics, sys, os
out = sys.argv[1]
load = lambda n: json.load(open(os.path.join(out, n + ".json")))
print("| workload | dataplane | pcpd replies/s (median of 3) | reflector replies/s (paired runs) | ratio (median of paired) | p50 / p99 / p99.9 µs | pcpd CPU µs per reply |")
print("|---|---|---|---|---|---|---|")
refl = [load(f"reflect-{r}") for r in (1, 2, 3)]
# The memory rows' reflector run just before each workload; the nftables
# rows (report_nft.sh, minutes later) the round's first.
paired = {"create": refl,
          "renew": [load(f"reflect-renew-{r}") for r in (1, 2, 3)],
          "mixed": [load(f"reflect-mixed-{r}") for r in (1, 2, 3)]}
lat_rows = []
for dp, prefix in (("memory", ""), ("nftables", "nft-")):
    for w in ("create", "renew", "mixed"):
        runs = [load(f"{prefix}{w}-{r}") for r in (1, 2, 3)]
        base = paired[w] if dp == "memory" else refl
        ratios = [a["replies_per_sec"] / b["replies_per_sec"] for a, b in zip(runs, base)]
        med = sorted(runs, key=lambda x: x["replies_per_sec"])[1]
        cpu = med["server_cpu_seconds"] * 1e6 / max(med["replies"], 1)
        lat = med["latency_us"]
        lat_rows.append((f"{w} ({dp})", lat))
        bad = sum(x["invalid"] + x["lost"] for x in runs)
        print(f"| {w} | {dp} | {statistics.median(r['replies_per_sec'] for r in runs):,.0f} | {statistics.median(r['replies_per_sec'] for r in base):,.0f} | {statistics.median(ratios):.0%} | {lat['p50']} / {lat['p99']} / {lat['p999']} | {cpu:.1f} |" + ("" if bad == 0 else f" ({bad} lost or invalid)"))
print()
crefl = [load(f"reflect-c-{r}") for r in (1, 2, 3)]
cr = [a["replies_per_sec"] / b["replies_per_sec"] for a, b in zip(refl, crefl)]
print(f"Baseline check: pcp-loadtest reflect {statistics.median(r['replies_per_sec'] for r in refl):,.0f}/s, C reflector (loadtest/baseline/reflect.c) {statistics.median(r['replies_per_sec'] for r in crefl):,.0f}/s, ratio {statistics.median(cr):.2f} (median of paired rounds).")
print()
print("| live mappings | subscribers | renew replies/s (median of 3) | against 1 k (median of paired rounds) | p99 µs | pcpd RSS | bytes per mapping (RSS growth, median) |")
print("|---|---|---|---|---|---|---|")
scale = {}
rounds = (1, 2, 3)
base = [load(f"scale-1000-{r}")["replies_per_sec"] for r in rounds]
for subs in (1000, 10000, 100000, 1000000):
    rs = [load(f"scale-{subs}-{r}") for r in rounds]
    idle = [int(open(os.path.join(out, f"idle-rss-{subs}-{r}.txt")).read()) for r in rounds]
    grown = statistics.median((x["server_rss_bytes"] - i) / max(x["prefilled"], 1) for x, i in zip(rs, idle))
    med = sorted(rs, key=lambda x: x["replies_per_sec"])[1]
    against = statistics.median(x["replies_per_sec"] / b for x, b in zip(rs, base))
    scale[subs] = (med["prefilled"], med["replies_per_sec"])
    print(f"| {med['prefilled']:,} | {subs:,} | {med['replies_per_sec']:,.0f} | {against:.2f} | {med['latency_us']['p99']} | {med['server_rss_bytes']/1048576:.0f} MiB | {grown:.0f} |")

# Plots, plain SVG: renewals per second against live mappings, and the
# latency percentiles of each workload.
def svg(path, w, h, body):
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">\n')
        f.write(f'<rect width="{w}" height="{h}" fill="white"/>\n{body}</svg>\n')

import math
W, H, L, B = 560, 360, 70, 70
top = max(v for _, v in scale.values()) * 1.15
x0, x1 = 2.5, 6.5
px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - 20)
py = lambda y: H - B - y / top * (H - B - 30)
body = f'<text x="{W/2}" y="18" text-anchor="middle">renewals per second against live mappings (durable state on)</text>\n'
body += f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/><line x1="{L}" y1="{H-B}" x2="{L}" y2="30" stroke="black"/>\n'
for e in range(3, 7):
    body += f'<text x="{px(e)}" y="{H-B+18}" text-anchor="middle">10^{e}</text>\n'
for i in range(5):
    y = top * i / 4
    body += f'<text x="{L-6}" y="{py(y)+4}" text-anchor="end">{y/1000:.0f}k</text>\n'
# Two series: one mapping per subscriber (1 k, 1 M), ten (100 k, 1 M).
for n, (series, color, label) in enumerate((((1000, 1000000), "#1f77b4", "1 mapping per subscriber"),
                                            ((10000, 100000), "#ff7f0e", "10 mappings per subscriber"))):
    pts = [(math.log10(max(scale[s][0], 1)), scale[s][1]) for s in series]
    body += f'<polyline points="{" ".join(f"{px(x)},{py(v)}" for x, v in pts)}" fill="none" stroke="{color}" stroke-width="2"/>\n'
    for x, v in pts:
        body += f'<circle cx="{px(x)}" cy="{py(v)}" r="4" fill="{color}"/><text x="{px(x)}" y="{py(v)-8 - 14*n}" text-anchor="middle" fill="{color}">{v/1000:.0f}k</text>\n'
    body += f'<rect x="{L + 10 + n*200}" y="{H-B+46}" width="10" height="10" fill="{color}"/><text x="{L + 24 + n*200}" y="{H-B+55}">{label}</text>\n'
body += f'<text x="{W/2}" y="{H-B+32}" text-anchor="middle">live mappings (log scale)</text>\n'
svg("docs/perf-scale.svg", W, H, body)

W, H, B = 640, 360, 50
top = max(l["p999"] for _, l in lat_rows) * 1.1
bw = (W - L - 20) / len(lat_rows)
body = f'<text x="{W/2}" y="18" text-anchor="middle">latency at {256} in flight, µs: p50 / p99 / p99.9 (median run)</text>\n'
body += f'<line x1="{L}" y1="{H-B-30}" x2="{W-20}" y2="{H-B-30}" stroke="black"/>\n'
colors = ("#2ca02c", "#ff7f0e", "#d62728")
for i, (name, l) in enumerate(lat_rows):
    for j, (k, c) in enumerate(zip(("p50", "p99", "p999"), colors)):
        hgt = l[k] / top * (H - B - 70)
        x = L + i * bw + 6 + j * (bw - 12) / 3
        body += f'<rect x="{x:.1f}" y="{H-B-30-hgt:.1f}" width="{(bw-12)/3:.1f}" height="{hgt:.1f}" fill="{c}"/>\n'
    body += f'<text x="{L + i*bw + bw/2:.1f}" y="{H-B-14}" text-anchor="middle" font-size="10">{name}</text>\n'
for i in range(5):
    y = top * i / 4
    body += f'<text x="{L-6}" y="{H-B-30-y/top*(H-B-70)+4:.1f}" text-anchor="end">{y/1000:.1f}k</text>\n'
body += "".join(f'<rect x="{L + 10 + j*90}" y="{H-22}" width="10" height="10" fill="{c}"/><text x="{L + 24 + j*90}" y="{H-13}">{k}</text>\n' for j, (k, c) in enumerate(zip(("p50", "p99", "p99.9"), colors)))
svg("docs/perf-latency.svg", W, H, body)
print()
kill = open(os.path.join(out, "restart-KILL.txt")).read().strip()
term = open(os.path.join(out, "restart-TERM.txt")).read().strip()
print(f"Restart with {load('scale-1000000-3')['prefilled']:,} mappings, time until /readyz: {kill} ms after kill -9 (journal replay), {term} ms after a clean stop (snapshots).")
PY
