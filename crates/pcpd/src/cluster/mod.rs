//! Cluster mode: nodes share the CGNAT pools through partitions whose
//! ownership and state live in etcd (docs/architecture.md "Cluster").
//!
//! | file | what lives there |
//! |---|---|
//! | `config.rs` | the `cluster:` section, partitions compiled to pools |
//! | `ownership.rs` | what this node may answer for, read by every shard per request |
//! | `keys.rs` | the etcd key layout and values |
//! | `store.rs` | a shard's writes: fenced, batched etcd transactions |
//! | `node/` | the node task: lease and keep-alive, polling, claim, load, release, leave |
//! | `api.rs` | `/v1/cluster`, handover, per-partition health |
//!
//! The shards never wait on the coordinator: they read [`Ownership`]
//! (atomics) for each request, and write through their own [`store::EtcdStore`]
//! (one transaction per partition and batch, fenced by the ownership key's
//! revision).

pub mod api;
pub mod config;
mod ownership;

#[cfg(feature = "cluster")]
pub use ownership::PartState;
pub use ownership::{Admit, Ownership};

#[cfg(feature = "cluster")]
pub mod keys;
#[cfg(feature = "cluster")]
pub mod node;
#[cfg(feature = "cluster")]
pub mod store;

/// What the daemon sets up before its shards start, in cluster mode.
#[cfg(feature = "cluster")]
pub struct Boot {
    cfg: config::ClusterConfig,
    client: etcd_client::Client,
    link: store::EtcdLink,
    /// What this node answers for.
    pub ownership: std::sync::Arc<Ownership>,
}

#[cfg(feature = "cluster")]
impl Boot {
    /// Builds the client (nothing is sent to etcd yet: an unreachable etcd
    /// at start leaves pcpd running, saying so, and not ready).
    pub fn new(cfg: &config::ClusterConfig, rt: &tokio::runtime::Runtime) -> anyhow::Result<Boot> {
        let node = cfg.node_name();
        let client = rt.block_on(node::client(cfg))?;
        let link = store::EtcdLink {
            kv: client.kv_client(),
            runtime: rt.handle().clone(),
            timeout: std::time::Duration::from_millis(cfg.etcd.timeout_ms),
            keys: keys::Keys::new(&cfg.etcd.prefix),
        };
        tracing::info!(node = %node, endpoints = ?cfg.etcd.endpoints, partitions = cfg.partitions.len(), "cluster mode on etcd");
        Ok(Boot {
            ownership: std::sync::Arc::new(Ownership::new(node, cfg)),
            cfg: cfg.clone(),
            client,
            link,
        })
    }

    /// One shard's share: the ownership and its own etcd writer.
    pub fn shard(&self, metrics: &crate::metrics::Metrics) -> crate::shard::ShardCluster {
        crate::shard::ShardCluster {
            ownership: self.ownership.clone(),
            store: store::EtcdStore::new(
                self.link.clone(),
                self.ownership.clone(),
                self.cfg.renewal_slack,
                metrics.cluster.clone(),
            ),
        }
    }

    /// Starts the node task on `rt`, once the shards run.
    pub fn start(
        self,
        shards: Vec<crate::shard::ShardHandle>,
        metrics: &crate::metrics::Metrics,
        rt: &tokio::runtime::Runtime,
    ) -> node::NodeHandle {
        let (n, handle, rx) =
            node::Node::new(self.cfg, self.client, self.ownership, shards, metrics);
        rt.spawn(n.run(rx));
        handle
    }
}
