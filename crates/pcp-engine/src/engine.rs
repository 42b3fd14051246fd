//! One engine shard: the RFC 6887 / RFC 6886 state machine for the
//! subscribers this shard owns.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use pcp_wire::{
    natpmp, parse_request, pcp::emit_error_response, Disposition, Filter, MapData, Message,
    NatPmpResult, Nonce, OpData, Opcode, Options, PcpOption, PeerData, PortSet, Prefix64, Request,
    Response, ResultCode,
};

use crate::alloc::{deterministic_block, deterministic_index, Block, BlockError, Shared};
use crate::config::{EngineConfig, PoolMode};
use crate::types::{
    DeleteReason, Event, Holder, Mapping, MappingExtra, MappingId, MappingKind, Millis, Stats,
    SubscriberUsage, Transmit, STATIC_LIFETIME,
};

const ROW_ANNOUNCE: usize = 0;
const ROW_MAP: usize = 1;
const ROW_PEER: usize = 2;
const ROW_NATPMP: usize = 3;
/// Unknown versions and opcodes.
const ROW_OTHER: usize = 4;

/// Which shard owns a subscriber: a pure function of its internal address,
/// the last 32 bits of the address modulo the shard count. The daemon's
/// reuseport BPF program computes the same in the kernel, so datagrams land
/// on their owner's socket. A subscriber cannot choose its address, so it
/// cannot crowd another shard.
pub fn shard_of(subscriber: IpAddr, shards: usize) -> usize {
    let low = match subscriber.to_canonical() {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(a) => (u128::from(a) & 0xffff_ffff) as u32,
    };
    (low % shards.max(1) as u32) as usize
}

/// The subscriber a datagram acts for: the THIRD_PARTY address if the
/// request carries one (RFC 6887 §13.1), else the source address. Used by
/// the I/O layer to pick the owning shard before handing the datagram over.
pub fn subscriber_key(datagram: &[u8], src: IpAddr) -> IpAddr {
    if let Ok(Message::Pcp(req)) = parse_request(datagram) {
        for opt in req.options.iter() {
            if let PcpOption::ThirdParty(addr) = opt {
                return addr;
            }
        }
    }
    src.to_canonical()
}

/// A refusal: the result code and, when the RFC asks for a specific one,
/// the lifetime to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal {
    code: ResultCode,
    lifetime: Option<u32>,
}

impl From<ResultCode> for Refusal {
    fn from(code: ResultCode) -> Self {
        Refusal {
            code,
            lifetime: None,
        }
    }
}

/// What a successful MAP or PEER produced for the response.
struct Granted {
    lifetime: u32,
    external_addr: IpAddr,
    external_port: u16,
    port_set: Option<PortSet>,
}

/// Options of one request, after §7.3 processing.
#[derive(Default)]
struct ReqOptions<'a> {
    third_party: Option<IpAddr>,
    prefer_failure: bool,
    filters: Vec<Filter>,
    has_filter: bool,
    description: Option<&'a str>,
    port_set: Option<PortSet>,
    prefix64: bool,
}

#[derive(Debug)]
struct Subscriber {
    class: u16,
    pool: u16,
    /// Index within its class, for deterministic pools.
    det_index: u64,
    ext: Option<Ipv4Addr>,
    blocks: Vec<(Block, Millis)>,
    /// Ports held by explicit mappings, counted against the quota.
    explicit: u32,
    slots: Vec<u32>,
    tokens_milli: u64,
    refilled_ms: Millis,
    idle_since: Option<Millis>,
}

#[derive(Debug, Clone, Copy)]
struct PortUse {
    internal_port: u16,
    refs: u32,
}

#[derive(Debug, Clone, Copy)]
struct Cooling {
    until: Millis,
    internal: IpAddr,
    internal_port: u16,
    nonce: Nonce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PeerKey {
    internal: IpAddr,
    protocol: u8,
    internal_port: u16,
    remote: IpAddr,
    remote_port: u16,
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Expire { slot: u32, generation: u32 },
    Cool { key: (Ipv4Addr, u8, u16) },
    Idle { subscriber: IpAddr },
}

#[derive(Debug, Clone)]
enum Pending {
    /// Restart ANNOUNCE to a target, `left` more after this one.
    Announce {
        dst: SocketAddr,
        left: u8,
        interval_ms: u64,
    },
    /// Mapping update (§14.2) for a mapping, while it is not refreshed.
    Update {
        slot: u32,
        generation: u32,
        stamp: Millis,
        left: u8,
        interval_ms: u64,
        payload: Vec<u8>,
        dst: SocketAddr,
    },
}

struct Slot {
    generation: u32,
    mapping: Option<Mapping>,
    /// When the client last refreshed it (to cancel §14.2 retransmissions).
    refreshed_ms: Millis,
}

/// Compiled configuration shared by every shard.
#[derive(Debug)]
pub struct Compiled {
    cfg: EngineConfig,
    /// (prefix, class index, offset of the prefix within the class).
    classes: Vec<(IpNet, u16, u64)>,
    class_pool: Vec<u16>,
    class_profile: Vec<crate::config::QuotaProfile>,
    class_profile_name: Vec<String>,
    prefix64: Option<[u8; 12]>,
    prefix64_len: u8,
}

impl Compiled {
    /// Compiles a configuration, checking it first.
    pub fn new(cfg: EngineConfig, shared: &Shared) -> Result<Self, Vec<crate::ConfigProblem>> {
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut classes = Vec::new();
        let mut class_pool = Vec::new();
        let mut class_profile = Vec::new();
        let mut class_profile_name = Vec::new();
        for (ci, class) in cfg.subscribers.iter().enumerate() {
            let mut offset = 0u64;
            for net in &class.prefixes {
                classes.push((*net, ci as u16, offset));
                let bits = u32::from(net.max_prefix_len() - net.prefix_len()).min(63);
                offset = offset.saturating_add(1u64 << bits);
            }
            class_pool.push(shared.pool_index(&class.pool).unwrap_or(0) as u16);
            class_profile.push(cfg.profiles[&class.profile]);
            class_profile_name.push(class.profile.clone());
        }
        // Longest prefix first, so nested prefixes could be told apart.
        classes.sort_by_key(|(n, _, _)| std::cmp::Reverse(n.prefix_len()));
        let (prefix64, prefix64_len) = match cfg.options.prefix64 {
            Some(net) => {
                let mut b = [0u8; 12];
                b.copy_from_slice(&net.network().octets()[..12]);
                (Some(b), net.prefix_len() / 8)
            }
            None => (None, 0),
        };
        Ok(Compiled {
            cfg,
            classes,
            class_pool,
            class_profile,
            class_profile_name,
            prefix64,
            prefix64_len,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    fn class_of(&self, addr: IpAddr) -> Option<(u16, u64)> {
        self.classes.iter().find_map(|(net, ci, off)| {
            net.contains(&addr).then(|| {
                let idx = match (net, addr) {
                    (IpNet::V4(n), IpAddr::V4(a)) => {
                        u64::from(u32::from(a) - u32::from(n.network()))
                    }
                    (IpNet::V6(n), IpAddr::V6(a)) => {
                        (u128::from(a) - u128::from(n.network())) as u64
                    }
                    _ => 0,
                };
                (*ci, off + idx)
            })
        })
    }

    fn address_at(&self, class: u16, idx: u64) -> Option<IpAddr> {
        self.classes.iter().find_map(|(net, ci, off)| {
            if *ci != class || idx < *off {
                return None;
            }
            let rel = idx - off;
            let size_bits = u32::from(net.max_prefix_len() - net.prefix_len()).min(63);
            if rel >= (1u64 << size_bits) {
                return None;
            }
            Some(match net {
                IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + rel as u32)),
                IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + u128::from(rel)).into()),
            })
        })
    }

    /// The lifetime of an error answer with `code` (RFC 6887 §7.4, §15).
    pub fn error_lifetime(&self, code: ResultCode) -> u32 {
        if code.is_short_lifetime() {
            self.cfg.lifetimes.short_error
        } else {
            self.cfg.lifetimes.long_error
        }
    }

    fn third_party_allowed(&self, src: IpAddr) -> bool {
        self.cfg
            .third_party
            .iter()
            .any(|r| r.from.iter().any(|n| n.contains(&src)))
    }

    fn third_party_may_act_for(&self, src: IpAddr, target: IpAddr) -> bool {
        self.cfg.third_party.iter().any(|r| {
            r.from.iter().any(|n| n.contains(&src))
                && r.for_prefixes.iter().any(|n| n.contains(&target))
        })
    }
}

/// One shard of the PCP engine.
///
/// Call order, per datagram: [`Engine::handle`] writes the reply (or returns
/// `None` to drop), then drain [`Engine::poll_event`] and apply the effects
/// (journal first, then dataplane) before sending the reply. Between
/// datagrams, sleep until [`Engine::poll_timeout`], then call
/// [`Engine::handle_timeout`] and send what [`Engine::poll_transmit`] gives.
pub struct Engine {
    cfg: Arc<Compiled>,
    shared: Arc<Shared>,
    shard: u16,
    epoch_start_ms: Millis,
    rng: u64,
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_map: HashMap<(IpAddr, u8, u16), u32>,
    by_peer: HashMap<PeerKey, u32>,
    ports: HashMap<(Ipv4Addr, u8, u16), PortUse>,
    /// External port of each outbound (PEER) internal endpoint (RFC 4787 EIM).
    endpoints: HashMap<(IpAddr, u8, u16), u16>,
    cooling: HashMap<(Ipv4Addr, u8, u16), Cooling>,
    subscribers: HashMap<IpAddr, Subscriber>,
    wheel: BTreeMap<u64, Vec<Timer>>,
    outbox: BTreeMap<(Millis, u64), Pending>,
    outbox_seq: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    history: VecDeque<(Holder, Millis)>,
    live: usize,
    stats: Stats,
}

impl Engine {
    /// A shard. `epoch_start_ms` is when the epoch began (now, after state
    /// loss; the recovered value otherwise, RFC 6887 §8.5). `seed` feeds the
    /// port randomizer (RFC 6888 REQ-13..15); give each shard its own.
    pub fn new(
        cfg: Arc<Compiled>,
        shared: Arc<Shared>,
        shard: u16,
        epoch_start_ms: Millis,
        seed: u64,
    ) -> Self {
        Engine {
            cfg,
            shared,
            shard,
            epoch_start_ms,
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            slots: Vec::new(),
            free: Vec::new(),
            by_map: HashMap::new(),
            by_peer: HashMap::new(),
            ports: HashMap::new(),
            endpoints: HashMap::new(),
            cooling: HashMap::new(),
            subscribers: HashMap::new(),
            wheel: BTreeMap::new(),
            outbox: BTreeMap::new(),
            outbox_seq: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            history: VecDeque::new(),
            live: 0,
            stats: Stats::default(),
        }
    }

    /// The shard's index.
    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// The epoch time to put in responses (RFC 6887 §8.5).
    pub fn epoch(&self, now: Millis) -> u32 {
        (now.saturating_sub(self.epoch_start_ms) / 1000) as u32
    }

    /// When the epoch started.
    pub fn epoch_start_ms(&self) -> Millis {
        self.epoch_start_ms
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Live mappings in this shard.
    pub fn mapping_count(&self) -> usize {
        self.live
    }

    /// The compiled configuration.
    pub fn compiled(&self) -> &Arc<Compiled> {
        &self.cfg
    }

    /// Swaps in a new configuration (reload). The caller guarantees pools
    /// and subscriber classes are unchanged, so every live mapping and block
    /// stays valid; lifetimes, quotas, THIRD_PARTY and options take effect
    /// for the next request.
    pub fn reconfigure(&mut self, cfg: Arc<Compiled>) {
        self.cfg = cfg;
    }

    fn next_random(&mut self) -> u64 {
        // SplitMix64: seeded by the caller; the engine has no entropy source.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    // ---------------------------------------------------------------- input

    /// Handles one datagram from `src`; writes the reply into `out` (at least
    /// 1100 octets) and returns its length, or `None` to drop silently.
    pub fn handle(
        &mut self,
        now: Millis,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let epoch = self.epoch(now);
        // RFC 6887 §9: with NAT-PMP off, version 0 is just an unsupported version.
        if datagram.first() == Some(&natpmp::VERSION) && !self.cfg.cfg.natpmp {
            return self.error_reply(
                datagram,
                ResultCode::UnsuppVersion,
                None,
                false,
                epoch,
                out,
                ROW_OTHER,
            );
        }
        match parse_request(datagram) {
            Err(e) => match e.disposition() {
                Disposition::Drop => {
                    self.stats.drop(e.reason());
                    None
                }
                Disposition::PcpError(code) => {
                    let opcode = datagram.get(1).map(|op| Opcode::from(op & 0x7f));
                    let row = match opcode {
                        _ if code == ResultCode::UnsuppVersion => ROW_OTHER,
                        Some(Opcode::Announce) => ROW_ANNOUNCE,
                        Some(Opcode::Map) => ROW_MAP,
                        Some(Opcode::Peer) => ROW_PEER,
                        _ => ROW_OTHER,
                    };
                    self.error_reply(datagram, code, None, false, epoch, out, row)
                }
                Disposition::NatPmpError(_) => {
                    self.stats.count(ROW_NATPMP, ResultCode::UnsuppOpcode);
                    natpmp::emit_unsupported_opcode(datagram, out).ok()
                }
            },
            Ok(Message::NatPmp(req)) => self.handle_natpmp(now, src, req, out),
            Ok(Message::Pcp(req)) => {
                let row = match req.opcode() {
                    Opcode::Announce => ROW_ANNOUNCE,
                    Opcode::Map => ROW_MAP,
                    _ => ROW_PEER,
                };
                match self.handle_pcp(now, src, &req, out) {
                    Ok(n) => {
                        self.stats.count(row, ResultCode::Success);
                        Some(n)
                    }
                    Err(r) => self.error_reply(datagram, r.code, r.lifetime, true, epoch, out, row),
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn error_reply(
        &mut self,
        datagram: &[u8],
        code: ResultCode,
        lifetime: Option<u32>,
        parsed: bool,
        epoch: u32,
        out: &mut [u8],
        row: usize,
    ) -> Option<usize> {
        self.stats.count(row, code);
        let lifetime = lifetime.unwrap_or_else(|| self.cfg.error_lifetime(code));
        emit_error_response(datagram, code, lifetime, epoch, parsed, out).ok()
    }

    fn handle_pcp(
        &mut self,
        now: Millis,
        src: SocketAddr,
        req: &Request<'_>,
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        let src_ip = src.ip().to_canonical();
        // §8.2: the client address field must be the packet's source.
        if req.client_addr != src_ip {
            return Err(ResultCode::AddressMismatch.into());
        }
        let opts = self.process_options(req)?;
        let epoch = self.epoch(now);
        let granted = match req.data {
            // §14.1.2: a solicited ANNOUNCE gets SUCCESS with lifetime 0.
            OpData::Announce => None,
            OpData::Map(m) | OpData::Peer(PeerData { map: m, .. }) => {
                let subscriber = self.authorize(src_ip, &opts)?;
                self.rate_limit(now, subscriber)?;
                Some(match req.data {
                    OpData::Peer(p) => self.peer(now, src, subscriber, req.lifetime, &p, &opts)?,
                    _ => self.map(now, src, subscriber, req.lifetime, &m, &opts, false)?,
                })
            }
        };
        let data = match (req.data, &granted) {
            (OpData::Map(mut m), Some(g)) => {
                m.external_addr = g.external_addr;
                m.external_port = g.external_port;
                OpData::Map(m)
            }
            (OpData::Peer(mut p), Some(g)) => {
                p.map.external_addr = g.external_addr;
                p.map.external_port = g.external_port;
                OpData::Peer(p)
            }
            (d, _) => d,
        };
        let resp = Response {
            result: ResultCode::Success,
            lifetime: granted.as_ref().map_or(0, |g| g.lifetime),
            epoch,
            data,
            options: Options::NONE,
        };
        let head = resp.emit(out).map_err(|_| ResultCode::MalformedRequest)?;
        // §7.3: success responses carry the processed options, in order.
        let port_set = granted.as_ref().and_then(|g| g.port_set);
        let mut at = head;
        for opt in req.options.iter() {
            let echoed = match opt {
                PcpOption::ThirdParty(_) | PcpOption::PreferFailure | PcpOption::Filter(_) => {
                    Some(opt)
                }
                PcpOption::Description(_) if opts.description.is_some() => Some(opt),
                PcpOption::PortSet(_) => port_set.map(PcpOption::PortSet),
                PcpOption::Prefix64(_) if opts.prefix64 => self.cfg.prefix64.map(|p| {
                    PcpOption::Prefix64(Prefix64 {
                        prefix_len: self.cfg.prefix64_len,
                        prefix_and_suffix: p,
                        ipv4_prefixes: None,
                    })
                }),
                _ => None,
            };
            if let Some(o) = echoed {
                if at + o.wire_len() > pcp_wire::pcp::MAX_MESSAGE_LEN {
                    // Cannot happen: echoed options are never longer than the
                    // request's; §7.3 would want MALFORMED_REQUEST here.
                    break;
                }
                at += o
                    .emit(&mut out[at..])
                    .map_err(|_| ResultCode::MalformedRequest)?;
            }
        }
        Ok(at)
    }

    /// §7.3 and §13: which options apply, and which refuse the request.
    fn process_options<'a>(&self, req: &Request<'a>) -> Result<ReqOptions<'a>, Refusal> {
        let o = &self.cfg.cfg.options;
        let opcode = req.opcode();
        let is_map = opcode == Opcode::Map;
        let mut r = ReqOptions::default();
        for opt in req.options.iter() {
            match opt {
                PcpOption::ThirdParty(addr) => {
                    if opcode == Opcode::Announce || self.cfg.cfg.third_party.is_empty() {
                        // §13.1: disabled THIRD_PARTY is UNSUPP_OPTION.
                        return Err(ResultCode::UnsuppOption.into());
                    }
                    r.third_party = Some(addr);
                }
                PcpOption::PreferFailure => {
                    // §7.3: valid only for MAP; a mandatory option not valid
                    // or disabled here is UNSUPP_OPTION.
                    if !is_map || !o.prefer_failure {
                        return Err(ResultCode::UnsuppOption.into());
                    }
                    r.prefer_failure = true;
                }
                PcpOption::Filter(f) => {
                    if !is_map || !o.filter {
                        return Err(ResultCode::UnsuppOption.into());
                    }
                    // §13.3: FILTER with lifetime 0 is MALFORMED_OPTION.
                    if req.lifetime == 0 {
                        return Err(ResultCode::MalformedOption.into());
                    }
                    r.has_filter = true;
                    if f.prefix_len == 0 {
                        r.filters.clear();
                    }
                    r.filters.push(f);
                }
                PcpOption::Description(text) if o.description && opcode != Opcode::Announce => {
                    r.description = Some(text);
                }
                PcpOption::PortSet(p) if is_map && o.port_set => r.port_set = Some(p),
                PcpOption::Prefix64(_) if opcode != Opcode::Peer => r.prefix64 = true,
                PcpOption::Unknown { code, .. } if code & 0x80 == 0 => {
                    // §7.3: an unrecognized mandatory option.
                    return Err(ResultCode::UnsuppOption.into());
                }
                _ => {} // optional and unprocessed: ignored, not echoed (§7.3)
            }
        }
        if r.prefer_failure {
            // §11.3: PREFER_FAILURE makes no sense with lifetime 0.
            if req.lifetime == 0 {
                return Err(ResultCode::MalformedOption.into());
            }
            // §13.2: PREFER_FAILURE with suggested port 0 is MALFORMED_OPTION.
            if let OpData::Map(m) = req.data {
                if m.external_port == 0 {
                    return Err(ResultCode::MalformedOption.into());
                }
            }
            // RFC 7753 §4.2: PORT_SET with PREFER_FAILURE is MALFORMED_OPTION.
            if r.port_set.is_some() {
                return Err(ResultCode::MalformedOption.into());
            }
        }
        Ok(r)
    }

    /// §13.1 THIRD_PARTY policy and subscriber lookup; returns the subscriber.
    fn authorize(&mut self, src: IpAddr, opts: &ReqOptions<'_>) -> Result<IpAddr, Refusal> {
        let subscriber = match opts.third_party {
            None => src,
            Some(target) => {
                let refusal = if target == src {
                    // §13.1: the sender's own address is MALFORMED_REQUEST.
                    Some(ResultCode::MalformedRequest)
                } else if !self.cfg.third_party_allowed(src) {
                    // §13.1: an unauthorized host gets UNSUPP_OPTION.
                    Some(ResultCode::UnsuppOption)
                } else if !self.cfg.third_party_may_act_for(src, target) {
                    Some(ResultCode::NotAuthorized)
                } else {
                    None
                };
                if let Some(code) = refusal {
                    self.stats.third_party_refusals += 1;
                    return Err(code.into());
                }
                target
            }
        };
        if self.cfg.class_of(subscriber).is_none() {
            // Not a subscriber of this NAT: refused by policy (§7.4 NOT_AUTHORIZED).
            return Err(ResultCode::NotAuthorized.into());
        }
        Ok(subscriber)
    }

    fn subscriber_entry(&mut self, now: Millis, addr: IpAddr) -> Option<&mut Subscriber> {
        if !self.subscribers.contains_key(&addr) {
            let (class, det_index) = self.cfg.class_of(addr)?;
            let profile = self.cfg.class_profile[usize::from(class)];
            self.subscribers.insert(
                addr,
                Subscriber {
                    class,
                    pool: self.cfg.class_pool[usize::from(class)],
                    det_index,
                    ext: None,
                    blocks: Vec::new(),
                    explicit: 0,
                    slots: Vec::new(),
                    tokens_milli: u64::from(profile.burst) * 1000,
                    refilled_ms: now,
                    idle_since: Some(now),
                },
            );
            self.schedule(
                now + self.idle_hold_ms(class),
                Timer::Idle { subscriber: addr },
            );
        }
        self.subscribers.get_mut(&addr)
    }

    fn idle_hold_ms(&self, class: u16) -> u64 {
        let pool = &self.shared.pools[usize::from(self.cfg.class_pool[usize::from(class)])];
        pool.block_hold_ms.max(1000)
    }

    /// Token bucket per subscriber; when empty, RFC 6887 §8.2 lets the server
    /// answer NO_RESOURCES (the lifetime says when a token is back).
    fn rate_limit(&mut self, now: Millis, subscriber: IpAddr) -> Result<(), Refusal> {
        let cfg = Arc::clone(&self.cfg);
        let Some(sub) = self.subscriber_entry(now, subscriber) else {
            return Err(ResultCode::NotAuthorized.into());
        };
        let profile = cfg.class_profile[usize::from(sub.class)];
        let elapsed = now.saturating_sub(sub.refilled_ms);
        let cap = u64::from(profile.burst) * 1000;
        sub.tokens_milli = (sub.tokens_milli + elapsed * u64::from(profile.rate_per_sec)).min(cap);
        sub.refilled_ms = now;
        if sub.tokens_milli >= 1000 {
            sub.tokens_milli -= 1000;
            return Ok(());
        }
        let wait_ms = (1000 - sub.tokens_milli).div_ceil(u64::from(profile.rate_per_sec).max(1));
        self.stats.rate_limited += 1;
        Err(Refusal {
            code: ResultCode::NoResources,
            lifetime: Some(wait_ms.div_ceil(1000).max(1) as u32),
        })
    }

    fn clamp_lifetime(&self, requested: u32) -> u32 {
        let l = &self.cfg.cfg.lifetimes;
        requested.clamp(l.min, l.max)
    }

    // ------------------------------------------------------------------ MAP

    /// RFC 6887 §11.3 and §15.1. `natpmp` requests carry no nonce (RFC 6886):
    /// they act on the internal host's mappings by source address alone.
    #[allow(clippy::too_many_arguments)]
    fn map(
        &mut self,
        now: Millis,
        client: SocketAddr,
        subscriber: IpAddr,
        requested: u32,
        m: &MapData,
        opts: &ReqOptions<'_>,
        natpmp: bool,
    ) -> Result<Granted, Refusal> {
        // §11.3 / §15.1: protocol 0 with a non-zero port is MALFORMED_REQUEST.
        if m.protocol == 0 && m.internal_port != 0 {
            return Err(ResultCode::MalformedRequest.into());
        }
        let key = (subscriber, m.protocol, m.internal_port);
        let existing = self.by_map.get(&key).copied();
        if requested == 0 {
            return self.map_delete(now, key, existing, m, natpmp);
        }
        // §11.3: wildcard (port 0) and DMZ (protocol 0) mappings cannot be
        // fulfilled in their entirety inside a port set: UNSUPP_PROTOCOL.
        if m.protocol == 0 || m.internal_port == 0 || !self.cfg.cfg.protocols.contains(&m.protocol)
        {
            return Err(ResultCode::UnsuppProtocol.into());
        }
        let lifetime = self.clamp_lifetime(requested);
        if let Some(slot) = existing {
            return self.map_renew(now, client, slot, lifetime, m, opts, natpmp);
        }
        if opts.filters.len() > self.cfg.cfg.options.max_filters {
            return Err(ResultCode::ExcessiveRemotePeers.into());
        }
        let wanted = match opts.port_set {
            Some(ps) if ps.size > 1 => {
                let by_internal = 65536 - u32::from(m.internal_port);
                u32::from(ps.size.min(self.cfg.cfg.options.max_port_set)).min(by_internal) as u16
            }
            _ => 1,
        };
        self.quota_check(now, subscriber, 1)?;
        let quota_left = self.quota_left(subscriber);
        let wanted = wanted.min(quota_left.max(1) as u16);
        // §11.3 item 4: an existing outbound mapping's external port is reused.
        let endpoint = self.endpoints.get(&key).copied();
        let suggested = (m.external_addr, m.external_port);
        let (ext_addr, ext_port, count) = match endpoint {
            Some(port) => {
                let ext = self.subscribers[&subscriber]
                    .ext
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                if opts.prefer_failure && !suggestion_matches(suggested, ext, port) {
                    return Err(ResultCode::CannotProvideExternal.into());
                }
                (ext, port, 1)
            }
            None => self.choose_ports(
                now,
                subscriber,
                m,
                suggested,
                wanted,
                opts.prefer_failure,
                opts.port_set,
            )?,
        };
        let mut extra = None;
        if !opts.filters.is_empty()
            || opts.description.is_some()
            || opts.third_party.is_some()
            || opts.prefer_failure
        {
            extra = Some(Box::new(MappingExtra {
                filters: opts
                    .filters
                    .iter()
                    .copied()
                    .filter(|f| f.prefix_len != 0)
                    .collect(),
                description: opts.description.map(str::to_string),
                manager: opts.third_party.map(|_| client.ip()),
                prefer_failure: opts.prefer_failure,
            }));
        }
        let mapping = Mapping {
            id: MappingId {
                shard: self.shard,
                slot: 0,
                generation: 0,
            },
            kind: MappingKind::Map,
            internal_addr: subscriber,
            internal_port: m.internal_port,
            protocol: m.protocol,
            external_addr: ext_addr,
            external_port: ext_port,
            port_count: count,
            nonce: if natpmp { Nonce::default() } else { m.nonce },
            created_ms: now,
            expires_ms: now + u64::from(lifetime) * 1000,
            client_port: client.port(),
            natpmp,
            extra,
        };
        self.insert(now, mapping);
        let port_set = (count > 1).then_some(PortSet {
            size: count,
            first_internal_port: m.internal_port,
            parity: opts.port_set.is_some_and(|p| p.parity),
        });
        Ok(Granted {
            lifetime,
            external_addr: IpAddr::V4(ext_addr),
            external_port: ext_port,
            port_set,
        })
    }

    fn map_delete(
        &mut self,
        now: Millis,
        key: (IpAddr, u8, u16),
        existing: Option<u32>,
        m: &MapData,
        natpmp: bool,
    ) -> Result<Granted, Refusal> {
        // §15.1: the suggested fields are copied into the response.
        let granted = Granted {
            lifetime: 0,
            external_addr: m.external_addr,
            external_port: m.external_port,
            port_set: None,
        };
        match existing {
            None => {
                // §15.1: MAP cannot delete an outbound (PEER-created) mapping.
                if self.endpoints.contains_key(&key) {
                    return Err(ResultCode::NotAuthorized.into());
                }
                // §15.1: deleting a mapping that does not exist is SUCCESS.
                Ok(granted)
            }
            Some(slot) => {
                let mapping = self.get(slot).ok_or(ResultCode::NoResources)?;
                if mapping.kind == MappingKind::Static {
                    // §15.1: static mappings cannot be deleted by PCP.
                    return Err(ResultCode::NotAuthorized.into());
                }
                if !natpmp && mapping.nonce != m.nonce {
                    // §11.3: wrong nonce, lifetime = the existing mapping's.
                    return Err(wrong_nonce(mapping, now));
                }
                self.remove(now, slot, DeleteReason::Client);
                Ok(granted)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn map_renew(
        &mut self,
        now: Millis,
        client: SocketAddr,
        slot: u32,
        lifetime: u32,
        m: &MapData,
        opts: &ReqOptions<'_>,
        natpmp: bool,
    ) -> Result<Granted, Refusal> {
        let max_filters = self.cfg.cfg.options.max_filters;
        let mapping = self.get(slot).ok_or(ResultCode::NoResources)?;
        let ext = (IpAddr::V4(mapping.external_addr), mapping.external_port);
        // §11.3 item 1: PREFER_FAILURE and a different suggestion.
        if opts.prefer_failure
            && !suggestion_matches(
                (m.external_addr, m.external_port),
                mapping.external_addr,
                mapping.external_port,
            )
        {
            return Err(ResultCode::CannotProvideExternal.into());
        }
        if mapping.kind == MappingKind::Static {
            // §11.3 item 2: static mappings answer with 2^32-1.
            return Ok(Granted {
                lifetime: STATIC_LIFETIME,
                external_addr: ext.0,
                external_port: ext.1,
                port_set: None,
            });
        }
        // A NAT-PMP mapping has no nonce (RFC 6886); PCP from the same host
        // adopts it and its nonce from then on.
        let adopt = !natpmp && mapping.natpmp;
        if !natpmp && !adopt && mapping.nonce != m.nonce {
            return Err(wrong_nonce(mapping, now));
        }
        // §13.3: new filters are added to the existing ones; prefix length 0
        // first removes them all. Over the limit: EXCESSIVE_REMOTE_PEERS and
        // nothing changes.
        let mut filters: Vec<Filter> = mapping.filters().to_vec();
        for f in &opts.filters {
            if f.prefix_len == 0 {
                filters.clear();
            } else if !filters.contains(f) {
                filters.push(*f);
            }
        }
        if filters.len() > max_filters {
            return Err(ResultCode::ExcessiveRemotePeers.into());
        }
        let port_count = mapping.port_count;
        let first_internal = mapping.internal_port;
        let parity = opts.port_set.is_some_and(|p| p.parity);
        let description = opts.description;
        let mapping = self.get_mut(slot).ok_or(ResultCode::NoResources)?;
        let old_expires = mapping.expires_ms;
        mapping.expires_ms = now + u64::from(lifetime) * 1000;
        // §14.2: updates go where the last response went.
        mapping.client_port = client.port();
        if adopt {
            mapping.natpmp = false;
            mapping.nonce = m.nonce;
        }
        if opts.has_filter || description.is_some() {
            let extra = mapping.extra.get_or_insert_with(Default::default);
            if opts.has_filter {
                extra.filters = filters;
            }
            if let Some(d) = description {
                extra.description = Some(d.to_string());
            }
        }
        self.renewed(now, slot, old_expires);
        Ok(Granted {
            lifetime,
            external_addr: ext.0,
            external_port: ext.1,
            port_set: (port_count > 1).then_some(PortSet {
                size: port_count,
                first_internal_port: first_internal,
                parity,
            }),
        })
    }

    // ----------------------------------------------------------------- PEER

    /// RFC 6887 §12.3.
    fn peer(
        &mut self,
        now: Millis,
        client: SocketAddr,
        subscriber: IpAddr,
        requested: u32,
        p: &PeerData,
        opts: &ReqOptions<'_>,
    ) -> Result<Granted, Refusal> {
        let m = &p.map;
        if m.protocol == 0 || m.internal_port == 0 {
            return Err(ResultCode::MalformedRequest.into());
        }
        if !self.cfg.cfg.protocols.contains(&m.protocol) {
            return Err(ResultCode::UnsuppProtocol.into());
        }
        // §12.3: an invalid remote peer is MALFORMED_REQUEST.
        let r = p.remote_addr;
        if r.is_unspecified()
            || r.is_loopback()
            || r.is_multicast()
            || p.remote_port == 0
            || matches!(r, IpAddr::V4(a) if a.is_broadcast())
        {
            return Err(ResultCode::MalformedRequest.into());
        }
        let key = PeerKey {
            internal: subscriber,
            protocol: m.protocol,
            internal_port: m.internal_port,
            remote: r,
            remote_port: p.remote_port,
        };
        let existing = self.by_peer.get(&key).copied();
        if requested == 0 {
            if let Some(slot) = existing {
                let mapping = self.get(slot).ok_or(ResultCode::NoResources)?;
                if mapping.nonce != m.nonce {
                    return Err(wrong_nonce(mapping, now));
                }
                self.remove(now, slot, DeleteReason::Client);
            }
            return Ok(Granted {
                lifetime: 0,
                external_addr: m.external_addr,
                external_port: m.external_port,
                port_set: None,
            });
        }
        let lifetime = self.clamp_lifetime(requested);
        if let Some(slot) = existing {
            let mapping = self.get(slot).ok_or(ResultCode::NoResources)?;
            if mapping.nonce != m.nonce {
                return Err(wrong_nonce(mapping, now));
            }
            let ext = (mapping.external_addr, mapping.external_port);
            let mapping = self.get_mut(slot).ok_or(ResultCode::NoResources)?;
            let old = mapping.expires_ms;
            mapping.expires_ms = now + u64::from(lifetime) * 1000;
            mapping.client_port = client.port();
            self.renewed(now, slot, old);
            return Ok(Granted {
                lifetime,
                external_addr: IpAddr::V4(ext.0),
                external_port: ext.1,
                port_set: None,
            });
        }
        self.quota_check(now, subscriber, 1)?;
        let suggested = (m.external_addr, m.external_port);
        let endpoint_key = (subscriber, m.protocol, m.internal_port);
        let endpoint = self
            .by_map
            .get(&endpoint_key)
            .and_then(|slot| self.get(*slot))
            .filter(|m| m.port_count == 1)
            .map(|m| m.external_port)
            .or_else(|| self.endpoints.get(&endpoint_key).copied());
        let (ext_addr, ext_port) = match endpoint {
            // Endpoint-independent mapping (RFC 4787 REQ-1, RFC 6888 REQ-1):
            // the same internal endpoint keeps its external port for every peer.
            Some(port) => {
                let ext = self.subscribers[&subscriber]
                    .ext
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                let suggested_any = suggested.0.is_unspecified() && suggested.1 == 0;
                if !suggested_any && !suggestion_matches(suggested, ext, port) {
                    // §12.3: a suggestion that cannot be honored.
                    return Err(ResultCode::CannotProvideExternal.into());
                }
                (ext, port)
            }
            None => {
                // §12.3: PEER behaves as if PREFER_FAILURE were present when
                // it suggests something.
                let strict = !(suggested.0.is_unspecified() && suggested.1 == 0);
                let (a, port, _) =
                    self.choose_ports(now, subscriber, m, suggested, 1, strict, None)?;
                (a, port)
            }
        };
        let extra = (opts.description.is_some() || opts.third_party.is_some()).then(|| {
            Box::new(MappingExtra {
                filters: Vec::new(),
                description: opts.description.map(str::to_string),
                manager: opts.third_party.map(|_| client.ip()),
                prefer_failure: false,
            })
        });
        let mapping = Mapping {
            id: MappingId {
                shard: self.shard,
                slot: 0,
                generation: 0,
            },
            kind: MappingKind::Peer {
                remote_addr: r,
                remote_port: p.remote_port,
            },
            internal_addr: subscriber,
            internal_port: m.internal_port,
            protocol: m.protocol,
            external_addr: ext_addr,
            external_port: ext_port,
            port_count: 1,
            nonce: m.nonce,
            created_ms: now,
            expires_ms: now + u64::from(lifetime) * 1000,
            client_port: client.port(),
            natpmp: false,
            extra,
        };
        self.insert(now, mapping);
        Ok(Granted {
            lifetime,
            external_addr: IpAddr::V4(ext_addr),
            external_port: ext_port,
            port_set: None,
        })
    }

    // ------------------------------------------------------------- NAT-PMP

    fn handle_natpmp(
        &mut self,
        now: Millis,
        src: SocketAddr,
        req: natpmp::Request,
        out: &mut [u8],
    ) -> Option<usize> {
        let epoch = self.epoch(now);
        let subscriber = src.ip().to_canonical();
        let resp = match req {
            natpmp::Request::PublicAddress => {
                let (result, addr) = match self.public_address(now, subscriber) {
                    Ok(a) => (NatPmpResult::Success, a),
                    Err(code) => (NatPmpResult::from(code), Ipv4Addr::UNSPECIFIED),
                };
                natpmp::Response::PublicAddress {
                    result,
                    epoch,
                    addr,
                }
            }
            natpmp::Request::Map(req_map) => {
                let res = self.natpmp_map(now, src, subscriber, req_map);
                let (result, mapping) = match res {
                    Ok((port, lifetime)) => (
                        NatPmpResult::Success,
                        natpmp::Mapping {
                            external_port: port,
                            lifetime,
                            ..req_map
                        },
                    ),
                    // RFC 6886 §3.5: on failure, external port and lifetime are 0.
                    Err(code) => (
                        NatPmpResult::from(code),
                        natpmp::Mapping {
                            external_port: 0,
                            lifetime: 0,
                            ..req_map
                        },
                    ),
                };
                natpmp::Response::Map {
                    result,
                    epoch,
                    mapping,
                }
            }
        };
        let code = match resp {
            natpmp::Response::PublicAddress { result, .. }
            | natpmp::Response::Map { result, .. } => result,
        };
        self.stats.count(
            ROW_NATPMP,
            match code {
                NatPmpResult::Success => ResultCode::Success,
                NatPmpResult::OutOfResources => ResultCode::NoResources,
                NatPmpResult::NetworkFailure => ResultCode::NetworkFailure,
                _ => ResultCode::NotAuthorized,
            },
        );
        resp.emit(out).ok()
    }

    fn public_address(&mut self, now: Millis, subscriber: IpAddr) -> Result<Ipv4Addr, ResultCode> {
        if self.cfg.class_of(subscriber).is_none() {
            return Err(ResultCode::NotAuthorized);
        }
        self.rate_limit(now, subscriber).map_err(|r| r.code)?;
        self.ensure_blocks(now, subscriber).map_err(|r| r.code)?;
        self.subscribers
            .get(&subscriber)
            .and_then(|s| s.ext)
            .ok_or(ResultCode::NoResources)
    }

    fn natpmp_map(
        &mut self,
        now: Millis,
        src: SocketAddr,
        subscriber: IpAddr,
        req: natpmp::Mapping,
    ) -> Result<(u16, u32), ResultCode> {
        if self.cfg.class_of(subscriber).is_none() {
            return Err(ResultCode::NotAuthorized);
        }
        self.rate_limit(now, subscriber).map_err(|r| r.code)?;
        let protocol = req.protocol.ip_protocol();
        if req.lifetime == 0 && req.internal_port == 0 {
            // RFC 6886 §3.4: delete all of this client's mappings for the protocol.
            let slots: Vec<u32> = self
                .subscribers
                .get(&subscriber)
                .map(|s| s.slots.clone())
                .unwrap_or_default();
            for slot in slots {
                if self
                    .get(slot)
                    .is_some_and(|m| m.protocol == protocol && m.kind == MappingKind::Map)
                {
                    self.remove(now, slot, DeleteReason::Client);
                }
            }
            return Ok((0, 0));
        }
        let m = MapData {
            nonce: Nonce::default(),
            protocol,
            internal_port: req.internal_port,
            external_port: req.external_port,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let granted = self
            .map(
                now,
                src,
                subscriber,
                req.lifetime,
                &m,
                &ReqOptions::default(),
                true,
            )
            .map_err(|r| r.code)?;
        Ok((
            if req.lifetime == 0 {
                0
            } else {
                granted.external_port
            },
            granted.lifetime,
        ))
    }

    // ---------------------------------------------------------- allocation

    fn quota_left(&self, subscriber: IpAddr) -> u32 {
        let Some(sub) = self.subscribers.get(&subscriber) else {
            return 0;
        };
        self.cfg.class_profile[usize::from(sub.class)]
            .max_mappings
            .saturating_sub(sub.explicit)
    }

    fn quota_check(&mut self, now: Millis, subscriber: IpAddr, ports: u32) -> Result<(), Refusal> {
        if self.quota_left(subscriber) >= ports {
            return Ok(());
        }
        Err(self.quota_refusal(now, subscriber))
    }

    fn quota_refusal(&mut self, now: Millis, subscriber: IpAddr) -> Refusal {
        self.stats.quota_refusals += 1;
        self.events.push_back(Event::QuotaExceeded { subscriber });
        // §7.4: USER_EX_QUOTA is short lifetime; report when the first of the
        // subscriber's mappings frees up, if sooner.
        let soonest = self.subscribers.get(&subscriber).and_then(|s| {
            s.slots
                .iter()
                .filter_map(|slot| self.get(*slot))
                .filter(|m| m.kind != MappingKind::Static)
                .map(|m| m.remaining_secs(now))
                .min()
        });
        let short = self.cfg.cfg.lifetimes.short_error;
        Refusal {
            code: ResultCode::UserExQuota,
            lifetime: Some(soonest.map_or(short, |s| s.clamp(1, short.max(1)))),
        }
    }

    /// Gives the subscriber its first port set if it has none.
    fn ensure_blocks(&mut self, now: Millis, subscriber: IpAddr) -> Result<(), Refusal> {
        let Some(sub) = self.subscriber_entry(now, subscriber) else {
            return Err(ResultCode::NotAuthorized.into());
        };
        if !sub.blocks.is_empty() {
            return Ok(());
        }
        let (pool, det_index) = (usize::from(sub.pool), sub.det_index);
        let block = match self.shared.pools[pool].mode {
            PoolMode::Deterministic => deterministic_block(&self.shared.pools[pool], det_index)
                .ok_or(ResultCode::NoResources)?,
            PoolMode::Dynamic => match self.shared.allocate_block(pool, subscriber, None) {
                Ok(b) => b,
                Err(_) => {
                    self.events.push_back(Event::PoolExhausted {
                        pool: self.shared.pools[pool].name.clone(),
                    });
                    return Err(ResultCode::NoResources.into());
                }
            },
        };
        self.add_block(now, subscriber, block);
        Ok(())
    }

    fn add_block(&mut self, now: Millis, subscriber: IpAddr, block: Block) {
        if let Some(sub) = self.subscribers.get_mut(&subscriber) {
            sub.ext = Some(block.addr);
            sub.blocks.push((block, now));
        }
        self.events
            .push_back(Event::BlockAllocated { subscriber, block });
    }

    /// One more dynamic block on the subscriber's address (paired pooling),
    /// within its `max_blocks`.
    fn grow_blocks(&mut self, now: Millis, subscriber: IpAddr) -> Result<(), Refusal> {
        let Some(sub) = self.subscribers.get(&subscriber) else {
            return Err(ResultCode::NotAuthorized.into());
        };
        let pool = usize::from(sub.pool);
        let max_blocks = self.cfg.class_profile[usize::from(sub.class)].max_blocks as usize;
        if self.shared.pools[pool].mode == PoolMode::Deterministic || sub.blocks.len() >= max_blocks
        {
            return Err(self.quota_refusal(now, subscriber));
        }
        match self.shared.allocate_block(pool, subscriber, sub.ext) {
            Ok(block) => {
                self.add_block(now, subscriber, block);
                Ok(())
            }
            Err(BlockError::AddressFull) | Err(BlockError::PoolExhausted) => {
                self.events.push_back(Event::PoolExhausted {
                    pool: self.shared.pools[pool].name.clone(),
                });
                Err(ResultCode::NoResources.into())
            }
        }
    }

    fn port_free(
        &self,
        now: Millis,
        addr: Ipv4Addr,
        proto: u8,
        port: u16,
        who: (IpAddr, u16, Nonce),
    ) -> bool {
        // §11.3: never map external UDP 5350 or 5351.
        if proto == 17 && (port == 5350 || port == 5351) {
            return false;
        }
        if self.ports.contains_key(&(addr, proto, port)) {
            return false;
        }
        match self.cooling.get(&(addr, proto, port)) {
            // §15: within the reuse delay only the same client (internal
            // address, port and nonce) may reclaim the port.
            Some(c) if c.until > now => (c.internal, c.internal_port, c.nonce) == who,
            _ => true,
        }
    }

    /// Picks `count` contiguous external ports for a mapping inside the
    /// subscriber's port set: the suggestion if it can be honored, else a
    /// random free run (RFC 6888 REQ-13..15). Returns (addr, first port, count).
    #[allow(clippy::too_many_arguments)]
    fn choose_ports(
        &mut self,
        now: Millis,
        subscriber: IpAddr,
        m: &MapData,
        suggested: (IpAddr, u16),
        count: u16,
        strict: bool,
        port_set: Option<PortSet>,
    ) -> Result<(Ipv4Addr, u16, u16), Refusal> {
        self.ensure_blocks(now, subscriber)?;
        let who = (subscriber, m.internal_port, m.nonce);
        let proto = m.protocol;
        let parity = port_set.filter(|p| p.parity).map(|_| m.internal_port & 1);
        loop {
            let sub = &self.subscribers[&subscriber];
            let addr = sub.ext.unwrap_or(Ipv4Addr::UNSPECIFIED);
            let blocks: Vec<Block> = sub.blocks.iter().map(|(b, _)| *b).collect();
            let run_free = |e: &Self, first: u16, n: u16| -> bool {
                blocks.iter().any(|b| {
                    b.contains(first) && u32::from(first) + u32::from(n) - 1 <= u32::from(b.last())
                }) && (0..n).all(|i| {
                    // §15 "same client" is per port: the internal port this
                    // external port will forward to.
                    let client = (who.0, who.1.wrapping_add(i), who.2);
                    e.port_free(now, addr, proto, first + i, client)
                })
            };
            // The suggestion (§11.3: honored when free and ours).
            let addr_ok = suggested.0.is_unspecified() || suggested.0 == IpAddr::V4(addr);
            if suggested.1 != 0 && addr_ok && run_free(self, suggested.1, count) {
                return Ok((addr, suggested.1, count));
            }
            if strict {
                // §13.2 / §12.3: the suggestion cannot be provided.
                return Err(ResultCode::CannotProvideExternal.into());
            }
            // A random start, then a linear walk over the whole port set.
            let total: u32 = blocks.iter().map(|b| u32::from(b.len)).sum();
            let mut n = count;
            while n >= 1 {
                let start = (self.next_random() % u64::from(total.max(1))) as u32;
                for k in 0..total {
                    let mut i = (start + k) % total;
                    let port = blocks.iter().find_map(|b| {
                        if i < u32::from(b.len) {
                            Some(b.first + i as u16)
                        } else {
                            i -= u32::from(b.len);
                            None
                        }
                    });
                    let Some(port) = port else { continue };
                    if parity.is_some_and(|p| port & 1 != p) {
                        continue;
                    }
                    if run_free(self, port, n) {
                        return Ok((addr, port, n));
                    }
                }
                // RFC 7753 §4.2: map as many ports as possible, at least one.
                n /= 2;
            }
            // The port set is full: another block on the same address.
            self.grow_blocks(now, subscriber)?;
        }
    }

    // ---------------------------------------------------------- mapping table

    fn get(&self, slot: u32) -> Option<&Mapping> {
        self.slots
            .get(slot as usize)
            .and_then(|s| s.mapping.as_ref())
    }

    fn get_mut(&mut self, slot: u32) -> Option<&mut Mapping> {
        self.slots
            .get_mut(slot as usize)
            .and_then(|s| s.mapping.as_mut())
    }

    /// After a renewal changed slot `slot`: remember the refresh (it cancels
    /// §14.2 retransmissions), re-arm expiry if it moved later, report it.
    fn renewed(&mut self, now: Millis, slot: u32, old_expires: Millis) {
        let Some(snapshot) = self.get(slot).cloned() else {
            return;
        };
        self.slots[slot as usize].refreshed_ms = now;
        if snapshot.expires_ms > old_expires {
            let generation = snapshot.id.generation;
            self.schedule(snapshot.expires_ms, Timer::Expire { slot, generation });
        }
        self.events.push_back(Event::MappingRenewed(snapshot));
    }

    fn insert(&mut self, now: Millis, mapping: Mapping) -> MappingId {
        self.insert_with(now, mapping, true)
    }

    /// Inserts a mapping in every index; `report` queues MappingCreated.
    fn insert_with(&mut self, now: Millis, mut mapping: Mapping, report: bool) -> MappingId {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    mapping: None,
                    refreshed_ms: now,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let generation = self.slots[slot as usize].generation;
        mapping.id = MappingId {
            shard: self.shard,
            slot,
            generation,
        };
        let sub = mapping.internal_addr;
        match mapping.kind {
            MappingKind::Peer {
                remote_addr,
                remote_port,
            } => {
                self.by_peer.insert(
                    PeerKey {
                        internal: sub,
                        protocol: mapping.protocol,
                        internal_port: mapping.internal_port,
                        remote: remote_addr,
                        remote_port,
                    },
                    slot,
                );
            }
            _ => {
                self.by_map
                    .insert((sub, mapping.protocol, mapping.internal_port), slot);
            }
        }
        for i in 0..mapping.port_count {
            let use_ = self
                .ports
                .entry((
                    mapping.external_addr,
                    mapping.protocol,
                    mapping.external_port + i,
                ))
                .or_insert(PortUse {
                    internal_port: mapping.internal_port.wrapping_add(i),
                    refs: 0,
                });
            use_.refs += 1;
        }
        // Outbound endpoints (PEER) are indexed apart; a MAP mapping's port is
        // found through `by_map`.
        if matches!(mapping.kind, MappingKind::Peer { .. }) {
            self.endpoints
                .entry((sub, mapping.protocol, mapping.internal_port))
                .or_insert(mapping.external_port);
        }
        if let Some(s) = self.subscribers.get_mut(&sub) {
            if mapping.kind != MappingKind::Static {
                s.explicit += u32::from(mapping.port_count);
            }
            s.slots.push(slot);
            s.idle_since = None;
        }
        if mapping.kind != MappingKind::Static {
            self.schedule(mapping.expires_ms, Timer::Expire { slot, generation });
        }
        let id = mapping.id;
        self.slots[slot as usize].refreshed_ms = now;
        if report {
            self.events
                .push_back(Event::MappingCreated(mapping.clone()));
        }
        self.slots[slot as usize].mapping = Some(mapping);
        self.live += 1;
        id
    }

    /// Takes a mapping out of every index; ports go to the reuse delay.
    fn detach(&mut self, now: Millis, slot: u32) -> Option<Mapping> {
        let entry = self.slots.get_mut(slot as usize)?;
        let mapping = entry.mapping.take()?;
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(slot);
        self.live -= 1;
        let sub = mapping.internal_addr;
        match mapping.kind {
            MappingKind::Peer {
                remote_addr,
                remote_port,
            } => {
                self.by_peer.remove(&PeerKey {
                    internal: sub,
                    protocol: mapping.protocol,
                    internal_port: mapping.internal_port,
                    remote: remote_addr,
                    remote_port,
                });
            }
            _ => {
                self.by_map
                    .remove(&(sub, mapping.protocol, mapping.internal_port));
            }
        }
        let mut released = false;
        for i in 0..mapping.port_count {
            let key = (
                mapping.external_addr,
                mapping.protocol,
                mapping.external_port + i,
            );
            if let Some(u) = self.ports.get_mut(&key) {
                u.refs -= 1;
                if u.refs == 0 {
                    let internal_port = u.internal_port;
                    self.ports.remove(&key);
                    released = true;
                    let delay = self
                        .subscribers
                        .get(&sub)
                        .map_or(0, |s| self.shared.pools[usize::from(s.pool)].reuse_delay_ms);
                    if delay > 0 {
                        self.cooling.insert(
                            key,
                            Cooling {
                                until: now + delay,
                                internal: sub,
                                internal_port,
                                nonce: mapping.nonce,
                            },
                        );
                        self.schedule(now + delay, Timer::Cool { key });
                    }
                }
            }
        }
        if released && mapping.port_count == 1 {
            self.endpoints
                .remove(&(sub, mapping.protocol, mapping.internal_port));
        }
        let mut idle_class = None;
        if let Some(s) = self.subscribers.get_mut(&sub) {
            if mapping.kind != MappingKind::Static {
                s.explicit = s.explicit.saturating_sub(u32::from(mapping.port_count));
            }
            s.slots.retain(|x| *x != slot);
            if s.slots.is_empty() {
                s.idle_since = Some(now);
                idle_class = Some(s.class);
            }
        }
        if let Some(class) = idle_class {
            let hold = self.idle_hold_ms(class);
            self.schedule(now + hold, Timer::Idle { subscriber: sub });
        }
        Some(mapping)
    }

    fn remove(&mut self, now: Millis, slot: u32, reason: DeleteReason) {
        if let Some(mapping) = self.detach(now, slot) {
            self.events
                .push_back(Event::MappingDeleted { mapping, reason });
        }
    }

    fn schedule(&mut self, at: Millis, timer: Timer) {
        self.wheel.entry(at.div_ceil(1000)).or_default().push(timer);
    }

    // ---------------------------------------------------------------- timers

    /// The next instant [`Engine::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let wheel = self.wheel.keys().next().map(|s| s * 1000);
        let outbox = self.outbox.keys().next().map(|(t, _)| *t);
        match (wheel, outbox) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires mappings, ends reuse delays, releases idle blocks, and queues
    /// due unsolicited messages.
    pub fn handle_timeout(&mut self, now: Millis) {
        while let Some(entry) = self.wheel.first_entry() {
            if entry.key() * 1000 > now {
                break;
            }
            for timer in entry.remove() {
                self.fire(now, timer);
            }
        }
        while let Some(entry) = self.outbox.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let pending = entry.remove();
            self.send_pending(now, pending);
        }
    }

    fn fire(&mut self, now: Millis, timer: Timer) {
        match timer {
            Timer::Expire { slot, generation } => {
                let due = self.slots.get(slot as usize).is_some_and(|s| {
                    s.generation == generation
                        && s.mapping
                            .as_ref()
                            .is_some_and(|m| m.kind != MappingKind::Static && m.expires_ms <= now)
                });
                if due {
                    self.remove(now, slot, DeleteReason::Expired);
                }
            }
            Timer::Cool { key } => {
                if self.cooling.get(&key).is_some_and(|c| c.until <= now) {
                    self.cooling.remove(&key);
                }
            }
            Timer::Idle { subscriber } => self.release_if_idle(now, subscriber),
        }
    }

    fn release_if_idle(&mut self, now: Millis, subscriber: IpAddr) {
        let Some(sub) = self.subscribers.get(&subscriber) else {
            return;
        };
        let hold = self.idle_hold_ms(sub.class);
        let Some(since) = sub.idle_since else {
            return;
        };
        if since + hold > now {
            return;
        }
        let pool = usize::from(sub.pool);
        let Some(sub) = self.subscribers.remove(&subscriber) else {
            return;
        };
        for (block, from) in sub.blocks {
            if self.shared.pools[pool].mode == PoolMode::Dynamic {
                self.shared.release_block(pool, block);
                self.record_history(now, subscriber, block, from);
            }
            self.events.push_back(Event::BlockReleased {
                subscriber,
                block,
                since: from,
            });
        }
    }

    fn record_history(&mut self, now: Millis, subscriber: IpAddr, block: Block, from: Millis) {
        let retention = self.cfg.cfg.history_retention_secs * 1000;
        while self.history.len() >= self.cfg.cfg.history_max_records.max(1)
            || self
                .history
                .front()
                .is_some_and(|(_, to)| to + retention < now)
        {
            self.history.pop_front();
        }
        self.history.push_back((
            Holder {
                internal_addr: subscriber,
                block,
                from_ms: Some(from),
                to_ms: Some(now),
            },
            now,
        ));
    }

    /// Drains the unsolicited datagrams that are due.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Drains the effects of the last calls, in order.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn queue(&mut self, at: Millis, pending: Pending) {
        self.outbox_seq += 1;
        self.outbox.insert((at, self.outbox_seq), pending);
    }

    fn send_pending(&mut self, now: Millis, pending: Pending) {
        match pending {
            Pending::Announce {
                dst,
                left,
                interval_ms,
            } => {
                let mut buf = [0u8; pcp_wire::pcp::HEADER_LEN];
                let resp = Response {
                    result: ResultCode::Success,
                    lifetime: 0,
                    epoch: self.epoch(now),
                    data: OpData::Announce,
                    options: Options::NONE,
                };
                if let Ok(n) = resp.emit(&mut buf) {
                    self.stats.unsolicited += 1;
                    self.transmits.push_back(Transmit {
                        dst,
                        payload: buf[..n].to_vec(),
                    });
                }
                if left > 0 {
                    // §14.1.3: at least 250 ms, then at least doubling.
                    self.queue(
                        now + interval_ms,
                        Pending::Announce {
                            dst,
                            left: left - 1,
                            interval_ms: interval_ms * 2,
                        },
                    );
                }
            }
            Pending::Update {
                slot,
                generation,
                stamp,
                left,
                interval_ms,
                mut payload,
                dst,
            } => {
                let alive = self
                    .slots
                    .get(slot as usize)
                    .is_some_and(|s| s.generation == generation && s.refreshed_ms <= stamp);
                // An error update (PREFER_FAILURE) outlives its mapping.
                let is_error = payload.get(3).is_some_and(|c| *c != 0);
                if !alive && !is_error {
                    // §14.2: once the client refreshed it, stop.
                    return;
                }
                let epoch = self.epoch(now);
                if payload.len() >= 12 {
                    payload[8..12].copy_from_slice(&epoch.to_be_bytes());
                }
                self.stats.unsolicited += 1;
                self.transmits.push_back(Transmit {
                    dst,
                    payload: payload.clone(),
                });
                if left > 0 {
                    self.queue(
                        now + interval_ms,
                        Pending::Update {
                            slot,
                            generation,
                            stamp,
                            left: left - 1,
                            interval_ms: interval_ms * 2,
                            payload,
                            dst,
                        },
                    );
                }
            }
        }
    }

    /// Queues restart ANNOUNCEs (RFC 6887 §14.1.3) to the configured groups
    /// (port 5350) and to `clients`: call after starting with lost state.
    pub fn announce_restart(&mut self, now: Millis, clients: &[SocketAddr]) {
        let count = self.cfg.cfg.unsolicited.announce_count.clamp(1, 10);
        let groups: Vec<SocketAddr> = self
            .cfg
            .cfg
            .unsolicited
            .announce_targets
            .iter()
            .map(|ip| SocketAddr::new(*ip, pcp_wire::CLIENT_PORT))
            .collect();
        for dst in groups.into_iter().chain(clients.iter().copied()) {
            self.queue(
                now,
                Pending::Announce {
                    dst,
                    left: count - 1,
                    interval_ms: 250,
                },
            );
        }
    }

    // ------------------------------------------------------------ operators

    /// Moves every mapping of this shard off `addr` (already marked draining
    /// in [`Shared::set_draining`]) and tells clients with unsolicited
    /// MAP/PEER responses (RFC 6887 §14.2). Returns how many mappings moved.
    pub fn drain(&mut self, now: Millis, addr: Ipv4Addr) -> usize {
        let mut affected: Vec<IpAddr> = self
            .subscribers
            .iter()
            .filter(|(_, s)| {
                s.ext == Some(addr)
                    && self.shared.pools[usize::from(s.pool)].mode == PoolMode::Dynamic
            })
            .map(|(k, _)| *k)
            .collect();
        // A stable order, so a drain is reproducible.
        affected.sort_unstable();
        let mut moved = 0;
        for subscriber in affected {
            moved += self.move_subscriber(now, subscriber);
        }
        moved
    }

    fn move_subscriber(&mut self, now: Millis, subscriber: IpAddr) -> usize {
        let Some(sub) = self.subscribers.get_mut(&subscriber) else {
            return 0;
        };
        let pool = usize::from(sub.pool);
        let old_blocks = std::mem::take(&mut sub.blocks);
        let slots = sub.slots.clone();
        sub.ext = None;
        // Detach every mapping (their ports stay unusable: the old address is
        // going away), then release the old blocks.
        let mut old: Vec<Mapping> = Vec::new();
        for slot in slots {
            if let Some(m) = self.detach(now, slot) {
                old.push(m);
            }
        }
        for (block, from) in &old_blocks {
            self.shared.release_block(pool, *block);
            self.record_history(now, subscriber, *block, *from);
            self.events.push_back(Event::BlockReleased {
                subscriber,
                block: *block,
                since: *from,
            });
        }
        let mut moved = 0;
        for m in old {
            let updates = self.cfg.cfg.unsolicited.update_count.max(1);
            let prefer_failure = m.extra.as_ref().is_some_and(|e| e.prefer_failure);
            let data = MapData {
                nonce: m.nonce,
                protocol: m.protocol,
                internal_port: m.internal_port,
                external_port: m.external_port,
                external_addr: IpAddr::V4(m.external_addr),
            };
            // Keep the port's offset within its block when possible.
            let offset = old_blocks
                .iter()
                .find(|(b, _)| b.contains(m.external_port))
                .map_or(0, |(b, _)| m.external_port - b.first);
            let result = if prefer_failure {
                // §14.2: the same external address cannot be provided.
                Err(Refusal::from(ResultCode::CannotProvideExternal))
            } else {
                self.ensure_blocks(now, subscriber).and_then(|_| {
                    let first = self.subscribers[&subscriber].blocks[0].0.first;
                    let hint = (IpAddr::V4(Ipv4Addr::UNSPECIFIED), first + offset);
                    self.choose_ports(now, subscriber, &data, hint, m.port_count, false, None)
                })
            };
            let (payload_result, new_ext) = match result {
                Ok((addr, port, count)) => {
                    let mut new = m.clone();
                    new.external_addr = addr;
                    new.external_port = port;
                    new.port_count = count;
                    new.created_ms = now;
                    let events_before = self.events.len();
                    let id = self.insert(now, new.clone());
                    // insert() queued MappingCreated; report a move instead.
                    self.events.truncate(events_before);
                    new.id = id;
                    self.events.push_back(Event::MappingMoved {
                        old: m.clone(),
                        new: new.clone(),
                    });
                    moved += 1;
                    (ResultCode::Success, Some((id, addr, port)))
                }
                Err(r) => {
                    self.events.push_back(Event::MappingDeleted {
                        mapping: m.clone(),
                        reason: DeleteReason::Drained,
                    });
                    (r.code, None)
                }
            };
            let payload =
                self.update_payload(now, &m, payload_result, new_ext.map(|(_, a, p)| (a, p)));
            let (slot, generation) =
                new_ext.map_or((u32::MAX, 0), |(id, _, _)| (id.slot, id.generation));
            self.queue(
                now,
                Pending::Update {
                    slot,
                    generation,
                    stamp: now,
                    left: updates - 1,
                    interval_ms: 250,
                    payload,
                    dst: m.client(),
                },
            );
        }
        moved
    }

    /// The unsolicited MAP/PEER response for a moved mapping (§14.2): the
    /// response it would have got, with THIRD_PARTY and FILTER carried.
    fn update_payload(
        &self,
        now: Millis,
        m: &Mapping,
        result: ResultCode,
        new: Option<(Ipv4Addr, u16)>,
    ) -> Vec<u8> {
        let (ext_addr, ext_port) = new.unwrap_or((m.external_addr, m.external_port));
        let map = MapData {
            nonce: m.nonce,
            protocol: m.protocol,
            internal_port: m.internal_port,
            external_port: ext_port,
            external_addr: IpAddr::V4(ext_addr),
        };
        let data = match m.kind {
            MappingKind::Peer {
                remote_addr,
                remote_port,
            } => OpData::Peer(PeerData {
                map,
                remote_port,
                remote_addr,
            }),
            _ => OpData::Map(map),
        };
        let mut opts: Vec<PcpOption<'_>> = Vec::new();
        if m.extra.as_ref().is_some_and(|e| e.manager.is_some()) {
            opts.push(PcpOption::ThirdParty(m.internal_addr));
        }
        if m.extra.as_ref().is_some_and(|e| e.prefer_failure) {
            opts.push(PcpOption::PreferFailure);
        }
        for f in m.filters() {
            opts.push(PcpOption::Filter(*f));
        }
        let lifetime = if result == ResultCode::Success {
            m.remaining_secs(now)
        } else {
            self.cfg.error_lifetime(result)
        };
        let resp = Response {
            result,
            lifetime,
            epoch: self.epoch(now),
            data,
            options: Options::List(&opts),
        };
        let mut buf = vec![0u8; resp.buffer_len().min(pcp_wire::pcp::MAX_MESSAGE_LEN)];
        match resp.emit(&mut buf) {
            Ok(n) => buf.truncate(n),
            Err(_) => buf.clear(),
        }
        buf
    }

    /// Creates a static mapping for `internal:port` (operator action). The
    /// external port comes from the subscriber's port set (`external_port`
    /// is a hint). Static mappings do not count against the quota.
    pub fn create_static(
        &mut self,
        now: Millis,
        internal_addr: IpAddr,
        protocol: u8,
        internal_port: u16,
        external_port: u16,
    ) -> Result<Mapping, ResultCode> {
        if self.cfg.class_of(internal_addr).is_none() {
            return Err(ResultCode::NotAuthorized);
        }
        if internal_port == 0 || !self.cfg.cfg.protocols.contains(&protocol) {
            return Err(ResultCode::UnsuppProtocol);
        }
        if self
            .by_map
            .contains_key(&(internal_addr, protocol, internal_port))
        {
            return Err(ResultCode::CannotProvideExternal);
        }
        let data = MapData {
            nonce: Nonce::default(),
            protocol,
            internal_port,
            external_port,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        self.subscriber_entry(now, internal_addr)
            .ok_or(ResultCode::NotAuthorized)?;
        let (addr, port, _) = self
            .choose_ports(
                now,
                internal_addr,
                &data,
                (data.external_addr, external_port),
                1,
                false,
                None,
            )
            .map_err(|r| r.code)?;
        let mapping = Mapping {
            id: MappingId {
                shard: self.shard,
                slot: 0,
                generation: 0,
            },
            kind: MappingKind::Static,
            internal_addr,
            internal_port,
            protocol,
            external_addr: addr,
            external_port: port,
            port_count: 1,
            nonce: Nonce::default(),
            created_ms: now,
            expires_ms: Millis::MAX,
            client_port: 0,
            natpmp: false,
            extra: None,
        };
        let id = self.insert(now, mapping);
        self.get(id.slot).cloned().ok_or(ResultCode::NoResources)
    }

    /// Deletes a mapping by id (operator action).
    pub fn delete(&mut self, now: Millis, id: MappingId) -> Option<Mapping> {
        self.delete_for(now, id, DeleteReason::Operator)
    }

    /// Takes back a mapping the dataplane could not install: the daemon
    /// answers its request with an error instead (a client is told success
    /// only for what forwards traffic).
    pub fn revoke(&mut self, now: Millis, id: MappingId) -> Option<Mapping> {
        self.delete_for(now, id, DeleteReason::Dataplane)
    }

    fn delete_for(&mut self, now: Millis, id: MappingId, reason: DeleteReason) -> Option<Mapping> {
        let s = self.slots.get(id.slot as usize)?;
        if s.generation != id.generation || s.mapping.is_none() {
            return None;
        }
        let m = self.detach(now, id.slot)?;
        self.events.push_back(Event::MappingDeleted {
            mapping: m.clone(),
            reason,
        });
        Some(m)
    }

    // --------------------------------------------------------------- restore

    /// Every block held, with its subscriber and since when (for snapshots).
    pub fn blocks(&self) -> impl Iterator<Item = (IpAddr, Block, Millis)> + '_ {
        self.subscribers
            .iter()
            .flat_map(|(addr, s)| s.blocks.iter().map(move |(b, since)| (*addr, *b, *since)))
    }

    /// The allocation history kept for [`Engine::lookup`].
    pub fn history(&self) -> impl Iterator<Item = &Holder> {
        self.history.iter().map(|(h, _)| h)
    }

    /// Gives a subscriber back a block it held before a restart. Refused
    /// (false) when the configuration no longer allows it: the subscriber's
    /// class or pool changed, or the block is not free. Emits no event.
    pub fn restore_block(
        &mut self,
        now: Millis,
        subscriber: IpAddr,
        block: Block,
        since: Millis,
    ) -> bool {
        let Some(sub) = self.subscriber_entry(now, subscriber) else {
            return false;
        };
        let (pool, det_index, ext) = (usize::from(sub.pool), sub.det_index, sub.ext);
        if ext.is_some_and(|a| a != block.addr) {
            return false; // paired pooling: one address per subscriber
        }
        let ok = match self.shared.pools[pool].mode {
            PoolMode::Deterministic => {
                deterministic_block(&self.shared.pools[pool], det_index) == Some(block)
            }
            PoolMode::Dynamic => self.shared.claim_block(pool, subscriber, block),
        };
        if ok {
            if let Some(sub) = self.subscribers.get_mut(&subscriber) {
                sub.ext = Some(block.addr);
                sub.blocks.push((block, since));
            }
        }
        ok
    }

    /// Re-installs a mapping from before a restart, with its external
    /// endpoint, nonce and expiry. Refused (false) when it has expired, or
    /// its ports are not in its subscriber's restored port set or are taken.
    /// Emits no event.
    pub fn restore_mapping(&mut self, now: Millis, mapping: Mapping) -> bool {
        if mapping.kind != MappingKind::Static && mapping.expires_ms <= now {
            return false;
        }
        let Some(sub) = self.subscribers.get(&mapping.internal_addr) else {
            return false;
        };
        let inside = (0..mapping.port_count).all(|i| {
            let port = mapping.external_port.wrapping_add(i);
            sub.ext == Some(mapping.external_addr)
                && sub.blocks.iter().any(|(b, _)| b.contains(port))
        });
        let taken_by_other = (0..mapping.port_count).any(|i| {
            self.ports
                .get(&(
                    mapping.external_addr,
                    mapping.protocol,
                    mapping.external_port.wrapping_add(i),
                ))
                .is_some_and(|u| u.internal_port != mapping.internal_port.wrapping_add(i))
        });
        let duplicate = match mapping.kind {
            MappingKind::Peer {
                remote_addr,
                remote_port,
            } => self.by_peer.contains_key(&PeerKey {
                internal: mapping.internal_addr,
                protocol: mapping.protocol,
                internal_port: mapping.internal_port,
                remote: remote_addr,
                remote_port,
            }),
            _ => self.by_map.contains_key(&(
                mapping.internal_addr,
                mapping.protocol,
                mapping.internal_port,
            )),
        };
        if !inside || taken_by_other || duplicate {
            return false;
        }
        // A restore is not a creation: no event.
        self.insert_with(now, mapping, false);
        true
    }

    /// Restores one allocation-history record.
    pub fn restore_history(&mut self, holder: Holder) {
        let to = holder.to_ms.unwrap_or(0);
        self.history.push_back((holder, to));
    }

    // --------------------------------------------------------------- queries

    /// Every live mapping of this shard.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> {
        self.slots.iter().filter_map(|s| s.mapping.as_ref())
    }

    /// A mapping by id.
    pub fn mapping(&self, id: MappingId) -> Option<&Mapping> {
        let s = self.slots.get(id.slot as usize)?;
        (s.generation == id.generation).then_some(())?;
        s.mapping.as_ref()
    }

    /// The mappings of one subscriber.
    pub fn mappings_of(&self, subscriber: IpAddr) -> Vec<&Mapping> {
        self.subscribers
            .get(&subscriber)
            .map(|s| s.slots.iter().filter_map(|slot| self.get(*slot)).collect())
            .unwrap_or_default()
    }

    /// The mapping that holds external `addr:port` for `protocol`, if any.
    pub fn mapping_at(&self, addr: Ipv4Addr, protocol: u8, port: u16) -> Option<&Mapping> {
        self.ports.get(&(addr, protocol, port))?;
        self.mappings().find(|m| {
            m.external_addr == addr
                && m.protocol == protocol
                && port >= m.external_port
                && u32::from(port) < u32::from(m.external_port) + u32::from(m.port_count)
        })
    }

    /// A subscriber's usage, if it is known to this shard.
    pub fn subscriber(&self, addr: IpAddr) -> Option<SubscriberUsage> {
        let s = self.subscribers.get(&addr)?;
        let class = usize::from(s.class);
        Some(SubscriberUsage {
            internal_addr: addr,
            pool: self.shared.pools[usize::from(s.pool)].name.clone(),
            profile: self.cfg.class_profile_name[class].clone(),
            external_addr: s.ext,
            blocks: s.blocks.iter().map(|(b, _)| *b).collect(),
            mappings: s.explicit,
            max_mappings: self.cfg.class_profile[class].max_mappings,
        })
    }

    /// Who held external `addr:port` at `at` (RFC 6302 / RFC 7422 logging
    /// questions): from this shard's block history and live blocks. For
    /// deterministic pools the answer is computed.
    pub fn lookup(&self, addr: Ipv4Addr, port: u16, at: Millis) -> Option<Holder> {
        for (pi, pool) in self.shared.pools.iter().enumerate() {
            if pool.address_index(addr).is_none() {
                continue;
            }
            if pool.mode == PoolMode::Deterministic {
                let idx = deterministic_index(pool, addr, port)?;
                return self
                    .cfg
                    .class_pool
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| usize::from(**p) == pi)
                    .find_map(|(ci, _)| self.cfg.address_at(ci as u16, idx))
                    .map(|internal_addr| Holder {
                        internal_addr,
                        block: deterministic_block(pool, idx).unwrap_or(Block {
                            addr,
                            first: port,
                            len: 1,
                        }),
                        from_ms: None,
                        to_ms: None,
                    });
            }
        }
        for (sub, s) in &self.subscribers {
            for (b, from) in &s.blocks {
                if b.addr == addr && b.contains(port) && *from <= at {
                    return Some(Holder {
                        internal_addr: *sub,
                        block: *b,
                        from_ms: Some(*from),
                        to_ms: None,
                    });
                }
            }
        }
        self.history
            .iter()
            .rev()
            .map(|(h, _)| h)
            .find(|h| {
                h.block.addr == addr
                    && h.block.contains(port)
                    && h.from_ms.is_some_and(|f| f <= at)
                    && h.to_ms.is_some_and(|t| at < t)
            })
            .cloned()
    }
}

/// §11.3 / §12.3: a request whose nonce differs from the existing
/// mapping's is NOT_AUTHORIZED, with that mapping's remaining lifetime.
fn wrong_nonce(mapping: &Mapping, now: Millis) -> Refusal {
    Refusal {
        code: ResultCode::NotAuthorized,
        lifetime: Some(mapping.remaining_secs(now)),
    }
}

fn suggestion_matches(suggested: (IpAddr, u16), addr: Ipv4Addr, port: u16) -> bool {
    (suggested.0.is_unspecified() || suggested.0 == IpAddr::V4(addr)) && suggested.1 == port
}
