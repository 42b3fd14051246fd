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

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp,
};
use pcp_engine::shard_of;
use pcp_store::Record;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::config::ClusterConfig;
use super::keys::Keys;
use super::{Ownership, PartState};
use crate::metrics::ClusterMetrics;
use crate::shard::{Control, Restore, RestoreReport, ShardHandle};

/// How often ownership and membership are read.
const POLL: Duration = Duration::from_millis(250);
/// How much longer each node after the first in line waits to claim.
const STAGGER: Duration = Duration::from_millis(400);
/// A preferred node gets its partitions back once it has been up this long.
const FAILBACK_AFTER: Duration = Duration::from_secs(3);
/// Keys read per page when loading a partition.
const PAGE: i64 = 5000;

/// Requests to the node task.
pub enum NodeCommand {
    /// Hand partition `.0` over to another node.
    Handover(String, oneshot::Sender<Result<(), String>>),
    /// Leave the cluster: hand everything over, wait for new owners.
    Leave(oneshot::Sender<()>),
    /// The cluster as this node sees it.
    Status(oneshot::Sender<ClusterStatus>),
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// This node.
    pub node: String,
    /// Whether this node holds a lease and knows the cluster's state.
    pub connected: bool,
    /// Until when (Unix ms) this node is sure its lease is alive.
    pub lease_certain_until_ms: u64,
    /// Live nodes.
    pub nodes: Vec<String>,
    /// The partitions.
    pub partitions: Vec<PartitionStatus>,
    /// The cluster's epoch base (Unix ms, RFC 6887 §8.5).
    pub epoch_start_ms: u64,
}

/// One partition in [`ClusterStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    /// Name.
    pub name: String,
    /// Owning node, as last read from etcd.
    pub owner: Option<String>,
    /// This node's view: active, loading, releasing, lost, not_owned.
    pub state: &'static str,
    /// The fencing revision of this node's claim.
    pub fence_revision: Option<i64>,
    /// Mappings this node holds for it.
    pub mappings: usize,
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
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    last_keepalive: Instant,
}

/// The node task's state.
pub struct Node {
    cfg: ClusterConfig,
    keys: Keys,
    client: Client,
    own: Arc<Ownership>,
    shards: Vec<ShardHandle>,
    metrics: ClusterMetrics,
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
        metrics: ClusterMetrics,
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
            metrics,
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

    /// Grants a lease when there is none, and keeps it alive every third
    /// of its TTL. Certainty runs from the time a keep-alive was sent.
    async fn keep_lease(&mut self) -> Result<(), etcd_client::Error> {
        let ttl = self.cfg.lease_ttl_secs;
        if self.lease.is_none() {
            let granted = self.client.lease_grant(ttl as i64, None).await?;
            let sent = crate::clock::now_ms();
            let id = granted.id();
            self.publish(id).await?;
            self.set_certain(sent, granted.ttl());
            tracing::info!(node = %self.own.node, lease = id, ttl, "joined the cluster");
            self.lease = Some(Lease {
                id,
                keeper: None,
                last_keepalive: Instant::now(),
            });
            return Ok(());
        }
        let Some(lease) = &mut self.lease else {
            return Ok(());
        };
        if lease.last_keepalive.elapsed() < Duration::from_millis(ttl * 1000 / 3) {
            return Ok(());
        }
        let id = lease.id;
        if lease.keeper.is_none() {
            lease.keeper = Some(self.client.lease_keep_alive(id).await?);
        }
        let sent = crate::clock::now_ms();
        let timeout = Duration::from_millis(self.cfg.etcd.timeout_ms);
        let answer = match &mut lease.keeper {
            Some((keeper, stream)) => {
                tokio::time::timeout(timeout, async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await
            }
            None => return Ok(()),
        };
        match answer {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                lease.last_keepalive = Instant::now();
                self.set_certain(sent, r.ttl());
                Ok(())
            }
            Ok(Ok(_)) => {
                self.lost_lease();
                Ok(())
            }
            Ok(Err(e)) => {
                lease.keeper = None;
                Err(e)
            }
            Err(_) => {
                lease.keeper = None;
                Err(etcd_client::Error::InvalidArgs(format!(
                    "lease keep-alive: no answer within {timeout:?}"
                )))
            }
        }
    }

    /// Writes this node's liveness key (bound to lease `id`).
    async fn publish(&mut self, id: i64) -> Result<(), etcd_client::Error> {
        let value = serde_json::to_string(&self.me).unwrap_or_default();
        let opts = PutOptions::new().with_lease(id);
        self.client
            .put(self.keys.node(&self.own.node), value, Some(opts))
            .await?;
        Ok(())
    }

    fn set_certain(&self, sent: u64, ttl_secs: i64) {
        let ttl_ms = (ttl_secs.max(0) as u64) * 1000;
        let until = (sent + ttl_ms).saturating_sub(self.cfg.margin_ms);
        self.own.set_certain_until(until);
    }

    /// The lease expired (etcd said so): every partition is lost at once.
    fn lost_lease(&mut self) {
        tracing::error!(
            node = %self.own.node,
            "the etcd lease expired: not answering for any partition; joining again"
        );
        self.own.set_certain_until(0);
        for p in 0..self.own.count() {
            if matches!(
                self.own.state(p),
                PartState::Active | PartState::Loading | PartState::Releasing
            ) {
                self.own.set_state(p, PartState::Lost);
                self.metrics.changes.with_label_values(&["lost"]).inc();
            }
        }
        self.lease = None;
        self.update_owned_gauge();
    }

    /// Reads (or starts) the cluster's epoch base, and gives it to every shard.
    async fn join_epoch(&mut self) -> Result<(), etcd_client::Error> {
        let key = self.keys.epoch();
        let now = crate::clock::wall_ms();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), now.to_string(), None)]);
        self.client.txn(txn).await?;
        let got = self.client.get(key.as_str(), None).await?;
        let wall = got
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok()?.parse::<u64>().ok())
            .unwrap_or(now);
        let engine_ms = pcp_engine::shift_ms(wall, -crate::clock::wall_offset_ms());
        for s in &self.shards {
            let _ = s.control.send(Control::Epoch(engine_ms)).await;
        }
        tracing::info!(epoch_start_ms = wall, "cluster epoch (RFC 6887 §8.5)");
        self.epoch_start_wall = Some(wall);
        Ok(())
    }

    /// Reads who is up and who owns what.
    async fn read_cluster(&mut self) -> Result<(), etcd_client::Error> {
        let nodes = self
            .client
            .get(self.keys.nodes(), Some(GetOptions::new().with_prefix()))
            .await?;
        let owners = self
            .client
            .get(self.keys.owners(), Some(GetOptions::new().with_prefix()))
            .await?;
        let now = Instant::now();
        let mut live = BTreeMap::new();
        for kv in nodes.kvs() {
            let Some(name) = kv.key_str().ok().and_then(|k| k.rsplit('/').next()) else {
                continue;
            };
            let info: NodeInfo = kv
                .value_str()
                .ok()
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default();
            let since = self.nodes.get(name).map_or(now, |(t, _)| *t);
            live.insert(name.to_string(), (since, info));
        }
        self.nodes = live;
        let mut seen: Vec<Option<Owner>> = vec![None; self.own.count()];
        for kv in owners.kvs() {
            let Some(name) = kv.key_str().ok().and_then(|k| k.rsplit('/').next()) else {
                continue;
            };
            if let Some(p) = self.own.names.iter().position(|n| n == name) {
                seen[p] = Some(Owner {
                    node: kv.value_str().unwrap_or_default().to_string(),
                    revision: kv.create_revision(),
                });
            }
        }
        for (p, owner) in seen.into_iter().enumerate() {
            match &owner {
                Some(_) => {
                    self.free_since[p] = None;
                    self.owned_until[p] = Some(now);
                }
                None => {
                    self.free_since[p].get_or_insert(now);
                }
            }
            self.owners[p] = owner;
        }
        Ok(())
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

    /// Claims `p` (if still free), loads its state, and answers for it.
    async fn claim(&mut self, p: usize) -> Result<(), etcd_client::Error> {
        let Some(lease) = self.lease.as_ref().map(|l| l.id) else {
            return Ok(());
        };
        let name = self.own.names[p].clone();
        let key = self.keys.owner(&name);
        let detected = self.owned_until[p].map(|t| t.elapsed());
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                self.own.node.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = self.client.txn(txn).await?;
        if !r.succeeded() {
            return Ok(()); // someone else was faster
        }
        let revision = r.header().map_or(0, |h| h.revision());
        if self.own.state(p) == PartState::Lost {
            // What memory holds may be stale: etcd is the truth.
            self.forget(p, false).await;
        }
        self.own.set_fence(p, revision);
        self.own.set_state(p, PartState::Loading);
        self.owners[p] = Some(Owner {
            node: self.own.node.clone(),
            revision,
        });
        let read_started = Instant::now();
        let restores = match self.read_partition(&name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(partition = %name, "reading the partition's state: {e}; releasing it");
                self.release(p).await;
                return Err(e);
            }
        };
        let read = read_started.elapsed();
        let install_started = Instant::now();
        let mut total = RestoreReport::default();
        for (shard, restore) in self.shards.iter().zip(restores) {
            let (tx, rx) = oneshot::channel();
            if shard
                .control
                .send(Control::Adopt(restore, tx))
                .await
                .is_ok()
            {
                if let Ok(r) = rx.await {
                    total += r;
                }
            }
        }
        let install = install_started.elapsed();
        self.own.set_state(p, PartState::Active);
        self.metrics.changes.with_label_values(&["claimed"]).inc();
        let phases = [
            ("detection", detected.unwrap_or_default()),
            ("etcd_read", read),
            ("install", install),
        ];
        for (phase, d) in phases {
            self.metrics
                .takeover
                .with_label_values(&[phase])
                .set(d.as_secs_f64());
        }
        tracing::info!(
            partition = %name,
            revision,
            mappings = total.mappings,
            blocks = total.blocks,
            dropped = total.dropped + total.blocks_dropped,
            dataplane_failed = total.failed,
            detection_ms = detected.map(|d| d.as_millis() as u64),
            etcd_read_ms = read.as_millis() as u64,
            install_ms = install.as_millis() as u64,
            "partition claimed and loaded; answering for it"
        );
        Ok(())
    }

    /// Reads a partition's blocks and mappings, in pages at one revision,
    /// split by the shard that owns each subscriber, in engine time.
    async fn read_partition(&mut self, name: &str) -> Result<Vec<Restore>, etcd_client::Error> {
        let prefix = self.keys.state(name);
        let mut end = prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1; // '/' + 1: the end of the prefix's range
        }
        let n = self.shards.len();
        let mut out: Vec<Restore> = (0..n).map(|_| Restore::default()).collect();
        let offset = -crate::clock::wall_offset_ms();
        let mut from = prefix.into_bytes();
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let page = self.client.get(from.clone(), Some(opts)).await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            for kv in page.kvs() {
                match pcp_store::decode_record(kv.value()) {
                    Some(mut rec) => {
                        rec.shift(offset);
                        match rec {
                            Record::Block {
                                subscriber,
                                block,
                                since,
                            } => out[shard_of(subscriber, n)]
                                .blocks
                                .push((subscriber, block, since)),
                            Record::Mapping(m) => {
                                out[shard_of(m.internal_addr, n)].mappings.push(m)
                            }
                            _ => {}
                        }
                    }
                    None => {
                        tracing::error!(key = ?kv.key_str(), "etcd: a value pcpd cannot decode; skipped")
                    }
                }
            }
            match page.kvs().last() {
                Some(kv) if page.more() => {
                    from = kv.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// Planned release of `p`: stop answering, wait for in-flight batches,
    /// delete the ownership key (fenced). Kernel entries stay until the new
    /// owner is seen.
    async fn release(&mut self, p: usize) {
        let Some(fence) = self.own.fence(p) else {
            return;
        };
        self.own.set_state(p, PartState::Releasing);
        for s in &self.shards {
            let (tx, rx) = oneshot::channel();
            if s.control.send(Control::Barrier(tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
        let key = self.keys.owner(&self.own.names[p]);
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                fence,
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        if let Err(e) = self.client.txn(txn).await {
            // The key goes with the lease in any case.
            tracing::error!(partition = %self.own.names[p], "releasing: {e}");
        }
        self.own.set_state(p, PartState::Lost);
        self.owners[p] = None;
        self.free_since[p] = Some(Instant::now());
        self.metrics.changes.with_label_values(&["released"]).inc();
        tracing::info!(partition = %self.own.names[p], "partition released");
    }

    async fn forget(&mut self, p: usize, uninstall: bool) {
        for s in &self.shards {
            let (tx, rx) = oneshot::channel();
            if s.control
                .send(Control::Forget(p, uninstall, tx))
                .await
                .is_ok()
            {
                let _ = rx.await;
            }
        }
    }

    async fn handover(&mut self, name: &str) -> Result<(), String> {
        let p = self
            .own
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("no partition {name:?}"))?;
        if self.own.state(p) != PartState::Active {
            return Err(format!("partition {name:?} is not owned by this node"));
        }
        // Cordon first, so no peer hands it straight back (failback).
        if !self.me.cordoned.iter().any(|n| n == name) {
            self.me.cordoned.push(name.to_string());
        }
        if let Some(id) = self.lease.as_ref().map(|l| l.id) {
            self.publish(id).await.map_err(|e| format!("etcd: {e}"))?;
        }
        self.release(p).await;
        Ok(())
    }

    /// SIGTERM: mark this node as leaving (peers stop counting on it),
    /// release every partition, wait (bounded) until each has a new owner
    /// and its entries are removed here, then end the lease.
    async fn leave(&mut self) {
        self.me.leaving = true;
        if let Some(id) = self.lease.as_ref().map(|l| l.id) {
            if let Err(e) = self.publish(id).await {
                self.complain(&e);
            }
        }
        for p in 0..self.own.count() {
            if self.own.state(p) == PartState::Active {
                self.release(p).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && (0..self.own.count()).any(|p| self.own.state(p) == PartState::Lost)
        {
            tokio::time::sleep(POLL).await;
            if let Err(e) = self.step().await {
                self.complain(&e);
            }
        }
        if let Some(lease) = self.lease.take() {
            let _ = self.client.lease_revoke(lease.id).await;
        }
        self.update_owned_gauge();
        tracing::info!(node = %self.own.node, "left the cluster");
    }

    async fn status(&mut self) -> ClusterStatus {
        let mut counts = vec![0usize; self.own.count()];
        for s in &self.shards {
            let (tx, rx) = oneshot::channel();
            if s.control.send(Control::Counts(tx)).await.is_ok() {
                if let Ok(c) = rx.await {
                    counts.iter_mut().zip(c).for_each(|(a, b)| *a += b);
                }
            }
        }
        let offset = crate::clock::wall_offset_ms();
        ClusterStatus {
            node: self.own.node.clone(),
            connected: self.lease.is_some(),
            lease_certain_until_ms: pcp_engine::shift_ms(self.own.certain_until(), offset),
            nodes: self.nodes.keys().cloned().collect(),
            epoch_start_ms: self.epoch_start_wall.unwrap_or(0),
            partitions: (0..self.own.count())
                .map(|p| PartitionStatus {
                    name: self.own.names[p].clone(),
                    owner: self.owners[p].as_ref().map(|o| o.node.clone()),
                    state: self.own.state(p).name(),
                    fence_revision: self.own.fence(p),
                    mappings: counts[p],
                })
                .collect(),
        }
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
