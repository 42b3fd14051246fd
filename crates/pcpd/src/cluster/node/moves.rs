//! Partitions changing hands: claim and load, release (planned handover,
//! failback, leave), forget once another node owns one.

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use pcp_engine::shard_of;
use pcp_store::Record;
use tokio::sync::oneshot;

use super::{Node, Owner, PAGE, PAGE_BYTES, POLL};
use crate::cluster::PartState;
use crate::shard::{Control, Restore, RestoreReport};

impl Node {
    /// Claims `p` (if still free), loads its state, and answers for it.
    pub(super) async fn claim(&mut self, p: usize) -> Result<(), etcd_client::Error> {
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
        let total = self.install(restores).await;
        let install = install_started.elapsed();
        self.own.set_state(p, PartState::Active);
        self.metrics.changes.with_label_values(&["claimed"]).inc();
        let phases = [
            ("detection", detected.unwrap_or_default()),
            ("etcd_read", read),
            ("install", install),
        ];
        for (phase, d) in phases {
            let gauge = self.metrics.takeover.with_label_values(&[phase]);
            gauge.set(d.as_secs_f64());
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

    /// Hands each shard its share of a partition read from etcd.
    pub(super) async fn install(&mut self, restores: Vec<Restore>) -> RestoreReport {
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
        total
    }

    /// Reads a partition's blocks and mappings, in pages at one revision,
    /// split by the shard that owns each subscriber, in engine time.
    pub(super) async fn read_partition(
        &mut self,
        name: &str,
    ) -> Result<Vec<Restore>, etcd_client::Error> {
        let prefix = self.keys.state(name);
        let mut end = prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1; // '/' + 1: the end of the prefix's range
        }
        let n = self.shards.len();
        let mut out: Vec<Restore> = (0..n).map(|_| Restore::default()).collect();
        let offset = -crate::clock::wall_offset_ms();
        let mut from = prefix.into_bytes();
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(PAGE_BYTES);
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let page = kv.get(from.clone(), Some(opts)).await?;
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
    pub(super) async fn release(&mut self, p: usize) {
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

    pub(super) async fn forget(&mut self, p: usize, uninstall: bool) {
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

    pub(super) async fn handover(&mut self, name: &str) -> Result<(), String> {
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
    pub(super) async fn leave(&mut self) {
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
            lease.task.abort();
            let _ = self.client.lease_revoke(lease.id).await;
        }
        self.update_owned_gauge();
        tracing::info!(node = %self.own.node, "left the cluster");
    }
}
