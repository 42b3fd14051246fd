# Shared by the load scripts (sourced after `cd` to the repository root).

# CPU pinning for the figures: the load generator gets the last CPU, the
# server under test (pcpd, or a reflector) the others, the same for both,
# so neither takes the other's core and a server's threads match the cores
# it has: pcpd-load.yaml's `shards: 0` is one shard per core pcpd may use,
# the reflectors run one thread per such core. On one CPU nothing is pinned.
NCPU=$(nproc)
if [ "$NCPU" -ge 2 ]; then
  GEN_PIN=(taskset -c "$((NCPU - 1))")
  SERVER_PIN=(taskset -c "0-$((NCPU - 2))")
  SERVER_CPUS=$((NCPU - 1))
else
  GEN_PIN=()
  SERVER_PIN=()
  SERVER_CPUS=1
fi

# wait_ready [PREFIX...]: waits up to 30 s for pcpd's /readyz on $IP:8351;
# PREFIX runs curl (`ip netns exec NS` for a namespace). Fails loudly.
wait_ready() {
  for _ in $(seq 600); do
    "$@" curl -sf "http://$IP:8351/readyz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "pcpd did not become ready on $IP:8351" >&2
  return 1
}

# settle_disk: writes every dirty page back before measuring. A build just
# before a run leaves ~100 MB dirty; the kernel's flusher writes it back 30 s
# later in one burst, and pcpd's journal commits wait behind it (measured:
# one round's p99.9 at 36 ms, commits up to 80 ms, in a report right after
# `cargo build`).
settle_disk() { sync; }
