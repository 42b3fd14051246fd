# Shared by the load scripts (sourced after `cd` to the repository root).

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
