//! Checks of an [`EngineConfig`] that serde cannot make, each problem
//! with the YAML path of the value.

use ipnet::{IpNet, Ipv4Net};

use crate::config::{ClassKind, EngineConfig, PoolMode};

/// One problem found in a configuration, with the path of the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted path, e.g. `pools.cgnat.block_size`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Largest dynamic pool, in addresses (a /12): beyond any CGNAT's public
/// space, and what keeps the per-address free lists small.
pub const MAX_DYNAMIC_ADDRESSES: u64 = 1 << 20;

/// Problems found so far, each with its path.
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Reports every prefix of `nets` that overlaps one seen before.
    fn overlaps<N: Copy + std::fmt::Display>(
        &mut self,
        at: &str,
        nets: &[N],
        seen: &mut Vec<(String, N)>,
        overlap: impl Fn(&N, &N) -> bool,
    ) {
        for (i, net) in nets.iter().enumerate() {
            for (other, o) in seen.iter() {
                if overlap(net, o) {
                    self.0.push(ConfigProblem {
                        path: format!("{at}.prefixes[{i}]"),
                        message: format!("{net} overlaps {o} of {other}"),
                    });
                }
            }
            seen.push((at.to_string(), *net));
        }
    }
}

impl EngineConfig {
    /// Checks everything serde cannot; returns every problem at once.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut p = Problems(Vec::new());
        self.validate_lifetimes(&mut p);
        self.validate_pools(&mut p);
        self.validate_profiles(&mut p);
        self.validate_subscribers(&mut p);
        self.validate_options(&mut p);
        p.0
    }

    fn validate_lifetimes(&self, p: &mut Problems) {
        let l = &self.lifetimes;
        if l.min == 0 {
            p.add("lifetimes.min", "must be at least 1 second");
        }
        if l.max < l.min {
            p.add(
                "lifetimes.max",
                format!("{} is below lifetimes.min {}", l.max, l.min),
            );
        }
    }

    fn validate_pools(&self, p: &mut Problems) {
        let nat = self.subscribers.iter().any(|c| c.kind == ClassKind::Nat);
        if self.pools.is_empty() && nat {
            p.add("pools", "at least one pool is needed for the NAT classes");
        }
        let mut pool_nets: Vec<(String, Ipv4Net)> = Vec::new();
        for (name, pool) in &self.pools {
            let at = format!("pools.{name}");
            if pool.prefixes.is_empty() {
                p.add(format!("{at}.prefixes"), "at least one prefix is needed");
            }
            p.overlaps(&at, &pool.prefixes, &mut pool_nets, |n, o| {
                n.contains(&o.network()) || o.contains(&n.network())
            });
            // Each address of a dynamic pool has its free list in memory.
            if pool.mode == PoolMode::Dynamic && pool.address_count() > MAX_DYNAMIC_ADDRESSES {
                p.add(
                    format!("{at}.prefixes"),
                    format!(
                        "{} addresses; a dynamic pool takes at most {MAX_DYNAMIC_ADDRESSES} (a /12): split it into pools",
                        pool.address_count()
                    ),
                );
            }
            if pool.ports.is_empty() || pool.ports.first == 0 {
                p.add(format!("{at}.ports"), "first must be >= 1 and <= last");
            }
            if pool.block_size == 0 || u32::from(pool.block_size) > pool.ports.len() {
                p.add(
                    format!("{at}.block_size"),
                    format!(
                        "must be between 1 and the size of the port range ({})",
                        pool.ports.len()
                    ),
                );
            }
        }
    }

    fn validate_profiles(&self, p: &mut Problems) {
        for (name, prof) in &self.profiles {
            if prof.rate_per_sec == 0 || prof.burst == 0 {
                p.add(
                    format!("profiles.{name}"),
                    "rate_per_sec and burst must be >= 1",
                );
            }
            if prof.max_blocks == 0 {
                p.add(format!("profiles.{name}.max_blocks"), "must be >= 1");
            }
        }
    }

    fn validate_subscribers(&self, p: &mut Problems) {
        let mut sub_nets: Vec<(String, IpNet)> = Vec::new();
        for (i, class) in self.subscribers.iter().enumerate() {
            let at = format!("subscribers[{i}]");
            let pool = self.pools.get(&class.pool);
            match class.kind {
                ClassKind::Nat if pool.is_none() => p.add(
                    format!("{at}.pool"),
                    format!("no pool named {:?}", class.pool),
                ),
                // RFC 6887 §3: a firewall's mapping is the identity; there
                // is nothing to take from a pool.
                ClassKind::Firewall if !class.pool.is_empty() => p.add(
                    format!("{at}.pool"),
                    "a firewall class has no pool: its external address and port are the internal ones (RFC 6887 §3)",
                ),
                _ => {}
            }
            if !self.profiles.contains_key(&class.profile) {
                p.add(
                    format!("{at}.profile"),
                    format!("no profile named {:?}", class.profile),
                );
            }
            p.overlaps(&at, &class.prefixes, &mut sub_nets, |n, o| {
                n.contains(&o.network()) || o.contains(&n.network())
            });
            let Some(pool) = pool.filter(|pool| pool.mode == PoolMode::Deterministic) else {
                continue;
            };
            let subs: u128 = class
                .prefixes
                .iter()
                .map(|n| 1u128 << (n.max_prefix_len() - n.prefix_len()).min(64))
                .sum();
            let capacity = u128::from(pool.address_count())
                * u128::from(pool.ports.len() / u32::from(pool.block_size.max(1)));
            if subs > capacity {
                p.add(
                    format!("{at}.prefixes"),
                    format!(
                        "{subs} subscribers do not fit deterministic pool {:?} ({capacity} port ranges of {})",
                        class.pool, pool.block_size
                    ),
                );
            }
        }
    }

    fn validate_options(&self, p: &mut Problems) {
        for (i, rule) in self.third_party.iter().enumerate() {
            if rule.from.is_empty() || rule.for_prefixes.is_empty() {
                p.add(
                    format!("third_party[{i}]"),
                    "both `from` and `for` need at least one prefix",
                );
            }
        }
        if self.options.max_filters == 0 {
            p.add(
                "options.max_filters",
                "RFC 6887 §13.3: at least one filter per mapping must be supported",
            );
        }
        if let Some(prefix) = self.options.prefix64 {
            if ![32, 40, 48, 56, 64, 96].contains(&prefix.prefix_len()) {
                p.add(
                    "options.prefix64",
                    "RFC 6052 allows /32, /40, /48, /56, /64 or /96",
                );
            }
        }
        if !(1..=10).contains(&self.unsolicited.announce_count) {
            p.add(
                "unsolicited.announce_count",
                "RFC 6887 §14.1.3: between 1 and 10",
            );
        }
        if !(1..=10).contains(&self.unsolicited.natpmp_announce_count) {
            p.add(
                "unsolicited.natpmp_announce_count",
                "RFC 6886 §3.2.1: between 1 and 10",
            );
        }
    }
}
