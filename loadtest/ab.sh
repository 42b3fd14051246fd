#!/usr/bin/env bash
# Same-run comparison of two pcpd binaries (two commits), loopback only:
#   loadtest/ab.sh OLD_PCPD NEW_PCPD
# Three alternating rounds; in each, each binary answers create and renew
# at 256 in flight and renew at 8 and at 1 in flight (durable state on,
# memory dataplane, loadtest/pcpd-load.yaml). Prints the medians and the
# median of the paired ratios new / old.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/common.sh
[ $# = 2 ] || { echo "usage: $0 OLD_PCPD NEW_PCPD" >&2; exit 2; }
cargo build --release -q -p pcp-loadtest
settle_disk
LT=target/release/pcp-loadtest
IP=127.0.0.20
OUT=target/loadtest-ab
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
rm -rf "$OUT" && mkdir -p "$OUT"
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT
for round in 1 2 3; do
  for which in old new; do
    bin=$1; [ "$which" = new ] && bin=$2
    rm -rf target/loadtest-report/state && mkdir -p target/loadtest-report/state
    "${SERVER_PIN[@]}" "$bin" --config loadtest/pcpd-load.yaml 2>>"$OUT/$which.log" &
    PID=$!
    wait_ready
    for spec in create:256 renew:256 renew:8 renew:1; do
      w=${spec%:*}; c=${spec#*:}
      maps=4; [ "$w" = create ] && maps=0
      "${GEN_PIN[@]}" timeout 900 "$LT" run --json --concurrency "$c" --seconds "$SECONDS_PER_RUN" \
        --target "$IP:5351" --mix "$w" --subscribers 10000 --mappings "$maps" \
        --server-pid "$PID" >"$OUT/$which-$w-$c-$round.json"
    done
    kill "$PID"; wait "$PID" 2>/dev/null || true
    PID=
  done
done
python3 - "$OUT" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]
load = lambda n: json.load(open(os.path.join(out, n + ".json")))
print("| workload | in flight | old replies/s | new replies/s | new / old (median of paired) | old p99 / new p99 µs | old / new pcpd CPU µs per reply |")
print("|---|---|---|---|---|---|---|")
for w, c in (("create", 256), ("renew", 256), ("renew", 8), ("renew", 1)):
    old = [load(f"old-{w}-{c}-{r}") for r in (1, 2, 3)]
    new = [load(f"new-{w}-{c}-{r}") for r in (1, 2, 3)]
    ratio = statistics.median(b["replies_per_sec"] / a["replies_per_sec"] for a, b in zip(old, new))
    med = lambda runs: sorted(runs, key=lambda x: x["replies_per_sec"])[1]
    cpu = lambda x: x["server_cpu_seconds"] * 1e6 / max(x["replies"], 1)
    mo, mn = med(old), med(new)
    bad = sum(x["lost"] + x["invalid"] for x in old + new)
    print(f"| {w} | {c} | {mo['replies_per_sec']:,.0f} | {mn['replies_per_sec']:,.0f} | {ratio:.2f} | {mo['latency_us']['p99']} / {mn['latency_us']['p99']} | {cpu(mo):.1f} / {cpu(mn):.1f} |" + ("" if bad == 0 else f" ({bad} lost or invalid)"))
PY
