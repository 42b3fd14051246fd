//! What a reload (SIGHUP, `POST /v1/reload`) cannot take while mappings
//! are live: the settings that decide where every mapping lives, and what
//! was opened once at start.

use crate::config::Config;

impl Config {
    /// Why a reload to `new` would strand live mappings, if it would: pools
    /// and subscriber classes decide where every mapping lives, so they
    /// must not change under live state.
    pub fn reload_conflict(&self, new: &Config) -> Option<ReloadConflict> {
        use ReloadConflict as C;
        if self.pcp.pools != new.pcp.pools {
            return Some(C::Pools);
        }
        if self.pcp.subscribers != new.pcp.subscribers {
            return Some(C::Subscribers);
        }
        if self.listen != new.listen || self.shard_count() != new.shard_count() {
            return Some(C::Sockets);
        }
        if self.state_dir != new.state_dir
            || self.journal_max_mib != new.journal_max_mib
            || self.journal_renewal_slack != new.journal_renewal_slack
        {
            return Some(C::State);
        }
        if self.dataplane != new.dataplane {
            return Some(C::Dataplane);
        }
        if self.admin != new.admin || self.metrics != new.metrics {
            return Some(C::Http);
        }
        if self.cluster != new.cluster {
            return Some(C::Cluster);
        }
        if self.nat_sinks() != new.nat_sinks() {
            return Some(C::NatLog);
        }
        None
    }
}

/// A change a reload cannot take while mappings are live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReloadConflict {
    /// Pools decide every external address and block.
    #[error(
        "pcp.pools changed: live mappings and blocks would be stranded; drain and restart instead"
    )]
    Pools,
    /// Classes decide which pool a subscriber's mappings come from.
    #[error("pcp.subscribers changed: subscribers would move between pools; restart instead")]
    Subscribers,
    /// Sockets and shards are opened once.
    #[error("listen or shards changed: restart required")]
    Sockets,
    /// The journal is open.
    #[error("state_dir, journal_max_mib or journal_renewal_slack changed: restart required")]
    State,
    /// The dataplane is open.
    #[error("dataplane changed: restart required")]
    Dataplane,
    /// The HTTP listeners are bound.
    #[error("admin or metrics changed: restart required")]
    Http,
    /// The NAT log's sinks are open (their files, connections, threads).
    #[error(
        "log.nat_sinks or log.nat_events changed: restart required (SIGHUP reopens the files)"
    )]
    NatLog,
    /// Every node must cut the pools the same way.
    #[error("cluster changed: partitions are shared by every node; change them on all nodes and restart each (docs/operations.md, \"Cluster\")")]
    Cluster,
}
