#!/usr/bin/env bash
# Reproduces the cluster figures of docs/performance.md (issue 14), on
# loopback only, bounded in time (about 10 minutes on a 2-core machine):
#   1. three rounds of: single-node journal mode, then cluster mode (one
#      node on a three-member etcd), each with the create and the renew
#      workload of the same load generator and settings: same-run ratios;
#   2. takeover after kill -9 of the owner of a partition holding 1 k,
#      100 k and 1 M mappings, split into detection (lease expiry and the
#      survivor's poll), etcd read and install (engines and dataplane).
# etcd is Debian's etcd-server, three members on 127.0.0.61-63 with their
# data in target/cluster-report/ (a real disk, as in production).
# Prints a Markdown summary; raw JSON goes to target/cluster-report/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p pcpd --features cluster -p pcp-loadtest
LT=target/release/pcp-loadtest
PCPD=target/release/pcpd
OUT=target/cluster-report
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
CONC=${CONC:-256}
SIZES=${SIZES:-"1000 100000 1000000"}
rm -rf "$OUT" && mkdir -p "$OUT"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

MEMBERS="e0=http://127.0.0.61:2380,e1=http://127.0.0.62:2380,e2=http://127.0.0.63:2380"
ENDPOINTS='["http://127.0.0.61:2379","http://127.0.0.62:2379","http://127.0.0.63:2379"]'
for i in 0 1 2; do
  ip=127.0.0.6$((i + 1))
  etcd --name "e$i" --data-dir "$OUT/etcd-$i" \
    --listen-client-urls "http://$ip:2379" --advertise-client-urls "http://$ip:2379" \
    --listen-peer-urls "http://$ip:2380" --initial-advertise-peer-urls "http://$ip:2380" \
    --initial-cluster "$MEMBERS" --initial-cluster-state new --quota-backend-bytes 4294967296 \
    2>>"$OUT/etcd-$i.log" &
  PIDS+=("$!")
done

# Node configs: loadtest/pcpd-load.yaml plus a cluster section. The load
# generator's subscribers (127.64.0.0 + i) are all in p0.
node_config() { # node ip prefix
  python3 - "$1" "$2" "$3" "$ENDPOINTS" "$OUT" <<'PY'
import sys, yaml, json
node, ip, prefix, endpoints, out = sys.argv[1:]
c = yaml.safe_load(open("loadtest/pcpd-load.yaml"))
c["listen"] = [f"{ip}:5351"]
c["admin"]["listen"] = f"{ip}:8351"
c["metrics"]["listen"] = f"{ip}:9351"
c["state_dir"] = f"{out}/state-{node}"
c["log"]["nat_events"] = f"{out}/state-{node}/nat-events.jsonl"
c["cluster"] = {
    "node": node,
    "etcd": {"endpoints": json.loads(endpoints), "prefix": prefix},
    "partitions": [
        {"name": "p0", "subscribers": ["127.64.0.0/11"], "pool": "load",
         "external": ["198.18.0.0/17"], "prefer": ["a"]},
        {"name": "p1", "subscribers": ["127.96.0.0/11"], "pool": "load",
         "external": ["198.18.128.0/17"], "prefer": ["b"]},
    ],
}
print(yaml.safe_dump(c))
PY
}

wait_url() { # url, tries of 50 ms
  for _ in $(seq "${2:-600}"); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "no answer from $1" >&2; exit 1
}

start() { # name config-file ip -> sets LAST_PID
  "$PCPD" --config "$2" 2>>"$OUT/$1.log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  wait_url "http://$3:8351/readyz"
}

run() { # name, then loadtest arguments
  local name=$1; shift
  timeout 900 "$LT" run --json --concurrency "$CONC" --seconds "$SECONDS_PER_RUN" "$@" >"$OUT/$name.json"
}

IP=127.0.0.20
for round in 1 2 3; do
  # Single node, local journal (the default), fresh state.
  rm -rf target/loadtest-report/state && mkdir -p target/loadtest-report/state
  start "journal-$round" loadtest/pcpd-load.yaml "$IP"; pid=$LAST_PID
  run "journal-create-$round" --target "$IP:5351" --mix create --subscribers 10000 --mappings 0 --server-pid "$pid"
  run "journal-renew-$round" --target "$IP:5351" --mix renew --subscribers 10000 --mappings 4 --server-pid "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  # One cluster node on etcd (it owns both partitions), fresh prefix.
  node_config a "$IP" "/bench/round-$round" >"$OUT/a-$round.yaml"
  start "cluster-$round" "$OUT/a-$round.yaml" "$IP"; pid=$LAST_PID
  wait_url "http://$IP:8351/v1/cluster/partitions/p0/health"
  run "cluster-create-$round" --target "$IP:5351" --mix create --subscribers 10000 --mappings 0 --server-pid "$pid"
  run "cluster-renew-$round" --target "$IP:5351" --mix renew --subscribers 10000 --mappings 4 --server-pid "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

A=127.0.0.20 B=127.0.0.22
for n in $SIZES; do
  prefix="/bench/takeover-$n"
  node_config a "$A" "$prefix" >"$OUT/ta-$n.yaml"
  node_config b "$B" "$prefix" >"$OUT/tb-$n.yaml"
  start "takeover-a-$n" "$OUT/ta-$n.yaml" "$A"; apid=$LAST_PID
  start "takeover-b-$n" "$OUT/tb-$n.yaml" "$B"; bpid=$LAST_PID
  wait_url "http://$A:8351/v1/cluster/partitions/p0/health"
  # n mappings on a (n/4 subscribers with 4 each), written through etcd.
  SECONDS_PER_RUN=1 run "prefill-$n" --target "$A:5351" --mix renew --subscribers $((n / 4)) --mappings 4 --server-pid "$apid"
  t0=$(date +%s%N)
  kill -9 "$apid"
  wait_url "http://$B:8351/v1/cluster/partitions/p0/health" 6000
  t1=$(date +%s%N)
  echo "$(( (t1 - t0) / 1000000 ))" >"$OUT/takeover-$n.ms"
  curl -sf "http://$B:9351/metrics" >"$OUT/takeover-$n.metrics"
  curl -sf -H 'Authorization: Bearer pcpd-dev-token' "http://$B:8351/v1/cluster" >"$OUT/takeover-$n.cluster.json"
  kill "$bpid"; wait "$bpid" 2>/dev/null || true
done

python3 - "$OUT" "$SIZES" <<'PY'
import json, statistics, sys, os, re
out, sizes = sys.argv[1], sys.argv[2].split()
load = lambda n: json.load(open(os.path.join(out, n + ".json")))
print("| workload | journal (single node) replies/s | cluster (etcd) replies/s | ratio cluster / journal (median of paired) | cluster p50 / p99 µs | lost or invalid |")
print("|---|---|---|---|---|---|")
for w in ("create", "renew"):
    j = [load(f"journal-{w}-{r}") for r in (1, 2, 3)]
    c = [load(f"cluster-{w}-{r}") for r in (1, 2, 3)]
    ratios = [b["replies_per_sec"] / a["replies_per_sec"] for a, b in zip(j, c)]
    med = sorted(c, key=lambda x: x["replies_per_sec"])[1]
    bad = sum(x["invalid"] + x["lost"] for x in j + c)
    print(f"| {w} | {statistics.median(x['replies_per_sec'] for x in j):,.0f} | {statistics.median(x['replies_per_sec'] for x in c):,.0f} | {statistics.median(ratios):.0%} | {med['latency_us']['p50']} / {med['latency_us']['p99']} | {bad} |")
print()
print("| mappings moved | kill -9 to survivor answering | detection | etcd read | install | survivor holds |")
print("|---|---|---|---|---|---|")
for n in sizes:
    total = int(open(os.path.join(out, f"takeover-{n}.ms")).read())
    m = open(os.path.join(out, f"takeover-{n}.metrics")).read()
    phase = lambda p: float(re.search(r'pcpd_cluster_takeover_seconds\{phase="%s"\} (\S+)' % p, m).group(1)) * 1000
    read, install = phase("etcd_read"), phase("install")
    held = json.load(open(os.path.join(out, f"takeover-{n}.cluster.json")))["partitions"][0]["mappings"]
    print(f"| {int(n):,} | {total:,} ms | {total - read - install:,.0f} ms | {read:,.0f} ms | {install:,.0f} ms | {held:,} |")
PY
