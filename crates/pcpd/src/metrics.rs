//! Prometheus metrics, registered into an explicit registry. Names are
//! constants shared with the tests and docs/metrics.md. No label carries a
//! subscriber address.

use std::sync::{Arc, Mutex};

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use pcp_engine::{PoolUsage, Stats};

/// `pcpd_responses_total{opcode, result}`: answered requests.
pub const RESPONSES: &str = "pcpd_responses_total";
/// `pcpd_drops_total{reason}`: datagrams dropped without an answer.
pub const DROPS: &str = "pcpd_drops_total";
/// `pcpd_request_duration_seconds`: time from receive to reply ready.
pub const LATENCY: &str = "pcpd_request_duration_seconds";
/// `pcpd_mappings{kind}`: live mappings.
pub const MAPPINGS: &str = "pcpd_mappings";
/// `pcpd_pool_ports{pool}` / `pcpd_pool_blocks{pool}` / `pcpd_pool_blocks_allocated{pool}`.
pub const POOL_PORTS: &str = "pcpd_pool_ports";
/// Blocks in a pool.
pub const POOL_BLOCKS: &str = "pcpd_pool_blocks";
/// Blocks held by subscribers.
pub const POOL_BLOCKS_ALLOCATED: &str = "pcpd_pool_blocks_allocated";
/// `pcpd_quota_refusals_total`: USER_EX_QUOTA answers.
pub const QUOTA_REFUSALS: &str = "pcpd_quota_refusals_total";
/// `pcpd_rate_limited_total`: requests refused by the rate limiter.
pub const RATE_LIMITED: &str = "pcpd_rate_limited_total";
/// `pcpd_third_party_refusals_total`: THIRD_PARTY requests refused.
pub const THIRD_PARTY_REFUSALS: &str = "pcpd_third_party_refusals_total";
/// `pcpd_unsolicited_total`: unsolicited ANNOUNCE and mapping updates sent.
pub const UNSOLICITED: &str = "pcpd_unsolicited_total";
/// `pcpd_dataplane_changes_total{result}` and `pcpd_dataplane_apply_seconds`.
pub const DATAPLANE_CHANGES: &str = "pcpd_dataplane_changes_total";
/// Time to apply one batch of dataplane changes.
pub const DATAPLANE_LATENCY: &str = "pcpd_dataplane_apply_seconds";
/// Conntrack entries of removed mappings deleted, by how they were found.
pub const CONNTRACK_REMOVED: &str = "pcpd_conntrack_removed_total";
/// Dumps of the whole conntrack table (the flow index was not trusted).
pub const CONNTRACK_DUMPS: &str = "pcpd_conntrack_dumps_total";
/// `pcpd_epoch_start_timestamp_seconds`: when the epoch (RFC 6887 §8.5) began.
pub const EPOCH_START: &str = "pcpd_epoch_start_timestamp_seconds";
/// `pcpd_build_info{version}`: always 1.
pub const BUILD_INFO: &str = "pcpd_build_info";
/// `pcpd_journal_commit_seconds`: one group commit (write + fdatasync).
pub const JOURNAL_LATENCY: &str = "pcpd_journal_commit_seconds";
/// `pcpd_journal_errors_total`: failed journal writes and snapshots.
pub const JOURNAL_ERRORS: &str = "pcpd_journal_errors_total";
/// `pcpd_handoffs_total`: datagrams passed to the shard owning their subscriber.
pub const HANDOFFS: &str = "pcpd_handoffs_total";
/// `pcpd_ready`: 1 once state is restored and sockets are open.
pub const READY: &str = "pcpd_ready";
/// `pcpd_subscribers{shard}`: subscribers holding a block or a mapping.
pub const SUBSCRIBERS: &str = "pcpd_subscribers";
/// `pcpd_pool_exhausted_total`: requests refused NO_RESOURCES for lack of a
/// free block in the subscriber's pool.
pub const POOL_EXHAUSTED: &str = "pcpd_pool_exhausted_total";
/// `pcpd_state_writable{shard}`: 0 while a shard cannot make its state
/// durable (full disk, failed fdatasync); it answers NO_RESOURCES then.
pub const STATE_WRITABLE: &str = "pcpd_state_writable";
/// `pcpd_cluster_partitions_owned`: partitions this node answers for.
pub const CLUSTER_OWNED: &str = "pcpd_cluster_partitions_owned";
/// `pcpd_cluster_ownership_changes_total{change}`: claimed, released, lost.
pub const CLUSTER_CHANGES: &str = "pcpd_cluster_ownership_changes_total";
/// `pcpd_cluster_etcd_txn_seconds`: one fenced etcd write transaction.
pub const CLUSTER_TXN_LATENCY: &str = "pcpd_cluster_etcd_txn_seconds";
/// `pcpd_cluster_etcd_failures_total{reason}`: etcd writes not committed.
pub const CLUSTER_FAILURES: &str = "pcpd_cluster_etcd_failures_total";
/// `pcpd_cluster_takeover_seconds{phase}`: the last takeover's phases.
pub const CLUSTER_TAKEOVER: &str = "pcpd_cluster_takeover_seconds";
/// `pcpd_cluster_lease_certain`: 1 while the node's etcd lease is certainly alive.
pub const CLUSTER_CERTAIN: &str = "pcpd_cluster_lease_certain";

/// Every metric name (checked against docs/metrics.md).
#[cfg(test)]
pub const ALL: [&str; 30] = [
    RESPONSES,
    DROPS,
    LATENCY,
    MAPPINGS,
    POOL_PORTS,
    POOL_BLOCKS,
    POOL_BLOCKS_ALLOCATED,
    QUOTA_REFUSALS,
    RATE_LIMITED,
    THIRD_PARTY_REFUSALS,
    UNSOLICITED,
    DATAPLANE_CHANGES,
    CONNTRACK_REMOVED,
    CONNTRACK_DUMPS,
    DATAPLANE_LATENCY,
    EPOCH_START,
    BUILD_INFO,
    READY,
    HANDOFFS,
    JOURNAL_LATENCY,
    JOURNAL_ERRORS,
    STATE_WRITABLE,
    SUBSCRIBERS,
    POOL_EXHAUSTED,
    CLUSTER_OWNED,
    CLUSTER_CHANGES,
    CLUSTER_TXN_LATENCY,
    CLUSTER_FAILURES,
    CLUSTER_TAKEOVER,
    CLUSTER_CERTAIN,
];

/// What a shard holds, for the gauges.
#[derive(Debug, Clone, Copy, Default)]
pub struct Held {
    /// Live mappings.
    pub mappings: usize,
    /// Subscribers with a record (a block or a mapping).
    pub subscribers: usize,
}

/// Every metric handle, cloned into each shard.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` gathers.
    pub registry: Registry,
    responses: IntCounterVec,
    drops: IntCounterVec,
    /// Request latency.
    pub latency: Histogram,
    mappings: IntGaugeVec,
    pool_ports: IntGaugeVec,
    pool_blocks: IntGaugeVec,
    pool_blocks_allocated: IntGaugeVec,
    quota: IntCounter,
    rate_limited: IntCounter,
    third_party: IntCounter,
    unsolicited: IntCounter,
    /// Dataplane changes by result.
    pub dataplane_changes: IntCounterVec,
    /// Dataplane batch latency.
    pub dataplane_latency: Histogram,
    /// Epoch start.
    pub epoch_start: IntGauge,
    /// Readiness.
    pub ready: IntGauge,
    /// Datagrams handed to another shard.
    pub handoffs: IntCounter,
    /// Journal group commit latency.
    pub journal_latency: Histogram,
    /// Journal failures.
    pub journal_errors: IntCounter,
    state_writable: IntGaugeVec,
    subscribers: IntGaugeVec,
    pool_exhausted: IntCounter,
    /// Cluster mode (zero on a single node).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub cluster: ClusterMetrics,
}

/// The cluster-mode metrics (registered in every build, so dashboards and
/// docs/metrics.md see one set of names).
#[derive(Clone)]
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub struct ClusterMetrics {
    /// Partitions owned.
    pub owned: IntGauge,
    /// Ownership changes, by change.
    pub changes: IntCounterVec,
    /// etcd write latency.
    pub txn_latency: Histogram,
    /// etcd writes not committed, by reason (unreachable, fenced).
    pub failures: IntCounterVec,
    /// The last takeover's phases (detection, etcd_read, install).
    pub takeover: prometheus::GaugeVec,
    /// Lease certainty.
    pub certain: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are unique constants; a clash is a programming error caught by tests.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!("metric registration failed: {e}");
    }
    c
}

/// The nftables backend's conntrack counts (pcp-dataplane keeps them for
/// every shard), read at each scrape.
#[derive(Clone)]
struct ConntrackCounts {
    removed: IntCounterVec,
    dumps: IntCounter,
    /// One scrape at a time brings the counters up to date.
    sync: Arc<Mutex<()>>,
}

impl ConntrackCounts {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(ConntrackCounts {
            removed: IntCounterVec::new(
                Opts::new(CONNTRACK_REMOVED, "Conntrack entries of removed mappings deleted, by how they were found: index (conntrack's events) or dump (the whole table walked)."),
                &["via"],
            )?,
            dumps: IntCounter::new(CONNTRACK_DUMPS, "Walks of the whole conntrack table: to build the flow index (at start) or rebuild it (events were lost), or at every removal without conntrack events.")?,
            sync: Arc::default(),
        })
    }
}

impl prometheus::core::Collector for ConntrackCounts {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.removed.desc();
        d.extend(self.dumps.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let _one = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let now = pcp_dataplane::flow_stats();
        let catch_up = |c: &IntCounter, to: u64| c.inc_by(to.saturating_sub(c.get()));
        catch_up(
            &self.removed.with_label_values(&["index"]),
            now.removed_by_index,
        );
        catch_up(
            &self.removed.with_label_values(&["dump"]),
            now.removed_by_dump,
        );
        catch_up(&self.dumps, now.dumps);
        let mut out = self.removed.collect();
        out.extend(self.dumps.collect());
        out
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    Ok(reg(r, IntCounter::new(name, help)?))
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Result<IntCounterVec, prometheus::Error> {
    Ok(reg(r, IntCounterVec::new(Opts::new(name, help), &[label])?))
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Result<IntGaugeVec, prometheus::Error> {
    Ok(reg(r, IntGaugeVec::new(Opts::new(name, help), &[label])?))
}

fn histogram(r: &Registry, name: &str, help: &str) -> Result<Histogram, prometheus::Error> {
    let buckets = vec![
        0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5,
        0.005, 0.01, 0.025, 0.1,
    ];
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    Ok(reg(r, Histogram::with_opts(opts)?))
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let m = Metrics {
            responses: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        RESPONSES,
                        "PCP and NAT-PMP requests answered, by opcode and result code.",
                    ),
                    &["opcode", "result"],
                )?,
            ),
            drops: counter_vec(&r, DROPS, "Datagrams dropped without an answer, by reason.", "reason")?,
            latency: histogram(&r, LATENCY, "Time from receiving a request to its reply being ready, in seconds.")?,
            mappings: gauge_vec(&r, MAPPINGS, "Live mappings, by shard.", "shard")?,
            pool_ports: gauge_vec(&r, POOL_PORTS, "Ports in a pool's block area.", "pool")?,
            pool_blocks: gauge_vec(&r, POOL_BLOCKS, "Port blocks in a pool.", "pool")?,
            pool_blocks_allocated: gauge_vec(&r, POOL_BLOCKS_ALLOCATED, "Port blocks held by subscribers.", "pool")?,
            quota: counter(&r, QUOTA_REFUSALS, "Requests answered USER_EX_QUOTA.")?,
            rate_limited: counter(&r, RATE_LIMITED, "Requests refused by the per-subscriber rate limiter.")?,
            third_party: counter(&r, THIRD_PARTY_REFUSALS, "THIRD_PARTY requests refused by policy.")?,
            unsolicited: counter(&r, UNSOLICITED, "Unsolicited ANNOUNCE and mapping update datagrams sent.")?,
            dataplane_changes: counter_vec(&r, DATAPLANE_CHANGES, "Dataplane changes applied, by result.", "result")?,
            dataplane_latency: histogram(&r, DATAPLANE_LATENCY, "Time to apply one batch of dataplane changes, in seconds.")?,
            epoch_start: reg(&r, IntGauge::new(EPOCH_START, "Unix time at which the current PCP epoch began (RFC 6887 section 8.5).")?),
            ready: reg(&r, IntGauge::new(READY, "1 once pcpd answers requests.")?),
            journal_latency: histogram(&r, JOURNAL_LATENCY, "Time of one journal group commit (write and fdatasync), in seconds.")?,
            journal_errors: counter(&r, JOURNAL_ERRORS, "Failed journal commits and snapshots; the batch's changes were answered NO_RESOURCES.")?,
            handoffs: counter(&r, HANDOFFS, "Datagrams passed to the shard owning their subscriber (kernel steering keeps this near zero).")?,
            state_writable: gauge_vec(&r, STATE_WRITABLE, "1 while the shard can make its state durable; 0 while it answers NO_RESOURCES for lack of it.", "shard")?,
            subscribers: gauge_vec(&r, SUBSCRIBERS, "Subscribers holding a port block or a mapping, by shard.", "shard")?,
            pool_exhausted: counter(&r, POOL_EXHAUSTED, "Requests refused NO_RESOURCES because the pool had no free block.")?,
            cluster: ClusterMetrics {
                owned: reg(&r, IntGauge::new(CLUSTER_OWNED, "Partitions this node owns and answers for (cluster mode).")?),
                changes: counter_vec(&r, CLUSTER_CHANGES, "Partition ownership changes of this node: claimed, released, lost.", "change")?,
                txn_latency: histogram(&r, CLUSTER_TXN_LATENCY, "Time of one fenced etcd write transaction, in seconds.")?,
                failures: counter_vec(&r, CLUSTER_FAILURES, "etcd writes not committed, by reason (unreachable, fenced); their requests were answered NO_RESOURCES.", "reason")?,
                takeover: reg(&r, prometheus::GaugeVec::new(Opts::new(CLUSTER_TAKEOVER, "Seconds each phase of this node's last partition takeover took (detection, etcd_read, install)."), &["phase"])?),
                certain: reg(&r, IntGauge::new(CLUSTER_CERTAIN, "1 while this node's etcd lease is certainly alive (cluster mode).")?),
            },
            registry: r,
        };
        let build = IntGaugeVec::new(
            Opts::new(BUILD_INFO, "Build information; always 1."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        reg(&m.registry, build);
        reg(&m.registry, ConntrackCounts::new()?);
        for name in pcp_engine::Stats::ROWS {
            // Pre-create the common series so rates start at zero.
            let success = pcp_wire::ResultCode::Success.name();
            m.responses.with_label_values(&[name, success]);
        }
        Ok(m)
    }

    /// Sets whether shard `shard` can make its state durable.
    pub fn state_writable(&self, shard: usize, writable: bool) {
        self.state_writable
            .with_label_values(&[&shard.to_string()])
            .set(i64::from(writable));
    }

    /// Adds the difference between two snapshots of a shard's stats.
    pub fn publish(&self, prev: &Stats, now: &Stats, shard: usize, held: Held) {
        for (row, name) in Stats::ROWS.iter().enumerate() {
            for (code, (a, b)) in prev.responses[row]
                .iter()
                .zip(now.responses[row].iter())
                .enumerate()
            {
                if b > a {
                    let result = pcp_wire::ResultCode::from(code as u8).name();
                    self.responses
                        .with_label_values(&[name, result])
                        .inc_by(b - a);
                }
            }
        }
        for (reason, n) in &now.drops {
            let before = prev.drops.get(reason).copied().unwrap_or(0);
            if *n > before {
                self.drops.with_label_values(&[reason]).inc_by(n - before);
            }
        }
        self.quota
            .inc_by(now.quota_refusals.saturating_sub(prev.quota_refusals));
        self.rate_limited
            .inc_by(now.rate_limited.saturating_sub(prev.rate_limited));
        self.third_party.inc_by(
            now.third_party_refusals
                .saturating_sub(prev.third_party_refusals),
        );
        self.unsolicited
            .inc_by(now.unsolicited.saturating_sub(prev.unsolicited));
        self.pool_exhausted
            .inc_by(now.pool_exhausted.saturating_sub(prev.pool_exhausted));
        let shard = shard.to_string();
        self.mappings
            .with_label_values(&[&shard])
            .set(held.mappings as i64);
        self.subscribers
            .with_label_values(&[&shard])
            .set(held.subscribers as i64);
    }

    /// Counts drops the I/O layer decided (queue full, send failure).
    pub fn drop_io(&self, reason: &str) {
        self.drop_io_n(reason, 1);
    }

    /// Counts `n` datagrams dropped for `reason`.
    pub fn drop_io_n(&self, reason: &str, n: u64) {
        self.drops.with_label_values(&[reason]).inc_by(n);
    }

    /// Sets the pool gauges.
    pub fn pools(&self, usage: &[PoolUsage]) {
        for u in usage {
            self.pool_ports
                .with_label_values(&[&u.name])
                .set(u.ports_total as i64);
            self.pool_blocks
                .with_label_values(&[&u.name])
                .set(u.blocks_total as i64);
            self.pool_blocks_allocated
                .with_label_values(&[&u.name])
                .set(u.blocks_allocated as i64);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut buf) {
            tracing::error!("metrics encoding failed: {e}");
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    /// docs/metrics.md documents every metric the registry exposes.
    #[test]
    fn every_metric_is_documented() {
        let m = super::Metrics::new().expect("metrics");
        m.latency.observe(0.001);
        let doc = include_str!("../../../docs/metrics.md");
        m.drop_io("x");
        m.dataplane_changes.with_label_values(&["ok"]).inc();
        m.publish(
            &Default::default(),
            &Default::default(),
            0,
            super::Held::default(),
        );
        m.pools(&[]);
        let text = m.render();
        let rendered: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for n in &rendered {
            assert!(super::ALL.contains(n), "{n} is not in metrics::ALL");
        }
        for n in super::ALL {
            assert!(doc.contains(&format!("`{n}`")), "docs/metrics.md lacks {n}");
        }
    }
}
