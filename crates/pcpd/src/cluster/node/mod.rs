//! The node task: this pcpd's membership of the cluster, on the daemon's
//! runtime. Every `POLL` it keeps its lease alive, reads who owns what
//! (`owner/`) and who is up (`nodes/`), and acts:
//!
//! * **claim** a partition nobody owns when this node is first in line
//!   (preferred nodes in order, then the others by a hash of partition and
//!   node, each later one waiting `STAGGER` more): an etcd transaction that
//!   succeeds only if the ownership key is absent, bound to the lease;
//! * **load** it: read its blocks and mappings from etcd (paged, at one
//!   revision), install them in each shard's engine and dataplane, then
//!   answer for it;
//! * **release** it (planned handover, SIGTERM, or its preferred node is
//!   back): stop answering, let in-flight batches settle, delete the key
//!   (fenced), keep the kernel entries until the new owner shows up;
//! * **lose** it when the lease is gone: stop answering at once; the state
//!   and the kernel entries stay until another owner is seen.
//!
//! Ownership is read by polling rather than a watch: the ranges are a few
//! keys, a poll is never "missed" (no watch to re-establish after a
//! compaction or a reconnect), and the takeover delay it adds (at most one
//! `POLL`) is small next to the lease TTL.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::config::ClusterConfig;
use super::keys::Keys;
use super::{Ownership, PartState};
use crate::metrics::ClusterMetrics;
use crate::shard::ShardHandle;

/// How often ownership and membership are read.
const POLL: Duration = Duration::from_millis(250);
/// How much longer each node after the first in line waits to claim.
const STAGGER: Duration = Duration::from_millis(400);
/// A preferred node gets its partitions back once it has been up this long.
const FAILBACK_AFTER: Duration = Duration::from_secs(3);
/// Keys read per page when loading a partition. etcd 3.4 walks the whole
/// range's index for every page (its cost is the range, not the limit), so
/// pages are large: 200 000 records are about 30 MB.
const PAGE: i64 = 200_000;
/// Largest page accepted from etcd.
const PAGE_BYTES: usize = 64 << 20;

mod lease;
mod moves;
mod status;

pub use status::ClusterStatus;

/// Requests to the node task.
pub enum NodeCommand {
    /// Hand partition `.0` over to another node.
    Handover(String, oneshot::Sender<Result<(), String>>),
    /// Leave the cluster: hand everything over, wait for new owners.
    Leave(oneshot::Sender<()>),
    /// The cluster as this node sees it.
    Status(oneshot::Sender<ClusterStatus>),
}

/// The handle the daemon and the admin API keep.
#[derive(Clone)]
pub struct NodeHandle {
    /// Commands.
    pub tx: mpsc::Sender<NodeCommand>,
    /// What this node answers for.
    pub ownership: Arc<Ownership>,
    ready: Arc<AtomicBool>,
}

impl NodeHandle {
    /// Whether the node is connected to etcd with a live lease.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Hands every partition to a peer and ends the lease (SIGTERM), before
    /// the shards stop.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(NodeCommand::Leave(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Connects the etcd client (lazily: nothing is sent yet).
pub async fn client(cfg: &ClusterConfig) -> anyhow::Result<Client> {
    use anyhow::Context;
    let mut opts = etcd_client::ConnectOptions::new()
        .with_timeout(Duration::from_millis(cfg.etcd.timeout_ms))
        .with_connect_timeout(Duration::from_millis(cfg.etcd.timeout_ms))
        .with_keep_alive(
            Duration::from_secs(1),
            Duration::from_millis(cfg.etcd.timeout_ms),
        )
        // A member without a leader (quorum lost) refuses at once.
        .with_require_leader(true);
    if let Some(tls) = &cfg.etcd.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("cluster.etcd.tls: {}", p.display()))
        };
        let mut t = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
        if let (Some(c), Some(k)) = (&tls.cert, &tls.key) {
            t = t.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
        }
        opts = opts.with_tls(t);
    }
    Client::connect(&cfg.etcd.endpoints, Some(opts))
        .await
        .context("cluster.etcd.endpoints")
}

/// What a node publishes in its liveness key.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
struct NodeInfo {
    /// Shutting down: never first in line, its partitions go elsewhere.
    #[serde(default)]
    leaving: bool,
    /// Partitions handed over by the operator: this node comes last in
    /// their line (it takes them only when no other node can).
    #[serde(default)]
    cordoned: Vec<String>,
}

/// What the node knows of one partition's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    node: String,
    revision: i64,
}

struct Lease {
    id: i64,
    /// The keep-alive task.
    task: tokio::task::JoinHandle<()>,
    /// Set by the task when etcd says the lease is gone.
    lost: Arc<AtomicBool>,
}

/// The node task's state.
pub struct Node {
    cfg: ClusterConfig,
    keys: Keys,
    client: Client,
    own: Arc<Ownership>,
    shards: Vec<ShardHandle>,
    metrics: ClusterMetrics,
    /// `pcpd_epoch_start_timestamp_seconds`: the cluster's epoch base.
    epoch_gauge: prometheus::IntGauge,
    ready: Arc<AtomicBool>,
    lease: Option<Lease>,
    epoch_start_wall: Option<u64>,
    owners: Vec<Option<Owner>>,
    /// Live nodes, with when this node first saw each.
    nodes: BTreeMap<String, (Instant, NodeInfo)>,
    free_since: Vec<Option<Instant>>,
    owned_until: Vec<Option<Instant>>,
    /// What this node publishes.
    me: NodeInfo,
    last_complaint: Option<Instant>,
}

impl Node {
    /// A node that has not joined yet.
    pub fn new(
        cfg: ClusterConfig,
        client: Client,
        own: Arc<Ownership>,
        shards: Vec<ShardHandle>,
        metrics: &crate::metrics::Metrics,
    ) -> (Node, NodeHandle, mpsc::Receiver<NodeCommand>) {
        let n = own.count();
        let ready = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(16);
        let handle = NodeHandle {
            tx,
            ownership: own.clone(),
            ready: ready.clone(),
        };
        let node = Node {
            keys: Keys::new(&cfg.etcd.prefix),
            cfg,
            client,
            own,
            shards,
            metrics: metrics.cluster.clone(),
            epoch_gauge: metrics.epoch_start.clone(),
            ready,
            lease: None,
            epoch_start_wall: None,
            owners: vec![None; n],
            nodes: BTreeMap::new(),
            free_since: vec![None; n],
            owned_until: vec![None; n],
            me: NodeInfo::default(),
            last_complaint: None,
        };
        (node, handle, rx)
    }

    /// Runs until the daemon stops.
    pub async fn run(mut self, mut rx: mpsc::Receiver<NodeCommand>) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                cmd = rx.recv() => match cmd {
                    Some(NodeCommand::Handover(name, reply)) => {
                        let r = self.handover(&name).await;
                        let _ = reply.send(r);
                    }
                    Some(NodeCommand::Leave(reply)) => {
                        self.leave().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(NodeCommand::Status(reply)) => {
                        let s = self.status().await;
                        let _ = reply.send(s);
                    }
                    None => return,
                },
            }
            if let Err(e) = self.step().await {
                self.complain(&e);
            }
            let certain = crate::clock::now_ms() < self.own.certain_until();
            self.metrics.certain.set(i64::from(certain));
            self.ready
                .store(self.lease.is_some() && certain, Ordering::Release);
        }
    }

    fn complain(&mut self, e: &etcd_client::Error) {
        if self
            .last_complaint
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.last_complaint = Some(Instant::now());
            tracing::error!(
                endpoints = ?self.cfg.etcd.endpoints,
                "etcd: {e}; not ready; partitions are answered only while the lease is certainly alive"
            );
        }
    }

    /// One poll: lease, epoch, membership and ownership, then act.
    async fn step(&mut self) -> Result<(), etcd_client::Error> {
        self.keep_lease().await?;
        if self.epoch_start_wall.is_none() {
            self.join_epoch().await?;
        }
        self.read_cluster().await?;
        if self.last_complaint.take().is_some() {
            tracing::info!("etcd reachable again");
        }
        self.act().await
    }

    /// Acts on what was read: forget partitions another node now owns,
    /// hand preferred ones back, claim free ones when first in line.
    async fn act(&mut self) -> Result<(), etcd_client::Error> {
        for p in 0..self.own.count() {
            let mine = self.own.fence(p);
            match self.owners[p].clone() {
                Some(o) if Some(o.revision) == mine => {
                    if !self.me.leaving && self.should_fail_back(p) {
                        let name = self.own.names[p].clone();
                        tracing::info!(partition = %name, "its preferred node is back: handing it over");
                        self.release(p).await;
                    }
                }
                Some(o) => {
                    if mine.is_some() {
                        // Ours no longer (the lease was replaced while we held it).
                        self.own.set_state(p, PartState::Lost);
                    }
                    if self.own.state(p) == PartState::Lost {
                        tracing::info!(partition = %self.own.names[p], owner = %o.node, "new owner seen: removing this node's entries");
                        self.forget(p, true).await;
                        self.own.set_state(p, PartState::NotOwned);
                    }
                }
                None => {
                    if self.first_in_line(p) {
                        self.claim(p).await?;
                    }
                }
            }
        }
        self.update_owned_gauge();
        Ok(())
    }

    /// The nodes that may claim `p`, in order: preferred, then the others
    /// by a hash of partition and node (rendezvous), then those that
    /// cordoned it; leaving nodes never.
    fn line(&self, p: usize) -> Vec<&str> {
        let prefer = &self.cfg.partitions[p].prefer;
        let name = &self.own.names[p];
        let mut open = Vec::new();
        let mut cordoned = Vec::new();
        for (n, (_, info)) in self.nodes.iter().filter(|(_, (_, i))| !i.leaving) {
            if info.cordoned.contains(name) {
                cordoned.push(n.as_str());
            } else {
                open.push(n.as_str());
            }
        }
        let rank = |n: &&str| match prefer.iter().position(|x| x == n) {
            Some(i) => (0, i as u64),
            None => (1, rendezvous(name, n)),
        };
        open.sort_by_key(rank);
        cordoned.sort_by_key(rank);
        open.extend(cordoned);
        open
    }

    fn first_in_line(&self, p: usize) -> bool {
        if self.me.leaving || self.lease.is_none() {
            return false;
        }
        let Some(free) = self.free_since[p] else {
            return false;
        };
        let line = self.line(p);
        let Some(rank) = line.iter().position(|n| *n == self.own.node) else {
            return false;
        };
        free.elapsed() >= STAGGER * rank as u32
    }

    fn should_fail_back(&self, p: usize) -> bool {
        let line = self.line(p);
        let Some(first) = line.first() else {
            return false;
        };
        *first != self.own.node
            && self.cfg.partitions[p].prefer.iter().any(|n| n == first)
            && self
                .nodes
                .get(*first)
                .is_some_and(|(since, _)| since.elapsed() >= FAILBACK_AFTER)
    }

    fn update_owned_gauge(&self) {
        let n = (0..self.own.count())
            .filter(|p| self.own.state(*p) == PartState::Active)
            .count();
        self.metrics.owned.set(n as i64);
    }
}

/// Rendezvous hash of a partition and a node (FNV-1a): every node computes
/// the same order without talking to the others.
fn rendezvous(partition: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in partition.bytes().chain([0]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
