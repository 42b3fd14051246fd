//! The engine configuration compiled for the request path: subscriber
//! classes sorted for longest-prefix lookup, each class's pool and quota
//! profile resolved to indexes, the PREFIX64 option pre-encoded, and the
//! THIRD_PARTY policy (RFC 6887 §13.1) as two questions.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use pcp_wire::ResultCode;

use crate::alloc::BlockAllocator;
use crate::config::{ClassKind, EngineConfig, QuotaProfile};
use crate::ConfigProblem;

/// One subscriber prefix: its class and where it starts in the class's
/// index space (RFC 7422 numbers subscribers across a class's prefixes).
#[derive(Debug)]
struct ClassPrefix {
    net: IpNet,
    class: u16,
    offset: u64,
}

/// The pool index of a class that has none (a firewall class).
pub(crate) const NO_POOL: u16 = u16::MAX;

/// Compiled configuration shared by every shard.
#[derive(Debug)]
pub struct Compiled {
    pub(crate) config: EngineConfig,
    /// Longest prefix first.
    prefixes: Vec<ClassPrefix>,
    /// Each class's pool index; [`NO_POOL`] for firewall classes.
    pub(crate) class_pool: Vec<u16>,
    /// Whether each class is a firewall class (RFC 6887 §3: identity mappings).
    pub(crate) class_firewall: Vec<bool>,
    pub(crate) class_profile: Vec<QuotaProfile>,
    pub(crate) class_profile_name: Vec<String>,
    pub(crate) prefix64: Option<[u8; 12]>,
    pub(crate) prefix64_len: u8,
}

impl Compiled {
    /// Compiles a configuration, checking it first.
    pub fn new(cfg: EngineConfig, pools: &BlockAllocator) -> Result<Self, Vec<ConfigProblem>> {
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut prefixes = Vec::new();
        let mut class_pool = Vec::new();
        let mut class_firewall = Vec::new();
        let mut class_profile = Vec::new();
        let mut class_profile_name = Vec::new();
        for (ci, class) in cfg.subscribers.iter().enumerate() {
            let mut offset = 0u64;
            for net in &class.prefixes {
                prefixes.push(ClassPrefix {
                    net: *net,
                    class: ci as u16,
                    offset,
                });
                let bits = u32::from(net.max_prefix_len() - net.prefix_len()).min(63);
                offset = offset.saturating_add(1u64 << bits);
            }
            let firewall = class.kind == ClassKind::Firewall;
            class_firewall.push(firewall);
            class_pool.push(match pools.pool_index(&class.pool) {
                Some(i) if !firewall => i as u16,
                _ => NO_POOL,
            });
            class_profile.push(cfg.profiles[&class.profile]);
            class_profile_name.push(class.profile.clone());
        }
        // Longest prefix first, so nested prefixes could be told apart.
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.net.prefix_len()));
        let (prefix64, prefix64_len) = match cfg.options.prefix64 {
            Some(net) => {
                let mut b = [0u8; 12];
                b.copy_from_slice(&net.network().octets()[..12]);
                (Some(b), net.prefix_len() / 8)
            }
            None => (None, 0),
        };
        Ok(Compiled {
            config: cfg,
            prefixes,
            class_pool,
            class_firewall,
            class_profile,
            class_profile_name,
            prefix64,
            prefix64_len,
        })
    }

    /// The index of `addr`'s subscriber class in the configuration's
    /// `subscribers` list (in pcpd's cluster mode, its partition).
    pub fn class_index(&self, addr: IpAddr) -> Option<usize> {
        self.class_of(addr).map(|(c, _)| usize::from(c))
    }

    /// The subscriber class of `addr` and its index within the class.
    pub(crate) fn class_of(&self, addr: IpAddr) -> Option<(u16, u64)> {
        self.prefixes.iter().find_map(|p| {
            p.net.contains(&addr).then(|| {
                let idx = match (p.net, addr) {
                    (IpNet::V4(n), IpAddr::V4(a)) => {
                        u64::from(u32::from(a) - u32::from(n.network()))
                    }
                    (IpNet::V6(n), IpAddr::V6(a)) => {
                        (u128::from(a) - u128::from(n.network())) as u64
                    }
                    _ => 0,
                };
                (p.class, p.offset + idx)
            })
        })
    }

    /// Inverse of [`Compiled::class_of`]: the address with index `idx` in `class`.
    pub(crate) fn address_at(&self, class: u16, idx: u64) -> Option<IpAddr> {
        self.prefixes.iter().find_map(|p| {
            if p.class != class || idx < p.offset {
                return None;
            }
            let rel = idx - p.offset;
            let size_bits = u32::from(p.net.max_prefix_len() - p.net.prefix_len()).min(63);
            if rel >= (1u64 << size_bits) {
                return None;
            }
            Some(match p.net {
                IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + rel as u32)),
                IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + u128::from(rel)).into()),
            })
        })
    }

    /// Whether `addr` is a subscriber of a firewall class: its mappings are
    /// pinholes, external = internal (RFC 6887 §3).
    pub fn is_firewall(&self, addr: IpAddr) -> bool {
        // NAT-only configurations (the common case) pay no prefix lookup.
        if !self.class_firewall.contains(&true) {
            return false;
        }
        self.class_of(addr)
            .is_some_and(|(c, _)| self.class_firewall[usize::from(c)])
    }

    /// The lifetime of an error answer with `code` (RFC 6887 §7.4, §15).
    pub fn error_lifetime(&self, code: ResultCode) -> u32 {
        if code.is_short_lifetime() {
            self.config.lifetimes.short_error
        } else {
            self.config.lifetimes.long_error
        }
    }

    /// §13.1: may `src` use THIRD_PARTY at all?
    pub(crate) fn third_party_allowed(&self, src: IpAddr) -> bool {
        self.config
            .third_party
            .iter()
            .any(|r| r.from.iter().any(|n| n.contains(&src)))
    }

    /// §13.1: may `src` act for `target`?
    pub(crate) fn third_party_may_act_for(&self, src: IpAddr, target: IpAddr) -> bool {
        self.config.third_party.iter().any(|r| {
            r.from.iter().any(|n| n.contains(&src))
                && r.for_prefixes.iter().any(|n| n.contains(&target))
        })
    }

    /// A requested lifetime clamped to the configured bounds (§15).
    pub(crate) fn clamp_lifetime(&self, requested: u32) -> u32 {
        let l = &self.config.lifetimes;
        requested.clamp(l.min, l.max)
    }
}
