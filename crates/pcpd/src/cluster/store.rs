//! A shard's durable state in cluster mode: the records of each batch
//! become fenced etcd transactions, one per partition (and per
//! `MAX_TXN_OPS` keys), all committed before any reply of the batch is
//! sent — the cluster's fsync-before-reply.
//!
//! * **Fencing**: every transaction compares the create revision of this
//!   node's ownership key of the partition. A node that lost the partition
//!   (paused, cut off, slow) cannot overwrite the new owner's state: its
//!   transaction fails, the partition is marked lost, nothing is answered
//!   for it again.
//! * **Renewals cost no write** while the invariant "no client is told an
//!   expiry later than the one etcd holds" holds: a mapping is written with
//!   `renewal_slack` lifetimes beyond the one granted, and a renewal that
//!   changes nothing but an expiry still within it is not written.
//! * **Failures**: when etcd is unreachable the batch is not durable (the
//!   caller takes back what it created and answers NO_RESOURCES, §7.4).
//!   The failed records, and the compensations the caller hands back, are
//!   retried first in the next batch, so etcd converges on memory even if
//!   a transaction that timed out did commit. For a second after a failure,
//!   batches that need a write fail at once rather than each waiting for
//!   the timeout.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, KvClient, Txn, TxnOp};
use pcp_engine::{Mapping, MappingKey, Millis};
use pcp_store::Record;

use super::keys::{Keys, Op};
use super::{Ownership, PartState};
use crate::metrics::ClusterMetrics;

/// etcd's default `--max-txn-ops` is 128; one slot is the fencing compare's
/// due in spirit, and coalesced batches stay well under the 1.5 MiB limit
/// (a record is under 200 bytes).
pub const MAX_TXN_OPS: usize = 127;
/// How long writes fail fast after etcd did not answer for a whole
/// timeout (so that, etcd down, not every batch waits the timeout).
const BACKOFF: Duration = Duration::from_millis(500);
/// Pause between two attempts of a write that failed in transport.
const RETRY: Duration = Duration::from_millis(100);

/// Why a batch is not durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// etcd did not commit in time, or refused the call.
    #[error("etcd: {0}")]
    Unreachable(String),
    /// A partition's ownership key is no longer this node's.
    #[error("partition {0} is no longer owned by this node (fenced)")]
    Fenced(String),
}

/// What is needed to reach etcd from a shard thread.
#[derive(Clone)]
pub struct EtcdLink {
    /// The KV client (cheap to clone).
    pub kv: KvClient,
    /// The runtime the client's connections live on (the daemon's).
    pub runtime: tokio::runtime::Handle,
    /// Timeout of one call.
    pub timeout: Duration,
    /// Keys.
    pub keys: Keys,
}

impl EtcdLink {
    /// Runs `fut` on the daemon's runtime and waits for it from this (shard)
    /// thread, at most the timeout.
    pub fn wait<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, ClusterError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let timeout = self.timeout;
        self.runtime.spawn(async move {
            let r = match tokio::time::timeout(timeout, fut).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(ClusterError::Unreachable(e.to_string())),
                Err(_) => Err(ClusterError::Unreachable(format!(
                    "no answer within {timeout:?}"
                ))),
            };
            let _ = tx.send(r);
        });
        rx.recv_timeout(timeout + Duration::from_millis(200))
            .unwrap_or_else(|_| Err(ClusterError::Unreachable("no answer".into())))
    }
}

/// A mapping as last written: its content, and the expiry etcd holds.
struct Stored {
    mapping: Mapping,
    expires_ms: Millis,
}

/// One shard's writer.
pub struct EtcdStore {
    link: EtcdLink,
    ownership: Arc<Ownership>,
    slack: u32,
    metrics: ClusterMetrics,
    stored: HashMap<MappingKey, Stored>,
    pending: Vec<Record>,
    failed_at: Option<Instant>,
}

/// The put/delete of one batch for one partition, coalesced per key.
#[derive(Default)]
struct PartitionOps {
    index: HashMap<String, usize>,
    ops: Vec<(String, Op)>,
}

impl PartitionOps {
    fn push(&mut self, key: String, op: Op) {
        match self.index.get(&key) {
            Some(&i) => self.ops[i].1 = op,
            None => {
                self.index.insert(key.clone(), self.ops.len());
                self.ops.push((key, op));
            }
        }
    }
}

impl EtcdStore {
    /// A writer for one shard.
    pub fn new(
        link: EtcdLink,
        ownership: Arc<Ownership>,
        slack: u32,
        metrics: ClusterMetrics,
    ) -> Self {
        EtcdStore {
            link,
            ownership,
            slack,
            metrics,
            stored: HashMap::new(),
            pending: Vec::new(),
            failed_at: None,
        }
    }

    /// Records what etcd holds for a mapping loaded from it (a takeover).
    pub fn remember(&mut self, m: &Mapping) {
        self.stored.insert(
            m.key(),
            Stored {
                mapping: m.clone(),
                expires_ms: m.expires_ms,
            },
        );
    }

    /// Forgets what was written for partition `p` (handed over).
    pub fn forget(&mut self, p: usize) {
        let own = &self.ownership;
        self.stored
            .retain(|k, _| own.partition_of(k.internal.addr) != Some(p));
        self.pending
            .retain(|r| record_subscriber(r).and_then(|s| own.partition_of(s)) != Some(p));
    }

    /// Whether records wait to be written again (etcd and memory differ).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Records to write before anything else next time: what failed, and
    /// the caller's compensations for what it took back.
    pub fn retry_later(&mut self, records: impl IntoIterator<Item = Record>) {
        self.pending.extend(records);
    }

    /// Writes `records` (in wall time; `now_wall` is the wall clock).
    /// `Ok` when every one that needs a write is committed.
    pub fn commit(&mut self, records: &[Record], now_wall: Millis) -> Result<(), ClusterError> {
        let mut by_part: HashMap<usize, PartitionOps> = HashMap::new();
        let mut written: Vec<(MappingKey, Option<Stored>)> = Vec::new();
        let mut value = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        for (i, rec) in pending.iter().chain(records).enumerate() {
            let Some(p) = record_subscriber(rec).and_then(|s| self.ownership.partition_of(s))
            else {
                continue;
            };
            if !matches!(
                self.ownership.state(p),
                PartState::Active | PartState::Loading | PartState::Releasing
            ) {
                if i >= pending.len() {
                    // This batch changed a partition that another shard's
                    // fenced write (or the node task) found lost since the
                    // request was admitted: nothing of it may be told.
                    self.pending = pending;
                    self.pending.extend_from_slice(records);
                    return Err(ClusterError::Fenced(self.ownership.names[p].clone()));
                }
                // A retry for a partition that is not ours any more: the
                // owner's state in etcd is the truth.
                continue;
            }
            let rec = match rec {
                Record::Mapping(m) => {
                    let key = m.key();
                    if self.covered(&key, m) {
                        continue;
                    }
                    let mut inflated = m.clone();
                    inflated.expires_ms = self.inflate(m.expires_ms, now_wall);
                    written.push((
                        key,
                        Some(Stored {
                            mapping: m.clone(),
                            expires_ms: inflated.expires_ms,
                        }),
                    ));
                    Record::Mapping(inflated)
                }
                Record::Gone(key) => {
                    written.push((*key, None));
                    rec.clone()
                }
                _ => rec.clone(),
            };
            let name = &self.ownership.names[p];
            if let Some((key, op)) = self.link.keys.record(name, &rec, &mut value) {
                by_part.entry(p).or_default().push(key, op);
            }
        }
        if by_part.is_empty() {
            return Ok(());
        }
        let result = self.send(&by_part);
        match &result {
            Ok(()) => {
                for (key, s) in written {
                    match s {
                        Some(s) => self.stored.insert(key, s),
                        None => self.stored.remove(&key),
                    };
                }
            }
            Err(_) => {
                // Retried first next time (after the caller's compensations).
                self.pending = pending;
                self.pending.extend_from_slice(records);
            }
        }
        result
    }

    /// Whether etcd already holds this mapping as it is, with an expiry at
    /// least as late.
    fn covered(&self, key: &MappingKey, m: &Mapping) -> bool {
        self.stored.get(key).is_some_and(|s| {
            m.expires_ms <= s.expires_ms && {
                // The client's port (for unsolicited messages, §14.2) is
                // refreshed with the next write: a client renewing from a
                // new ephemeral port costs no write.
                let mut same = m.clone();
                same.expires_ms = s.mapping.expires_ms;
                same.durable_ms = s.mapping.durable_ms;
                same.id = s.mapping.id;
                same.client_port = s.mapping.client_port;
                same == s.mapping
            }
        })
    }

    /// The expiry written for one granted until `expires`.
    fn inflate(&self, expires: Millis, now: Millis) -> Millis {
        if expires == Millis::MAX {
            return expires;
        }
        let lifetime = expires.saturating_sub(now);
        expires.saturating_add(lifetime.saturating_mul(u64::from(self.slack)))
    }

    /// The fenced transactions of a batch: per partition, chunks of at
    /// most [`MAX_TXN_OPS`] operations, each comparing the partition's
    /// ownership key's create revision with this node's claim.
    fn transactions(
        &self,
        by_part: &HashMap<usize, PartitionOps>,
    ) -> Result<Vec<(usize, Txn)>, ClusterError> {
        let mut txns: Vec<(usize, Txn)> = Vec::new();
        for (&p, ops) in by_part {
            let fence = self
                .ownership
                .fence(p)
                .ok_or_else(|| ClusterError::Fenced(self.ownership.names[p].clone()))?;
            let owner = self.link.keys.owner(&self.ownership.names[p]);
            for chunk in ops.ops.chunks(MAX_TXN_OPS) {
                let then: Vec<TxnOp> = chunk
                    .iter()
                    .map(|(k, op)| match op {
                        Op::Put(v) => TxnOp::put(k.as_str(), v.clone(), None),
                        Op::Delete => TxnOp::delete(k.as_str(), None),
                    })
                    .collect();
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        owner.as_str(),
                        CompareOp::Equal,
                        fence,
                    )])
                    .and_then(then);
                txns.push((p, txn));
            }
        }
        Ok(txns)
    }

    /// Sends one fenced transaction per partition and chunk, concurrently,
    /// and waits for all of them.
    fn send(&mut self, by_part: &HashMap<usize, PartitionOps>) -> Result<(), ClusterError> {
        if self.failed_at.is_some_and(|t| t.elapsed() < BACKOFF) {
            return Err(ClusterError::Unreachable(
                "etcd did not answer just now".into(),
            ));
        }
        let txns = self.transactions(by_part)?;
        let kv = self.link.kv.clone();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.link.timeout;
        // One attempt may hang on a follower whose leader just died (it
        // waits for the election): give up on it after a quarter of the
        // timeout and send again. Every transaction is idempotent (puts of
        // final values, deletes), so an abandoned attempt that commits late
        // changes nothing.
        let attempt =
            (self.link.timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(1));
        let outcome = self.link.wait(async move {
            loop {
                let error = match tokio::time::timeout(attempt, send_all(&kv, &txns)).await {
                    Ok(Ok(fenced)) => return Ok(fenced),
                    Ok(Err(e)) => e,
                    Err(_) => {
                        etcd_client::Error::InvalidArgs(format!("no answer within {attempt:?}"))
                    }
                };
                if tokio::time::Instant::now() + RETRY >= deadline {
                    return Err(error);
                }
                tracing::debug!("etcd write failed ({error}); retrying");
                tokio::time::sleep(RETRY).await;
            }
        });
        self.metrics
            .txn_latency
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(fenced) if fenced.is_empty() => {
                self.failed_at = None;
                Ok(())
            }
            Ok(fenced) => {
                self.metrics.failures.with_label_values(&["fenced"]).inc();
                for &p in &fenced {
                    self.ownership.set_state(p, PartState::Lost);
                    tracing::error!(
                        partition = %self.ownership.names[p],
                        "a write was refused by fencing: the partition has another owner; not answering for it"
                    );
                }
                Err(ClusterError::Fenced(
                    self.ownership.names[fenced[0]].clone(),
                ))
            }
            Err(e) => {
                self.metrics
                    .failures
                    .with_label_values(&["unreachable"])
                    .inc();
                self.failed_at = Some(Instant::now());
                Err(e)
            }
        }
    }
}

/// Sends every transaction concurrently; returns the partitions whose
/// fencing compare failed.
async fn send_all(kv: &KvClient, txns: &[(usize, Txn)]) -> Result<Vec<usize>, etcd_client::Error> {
    let mut set = tokio::task::JoinSet::new();
    for (p, txn) in txns {
        let (mut kv, p, txn) = (kv.clone(), *p, txn.clone());
        set.spawn(async move { (p, kv.txn(txn).await) });
    }
    let mut fenced = Vec::new();
    let mut failed = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((p, Ok(r))) if !r.succeeded() => fenced.push(p),
            Ok((_, Ok(_))) => {}
            Ok((_, Err(e))) => failed = Some(e),
            Err(e) => failed = Some(etcd_client::Error::InvalidArgs(e.to_string())),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(fenced),
    }
}

/// The subscriber a record belongs to (its partition's key).
fn record_subscriber(r: &Record) -> Option<IpAddr> {
    match r {
        Record::Block { subscriber, .. } | Record::BlockGone { subscriber, .. } => {
            Some(*subscriber)
        }
        Record::Mapping(m) => Some(m.internal_addr),
        Record::Gone(k) => Some(k.internal.addr),
        Record::History(_) => None,
    }
}
