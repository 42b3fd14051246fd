//! The `cluster:` section: how pcpd joins a cluster coordinated through
//! etcd, and how the operator's pools are cut into partitions.
//!
//! A partition is a set of subscriber prefixes together with the external
//! prefixes their blocks come from (docs/architecture.md "Cluster"). Both
//! move between nodes together, because routing sends both to the owner.
//! In cluster mode the engine sees one subscriber class and one pool per
//! partition, in the order of `cluster.partitions`: the class index is the
//! partition index, and the pool is named after the partition.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};
use pcp_engine::config::{ClassKind, PoolConfig, SubscriberClass};
use pcp_engine::EngineConfig;
use serde::{Deserialize, Serialize};

/// `cluster:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name; default: `$PCPD_NODE`, else the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The etcd cluster.
    pub etcd: EtcdConfig,
    /// TTL of the node's etcd lease, in seconds: a dead node's partitions
    /// are taken over this long after its last keep-alive.
    #[serde(default = "default_ttl")]
    pub lease_ttl_secs: u64,
    /// A node stops answering for its partitions this long before its lease
    /// could have expired without a keep-alive, in milliseconds.
    #[serde(default = "default_margin")]
    pub margin_ms: u64,
    /// A mapping is written to etcd with an expiry this many lifetimes past
    /// the one granted, so that renewals within it cost no write (no client
    /// is ever told an expiry later than the one etcd holds).
    #[serde(default = "default_slack")]
    pub renewal_slack: u32,
    /// The partitions, in a fixed order every node shares.
    pub partitions: Vec<PartitionConfig>,
}

/// `cluster.etcd`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://10.0.0.1:2379`, or `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster's keys.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Timeout of each etcd call, in milliseconds; a write that takes
    /// longer is not acknowledged (the client gets NO_RESOURCES).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// TLS to etcd (e.g. files from a mounted Kubernetes Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTls>,
}

/// `cluster.etcd.tls`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA certificate that signed the members' certificates (PEM).
    pub ca: PathBuf,
    /// Client certificate (PEM), for etcd's `--client-cert-auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// `cluster.partitions[]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    /// Name (letters, digits, `-`, `_`): the etcd keys and the pool's name.
    pub name: String,
    /// Subscriber prefixes, each inside one of `pcp.subscribers` (whose
    /// quota profile they keep).
    pub subscribers: Vec<IpNet>,
    /// The `pcp.pools` entry whose settings the partition's pool takes.
    pub pool: String,
    /// External prefixes, inside that pool's, disjoint from every other
    /// partition's.
    pub external: Vec<Ipv4Net>,
    /// Nodes that should own it, most preferred first; other nodes take it
    /// only when none of these is up.
    #[serde(default)]
    pub prefer: Vec<String>,
}

fn default_ttl() -> u64 {
    5
}
fn default_margin() -> u64 {
    1000
}
fn default_slack() -> u32 {
    2
}
fn default_prefix() -> String {
    "/pcpd".into()
}
fn default_timeout() -> u64 {
    2000
}

/// A problem with its YAML path.
pub type Problem = (String, String);

impl ClusterConfig {
    /// This node's name.
    pub fn node_name(&self) -> String {
        self.node
            .clone()
            .or_else(|| std::env::var("PCPD_NODE").ok().filter(|s| !s.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| "pcpd".into())
    }

    /// Checks the section against the engine configuration it cuts up.
    pub fn validate(&self, pcp: &EngineConfig) -> Vec<Problem> {
        let mut p: Vec<Problem> = Vec::new();
        self.validate_timing(&mut p);
        if self.partitions.is_empty() {
            p.push((
                "cluster.partitions".into(),
                "at least one partition is needed".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, part) in self.partitions.iter().enumerate() {
            if !names.insert(&part.name) {
                let msg = format!("{:?} is used twice", part.name);
                p.push((format!("cluster.partitions[{i}].name"), msg));
            }
            self.validate_partition(i, pcp, &mut p);
        }
        // Cluster mode serves the partitions, cut from pools; a firewall
        // class has no pool to cut, and would silently not be served.
        for (i, class) in pcp.subscribers.iter().enumerate() {
            if class.kind == ClassKind::Firewall {
                p.push((
                    format!("pcp.subscribers[{i}].kind"),
                    "cluster mode serves NAT classes only: run firewall classes on a node without `cluster`".into(),
                ));
            }
        }
        p
    }

    /// etcd endpoints and the lease's timing.
    fn validate_timing(&self, p: &mut Vec<Problem>) {
        let mut err = |path: &str, msg: String| p.push((path.to_string(), msg));
        if self.etcd.endpoints.is_empty() {
            err(
                "cluster.etcd.endpoints",
                "at least one endpoint is needed".into(),
            );
        }
        for (i, e) in self.etcd.endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                let msg = format!("{e:?}: must start with http:// or https://");
                err(&format!("cluster.etcd.endpoints[{i}]"), msg);
            }
        }
        if !self.etcd.prefix.starts_with('/') {
            err("cluster.etcd.prefix", "must start with /".into());
        }
        let ttl_ms = self.lease_ttl_secs * 1000;
        if !(2..=60).contains(&self.lease_ttl_secs) {
            err(
                "cluster.lease_ttl_secs",
                format!("{}: must be 2 to 60", self.lease_ttl_secs),
            );
        }
        if self.margin_ms == 0 || self.margin_ms * 2 > ttl_ms {
            err(
                "cluster.margin_ms",
                "must be above 0 and at most half the lease TTL".into(),
            );
        }
        if self.etcd.timeout_ms == 0 || self.etcd.timeout_ms >= ttl_ms {
            err(
                "cluster.etcd.timeout_ms",
                "must be above 0 and below the lease TTL".into(),
            );
        }
    }

    /// Partition `i`: its name, pool, and prefixes (inside the pool and
    /// the subscriber classes, disjoint from the partitions before it).
    fn validate_partition(&self, i: usize, pcp: &EngineConfig, p: &mut Vec<Problem>) {
        let part = &self.partitions[i];
        let at = format!("cluster.partitions[{i}]");
        let mut err = |path: String, msg: String| p.push((path, msg));
        let name_ok = !part.name.is_empty()
            && part
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            err(
                format!("{at}.name"),
                format!("{:?}: letters, digits, - and _ only", part.name),
            );
        }
        let Some(pool) = pcp.pools.get(&part.pool) else {
            err(
                format!("{at}.pool"),
                format!("{:?} is not in pcp.pools", part.pool),
            );
            return;
        };
        if part.external.is_empty() {
            err(
                format!("{at}.external"),
                "at least one prefix is needed".into(),
            );
        }
        if part.subscribers.is_empty() {
            err(
                format!("{at}.subscribers"),
                "at least one prefix is needed".into(),
            );
        }
        let earlier = &self.partitions[..i];
        for (j, x) in part.external.iter().enumerate() {
            if !pool.prefixes.iter().any(|n| n.contains(x)) {
                err(
                    format!("{at}.external[{j}]"),
                    format!("{x} is not inside pool {:?}", part.pool),
                );
            }
            if let Some(msg) = overlap(earlier, IpNet::V4(*x), |o| {
                o.external.iter().map(|n| IpNet::V4(*n)).collect()
            }) {
                err(format!("{at}.external[{j}]"), msg);
            }
        }
        for (j, s) in part.subscribers.iter().enumerate() {
            match class_of(pcp, s) {
                None => {
                    let msg = format!("{s} is not inside any pcp.subscribers prefix");
                    err(format!("{at}.subscribers[{j}]"), msg);
                }
                // A partition is a share of a pool; a firewall class has none.
                Some(c) if c.kind == ClassKind::Firewall => {
                    let msg = format!(
                        "{s} is in a firewall class: cluster partitions are of NAT classes only"
                    );
                    err(format!("{at}.subscribers[{j}]"), msg);
                }
                Some(_) => {}
            }
            if let Some(msg) = overlap(earlier, *s, |o| o.subscribers.clone()) {
                err(format!("{at}.subscribers[{j}]"), msg);
            }
        }
    }

    /// The engine configuration of cluster mode: one subscriber class and
    /// one pool per partition, in partition order. Call after `validate`.
    pub fn engine_config(&self, pcp: &EngineConfig) -> EngineConfig {
        let mut out = pcp.clone();
        let mut pools = BTreeMap::new();
        let mut classes = Vec::new();
        for part in &self.partitions {
            let base = &pcp.pools[&part.pool];
            pools.insert(
                part.name.clone(),
                PoolConfig {
                    prefixes: part.external.clone(),
                    ..base.clone()
                },
            );
            let profile = part
                .subscribers
                .first()
                .and_then(|s| class_of(pcp, s))
                .map_or_else(String::new, |c| c.profile.clone());
            classes.push(SubscriberClass {
                prefixes: part.subscribers.clone(),
                kind: ClassKind::Nat,
                pool: part.name.clone(),
                profile,
            });
        }
        out.pools = pools;
        out.subscribers = classes;
        out
    }
}

/// Checks `cfg.cluster` (if any) and, when it holds, replaces the engine
/// configuration by the partitions' (one class and one pool each).
pub(crate) fn apply(cfg: &mut crate::config::Config) -> Vec<crate::config::Problem> {
    let Some(cluster) = &cfg.cluster else {
        return Vec::new();
    };
    let problem = |path: String, message: String| crate::config::Problem {
        path,
        line: None,
        message,
    };
    if !cfg!(feature = "cluster") {
        let msg = "this pcpd was built without cluster mode (cargo feature `cluster`)";
        return vec![problem("cluster".into(), msg.into())];
    }
    let found = cluster.validate(&cfg.pcp);
    if !found.is_empty() {
        return found.into_iter().map(|(p, m)| problem(p, m)).collect();
    }
    cfg.pcp = cluster.engine_config(&cfg.pcp);
    cfg.pcp
        .validate()
        .into_iter()
        .map(|p| problem(format!("cluster.partitions (as pcp.{})", p.path), p.message))
        .collect()
}

/// Which earlier partition, if any, has a prefix (of the kind `prefixes`
/// gives) overlapping `net`, said as a problem.
fn overlap(
    earlier: &[PartitionConfig],
    net: IpNet,
    prefixes: impl Fn(&PartitionConfig) -> Vec<IpNet>,
) -> Option<String> {
    let k = earlier.iter().position(|o| {
        prefixes(o)
            .iter()
            .any(|o| o.contains(&net) || net.contains(o))
    })?;
    Some(format!(
        "{net} overlaps partition {k} ({:?})",
        earlier[k].name
    ))
}

/// The configured class a partition's subscriber prefix lies in.
fn class_of<'a>(pcp: &'a EngineConfig, net: &IpNet) -> Option<&'a SubscriberClass> {
    pcp.subscribers
        .iter()
        .find(|c| c.prefixes.iter().any(|n| n.contains(net)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_partitions_are_refused_with_their_yaml_paths() {
        let cfg = crate::config::Config::builtin();
        let cluster: ClusterConfig = serde_yaml::from_str(
            "etcd: { endpoints: [http://127.0.0.1:2379] }\n\
             partitions:\n\
             - { name: p0, subscribers: [100.64.0.0/16], pool: default, external: [192.0.2.0/25] }\n\
             - { name: p1, subscribers: [100.64.1.0/24], pool: default, external: [192.0.2.64/26] }\n\
             - { name: p2, subscribers: [10.0.0.0/8], pool: nope, external: [192.0.2.128/25] }\n",
        )
        .unwrap();
        let problems = cluster.validate(&cfg.pcp);
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "cluster.partitions[1].external[0]",
                "cluster.partitions[1].subscribers[0]",
                "cluster.partitions[2].pool",
            ],
            "{problems:?}"
        );
        assert!(problems[0].1.contains("overlaps partition 0 (\"p0\")"));
    }

    #[test]
    fn firewall_classes_are_refused_in_cluster_mode_not_dropped() {
        let mut cfg = crate::config::Config::builtin();
        let fw: SubscriberClass = serde_yaml::from_str(
            "{ prefixes: [\"2001:db8:f00::/64\"], kind: firewall, profile: residential }",
        )
        .unwrap();
        cfg.pcp.subscribers.push(fw);
        let cluster: ClusterConfig = serde_yaml::from_str(
            "etcd: { endpoints: [http://127.0.0.1:2379] }\n\
             partitions:\n\
             - { name: p0, subscribers: [2001:db8:f00::/64], pool: default, external: [192.0.2.0/25] }\n",
        )
        .unwrap();
        let problems = cluster.validate(&cfg.pcp);
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "cluster.partitions[0].subscribers[0]",
                "pcp.subscribers[1].kind"
            ],
            "{problems:?}"
        );
    }
}
