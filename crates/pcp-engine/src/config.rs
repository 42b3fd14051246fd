//! The engine's configuration: lifetimes, pools, subscribers and quota
//! profiles, THIRD_PARTY policy, options. The daemon embeds these types in
//! its YAML file, so every field is documented here once.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub use crate::compat::{Compatibility, DeleteAnswer};
pub use crate::validate::{ConfigProblem, MAX_DYNAMIC_ADDRESSES};

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
    /// Internal prefixes (IPv4; IPv6 for NAT64 or a firewall class). Each
    /// address is one subscriber.
    pub prefixes: Vec<IpNet>,
    /// What a mapping of this class is: a translation (the default) or a
    /// pinhole.
    #[serde(default)]
    pub kind: ClassKind,
    /// Name of the pool external ports come from (NAT classes; a firewall
    /// class has none).
    #[serde(default)]
    pub pool: String,
    /// Name of the quota profile.
    pub profile: String,
}

/// What the PCP-controlled device is for a subscriber class (RFC 6887 §3,
/// the table of §8.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassKind {
    /// NAT44 (IPv4 prefixes) or NAT64 (IPv6 prefixes): external ports come
    /// from the class's pool.
    #[default]
    Nat,
    /// A pure firewall (IPv6 or IPv4): "the mapping is the identity
    /// function" (§3), so the external address and port are the internal
    /// ones, and a MAP opens an inbound pinhole to exactly them.
    Firewall,
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

impl EngineConfig {
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
                kind: ClassKind::Nat,
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
