//! The engine's configuration: lifetimes, pools, subscribers and quota
//! profiles, THIRD_PARTY policy, options. The daemon embeds these types in
//! its YAML file, so every field is documented here once.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub use crate::compat::{Compatibility, DeleteAnswer};

/// Everything the engine needs to answer requests.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct EngineConfig {
    /// Lifetimes granted to mappings and returned with errors (RFC 6887 §15, §7.4).
    #[serde(default)]
    pub lifetimes: Lifetimes,
    /// External address pools, by name.
    pub pools: BTreeMap<String, PoolConfig>,
    /// Quota profiles, by name.
    pub profiles: BTreeMap<String, QuotaProfile>,
    /// Subscriber classes: internal prefixes, their pool and quota profile.
    pub subscribers: Vec<SubscriberClass>,
    /// THIRD_PARTY authorization (RFC 6887 §13.1). Empty: the option is disabled.
    #[serde(default)]
    pub third_party: Vec<ThirdPartyRule>,
    /// Which options are processed.
    #[serde(default)]
    pub options: OptionSettings,
    /// Answer NAT-PMP (RFC 6886) on the PCP port.
    #[serde(default = "yes")]
    pub natpmp: bool,
    /// Transport protocols mappings may be made for (IANA numbers). Others
    /// answer UNSUPP_PROTOCOL (RFC 6887 §11.3).
    #[serde(default = "default_protocols")]
    pub protocols: Vec<u8>,
    /// How many times an unsolicited message is sent (RFC 6887 §14.1.3 allows
    /// up to 10 for ANNOUNCE; §14.2 asks 3 for mapping updates).
    #[serde(default)]
    pub unsolicited: UnsolicitedSettings,
    /// Allocation history kept for "who held external IP:port at time T", in
    /// seconds (dynamic pools; deterministic ones are computed).
    #[serde(default = "default_history_retention")]
    pub history_retention_secs: u64,
    /// Upper bound on history records kept in memory per shard.
    #[serde(default = "default_history_max")]
    pub history_max_records: usize,
    /// Departures from the RFC for deployed clients; all off by default.
    #[serde(default)]
    pub compatibility: Compatibility,
}

fn yes() -> bool {
    true
}

fn default_protocols() -> Vec<u8> {
    vec![6, 17]
}

fn default_history_retention() -> u64 {
    7 * 24 * 3600
}

fn default_history_max() -> usize {
    1_000_000
}

/// Mapping and error lifetimes, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Lifetimes {
    /// Shortest lifetime granted (RFC 6887 §15: SHOULD be 120 s).
    #[serde(default = "default_min")]
    pub min: u32,
    /// Longest lifetime granted (RFC 6887 §15: 24 h when nothing better is known).
    #[serde(default = "default_max")]
    pub max: u32,
    /// Lifetime of "short lifetime" errors (RFC 6887 §7.4 recommends 30 s).
    #[serde(default = "default_short_error")]
    pub short_error: u32,
    /// Lifetime of "long lifetime" errors (RFC 6887 §7.4 recommends 30 min).
    #[serde(default = "default_long_error")]
    pub long_error: u32,
}

fn default_min() -> u32 {
    120
}
fn default_max() -> u32 {
    86_400
}
fn default_short_error() -> u32 {
    30
}
fn default_long_error() -> u32 {
    1_800
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            min: default_min(),
            max: default_max(),
            short_error: default_short_error(),
            long_error: default_long_error(),
        }
    }
}

/// How external ports are handed to subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// Port-block allocation: blocks on first need, all of a subscriber's
    /// blocks on one external address (RFC 6888 REQ-2, paired pooling).
    Dynamic,
    /// RFC 7422: address and port range are a function of the internal address.
    Deterministic,
}

/// An external address pool.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// External IPv4 prefixes (every address in them is used).
    pub prefixes: Vec<Ipv4Net>,
    /// Usable external port range, inclusive (default 1024-65535).
    #[serde(default)]
    pub ports: PortRange,
    /// Ports per block (dynamic) or per subscriber (deterministic).
    #[serde(default = "default_block_size")]
    pub block_size: u16,
    /// Allocation mode.
    pub mode: PoolMode,
    /// Seconds a released external port stays unused (RFC 6888 REQ-8, RFC 6887 §15).
    #[serde(default = "default_reuse_delay")]
    pub reuse_delay_secs: u32,
    /// Seconds a dynamic block is kept after its last mapping is gone.
    #[serde(default = "default_block_hold")]
    pub block_hold_secs: u32,
}

fn default_block_size() -> u16 {
    512
}
fn default_reuse_delay() -> u32 {
    120
}
fn default_block_hold() -> u32 {
    300
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            first: 1024,
            last: 65535,
        }
    }
}

impl PoolConfig {
    /// Number of external addresses in the pool.
    pub fn address_count(&self) -> u64 {
        self.prefixes
            .iter()
            .map(|n| 1u64 << (32 - u32::from(n.prefix_len())))
            .sum()
    }
}

impl PortRange {
    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.last).saturating_sub(u32::from(self.first)) + 1
    }

    /// True when the range is inverted.
    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }
}

/// Limits that apply to each subscriber of a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaProfile {
    /// Explicit (PCP/NAT-PMP created) mappings at once; PORT_SET counts each port.
    pub max_mappings: u32,
    /// Port blocks at once (dynamic pools).
    #[serde(default = "one")]
    pub max_blocks: u32,
    /// Sustained requests per second (token bucket rate).
    #[serde(default = "default_rate")]
    pub rate_per_sec: u32,
    /// Token bucket depth.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn one() -> u32 {
    1
}
fn default_rate() -> u32 {
    10
}
fn default_burst() -> u32 {
    50
}

/// A class of subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberClass {
    /// Internal prefixes (IPv4, or IPv6 for NAT64). Each address is one subscriber.
    pub prefixes: Vec<IpNet>,
    /// Name of the pool external ports come from.
    pub pool: String,
    /// Name of the quota profile.
    pub profile: String,
}

/// Who may use THIRD_PARTY for whom (RFC 6887 §13.1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThirdPartyRule {
    /// Source prefixes of authorized management clients.
    pub from: Vec<IpNet>,
    /// Internal prefixes they may act for.
    #[serde(rename = "for")]
    pub for_prefixes: Vec<IpNet>,
}

/// Option processing switches.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OptionSettings {
    /// Process PREFER_FAILURE (RFC 6887 §13.2); when off it answers UNSUPP_OPTION.
    #[serde(default = "yes")]
    pub prefer_failure: bool,
    /// Process FILTER (RFC 6887 §13.3); when off it answers UNSUPP_OPTION.
    #[serde(default = "yes")]
    pub filter: bool,
    /// Most remote-peer filters per mapping (at least 1, §13.3).
    #[serde(default = "default_max_filters")]
    pub max_filters: usize,
    /// Store and echo DESCRIPTION (RFC 7220).
    #[serde(default = "yes")]
    pub description: bool,
    /// Honour PORT_SET (RFC 7753).
    #[serde(default = "yes")]
    pub port_set: bool,
    /// Largest port set granted in one mapping.
    #[serde(default = "default_max_port_set")]
    pub max_port_set: u16,
    /// NAT64 prefix answered in PREFIX64 (RFC 7225); none: never sent.
    #[serde(default)]
    pub prefix64: Option<Ipv6Net>,
}

fn default_max_filters() -> usize {
    8
}
fn default_max_port_set() -> u16 {
    64
}

impl Default for OptionSettings {
    fn default() -> Self {
        OptionSettings {
            prefer_failure: true,
            filter: true,
            max_filters: default_max_filters(),
            description: true,
            port_set: true,
            max_port_set: default_max_port_set(),
            prefix64: None,
        }
    }
}

/// Unsolicited message settings (RFC 6887 §14).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UnsolicitedSettings {
    /// Times a restart ANNOUNCE is sent (1..=10; 250 ms apart, then doubling).
    #[serde(default = "default_announce_count")]
    pub announce_count: u8,
    /// Times a mapping update is sent (§14.2: 3, at 0, 250 and 750 ms).
    #[serde(default = "default_update_count")]
    pub update_count: u8,
    /// Where restart ANNOUNCEs go (RFC 6887 §14.1.3: 224.0.0.1 and ff02::1, port 5350).
    #[serde(default = "default_announce_targets")]
    pub announce_targets: Vec<IpAddr>,
    /// Times a NAT-PMP address announcement is sent (1..=10; RFC 6886
    /// §3.2.1: 10, 250 ms apart, then doubling).
    #[serde(default = "default_natpmp_announce_count")]
    pub natpmp_announce_count: u8,
}

fn default_natpmp_announce_count() -> u8 {
    10
}

fn default_announce_count() -> u8 {
    4
}
fn default_update_count() -> u8 {
    3
}
fn default_announce_targets() -> Vec<IpAddr> {
    vec![
        IpAddr::V4(std::net::Ipv4Addr::new(224, 0, 0, 1)),
        IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)),
    ]
}

impl Default for UnsolicitedSettings {
    fn default() -> Self {
        UnsolicitedSettings {
            announce_count: default_announce_count(),
            update_count: default_update_count(),
            announce_targets: default_announce_targets(),
            natpmp_announce_count: default_natpmp_announce_count(),
        }
    }
}

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
        if self.pools.is_empty() {
            p.add("pools", "at least one pool is needed");
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
            if pool.is_none() {
                p.add(
                    format!("{at}.pool"),
                    format!("no pool named {:?}", class.pool),
                );
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

    /// A small configuration for unit tests: subscribers 127.0.0.0/8 and
    /// 100.64.0.0/10 mapped onto 192.0.2.0/24.
    #[cfg(test)]
    pub(crate) fn example() -> Self {
        let mut pools = BTreeMap::new();
        pools.insert(
            "default".to_string(),
            PoolConfig {
                prefixes: vec!["192.0.2.0/24".parse().expect("literal")],
                ports: PortRange::default(),
                block_size: 512,
                mode: PoolMode::Dynamic,
                reuse_delay_secs: default_reuse_delay(),
                block_hold_secs: default_block_hold(),
            },
        );
        let mut profiles = BTreeMap::new();
        profiles.insert(
            "residential".to_string(),
            QuotaProfile {
                max_mappings: 64,
                max_blocks: 4,
                rate_per_sec: default_rate(),
                burst: default_burst(),
            },
        );
        EngineConfig {
            lifetimes: Lifetimes::default(),
            pools,
            profiles,
            subscribers: vec![SubscriberClass {
                prefixes: vec![
                    "127.0.0.0/8".parse().expect("literal"),
                    "100.64.0.0/10".parse().expect("literal"),
                    "::1/128".parse().expect("literal"),
                ],
                pool: "default".into(),
                profile: "residential".into(),
            }],
            third_party: Vec::new(),
            options: OptionSettings::default(),
            natpmp: true,
            protocols: default_protocols(),
            unsolicited: UnsolicitedSettings::default(),
            history_retention_secs: default_history_retention(),
            history_max_records: default_history_max(),
            compatibility: Compatibility::default(),
        }
    }
}
