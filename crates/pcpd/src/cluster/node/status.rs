//! `GET /v1/cluster`: the cluster as this node sees it.

use serde::Serialize;
use tokio::sync::oneshot;

use super::Node;
use crate::shard::Control;

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

impl Node {
    pub(super) async fn status(&mut self) -> ClusterStatus {
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
}
