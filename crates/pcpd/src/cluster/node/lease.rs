//! The node's lease, its liveness key, the cluster epoch, and reading who
//! is up and who owns what.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use super::{Lease, Node, NodeInfo, Owner};
use crate::cluster::{Ownership, PartState};
use crate::shard::Control;

/// Pause before a keep-alive is tried again after a failure.
const KEEPALIVE_RETRY: Duration = Duration::from_millis(200);

/// Keeps lease `id` alive every third of its TTL, on a task of its own so
/// that a long claim (reading a million mappings) never starves it.
/// Certainty runs from the time each keep-alive was sent. Ends, setting
/// `lost`, when etcd says the lease is gone.
async fn keep_alive(
    mut client: etcd_client::Client,
    id: i64,
    cfg: (Duration, Duration, u64),
    own: Arc<Ownership>,
    lost: Arc<AtomicBool>,
) {
    let (every, timeout, margin_ms) = cfg;
    let mut keeper = None;
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        // After a failure (a member died: the stream broke, or the channel
        // picked the dead member), try again soon, not a third of the TTL
        // later: certainty runs out at TTL minus the margin.
        wait = KEEPALIVE_RETRY;
        let sent = crate::clock::now_ms();
        if keeper.is_none() {
            match tokio::time::timeout(timeout, client.lease_keep_alive(id)).await {
                Ok(Ok(k)) => keeper = Some(k),
                // Opening a stream sends the first keep-alive; for a lease
                // that expired (this process was paused past its TTL and the
                // old stream broke meanwhile) the client says so as an
                // error. Retrying would never notice the loss.
                Ok(Err(e)) if lease_gone(&e) => break,
                Ok(Err(_)) | Err(_) => continue,
            }
        }
        let Some((k, stream)) = keeper.as_mut() else {
            continue;
        };
        let answer = tokio::time::timeout(timeout, async {
            k.keep_alive().await?;
            stream.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                let until = (sent + r.ttl() as u64 * 1000).saturating_sub(margin_ms);
                own.set_certain_until(until);
                wait = every;
            }
            Ok(Ok(Some(_))) => break, // TTL 0: expired
            Ok(Err(e)) if lease_gone(&e) => break,
            // The stream ended or etcd did not answer: a new stream next time.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => keeper = None,
        }
    }
    lost.store(true, Ordering::Release);
}

/// Whether etcd answered that the lease no longer exists.
fn lease_gone(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

impl Node {
    /// Grants a lease when there is none (and starts its keep-alive task);
    /// notices when the task found the lease gone.
    pub(super) async fn keep_lease(&mut self) -> Result<(), etcd_client::Error> {
        if self
            .lease
            .as_ref()
            .is_some_and(|l| l.lost.load(Ordering::Acquire))
        {
            self.lost_lease();
        }
        if self.lease.is_some() {
            return Ok(());
        }
        let ttl = self.cfg.lease_ttl_secs;
        let granted = self.client.lease_grant(ttl as i64, None).await?;
        let sent = crate::clock::now_ms();
        let id = granted.id();
        self.publish(id).await?;
        self.set_certain(sent, granted.ttl());
        tracing::info!(node = %self.own.node, lease = id, ttl, "joined the cluster");
        let lost = Arc::new(AtomicBool::new(false));
        let timing = (
            Duration::from_millis(ttl * 1000 / 3),
            Duration::from_millis(self.cfg.etcd.timeout_ms),
            self.cfg.margin_ms,
        );
        let task = tokio::spawn(keep_alive(
            self.client.clone(),
            id,
            timing,
            self.own.clone(),
            lost.clone(),
        ));
        self.lease = Some(Lease { id, task, lost });
        Ok(())
    }

    /// Writes this node's liveness key (bound to lease `id`).
    pub(super) async fn publish(&mut self, id: i64) -> Result<(), etcd_client::Error> {
        let value = serde_json::to_string(&self.me).unwrap_or_default();
        let opts = PutOptions::new().with_lease(id);
        self.client
            .put(self.keys.node(&self.own.node), value, Some(opts))
            .await?;
        Ok(())
    }

    pub(super) fn set_certain(&self, sent: u64, ttl_secs: i64) {
        let ttl_ms = (ttl_secs.max(0) as u64) * 1000;
        let until = (sent + ttl_ms).saturating_sub(self.cfg.margin_ms);
        self.own.set_certain_until(until);
    }

    /// The lease expired (etcd said so): every partition is lost at once.
    pub(super) fn lost_lease(&mut self) {
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
        if let Some(lease) = self.lease.take() {
            lease.task.abort();
        }
        self.update_owned_gauge();
    }

    /// Reads (or starts) the cluster's epoch base, and gives it to every shard.
    pub(super) async fn join_epoch(&mut self) -> Result<(), etcd_client::Error> {
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
        self.epoch_gauge.set((wall / 1000) as i64);
        tracing::info!(epoch_start_ms = wall, "cluster epoch (RFC 6887 §8.5)");
        self.epoch_start_wall = Some(wall);
        Ok(())
    }

    /// Reads who is up and who owns what.
    pub(super) async fn read_cluster(&mut self) -> Result<(), etcd_client::Error> {
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
}
