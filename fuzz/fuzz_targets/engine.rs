//! Fuzz target: the engine driven by arbitrary sequences of datagrams (raw
//! and well-formed MAP/PEER/NAT-PMP), operator actions, clock steps, drains
//! and restarts (the journal's records replayed into a fresh engine). After
//! every step the engine's invariants hold:
//!
//! * no external endpoint is held by two internal endpoints;
//! * every mapping lies inside its subscriber's port set, on its address;
//! * no subscriber holds more ports than its quota;
//! * a restart from the records gives back the same live mappings.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pcp_engine::{
    BlockAllocator, Compiled, Engine, EngineConfig, ExternalEndpoint, InternalEndpoint, MappingId,
    MappingKind, Millis,
};
use pcp_store::{Loaded, Record};
use pcp_wire::{natpmp, Filter, MapData, Nonce, OpData, Options, PcpOption, PeerData, PortSet};

const CONFIG: &str = r#"
lifetimes: { min: 1, max: 300, short_error: 30, long_error: 1800 }
pools:
  dyn:
    prefixes: [192.0.2.0/31]
    ports: { first: 1024, last: 1535 }
    block_size: 64
    mode: dynamic
    reuse_delay_secs: 5
    block_hold_secs: 10
  det:
    prefixes: [198.51.100.0/31]
    ports: { first: 1024, last: 2047 }
    block_size: 128
    mode: deterministic
profiles:
  small: { max_mappings: 6, max_blocks: 2, rate_per_sec: 1000, burst: 1000 }
subscribers:
  - { prefixes: [100.64.0.0/29], pool: dyn, profile: small }
  - { prefixes: [100.65.0.0/29], pool: det, profile: small }
third_party:
  - { from: [10.99.0.1/32], for: [100.64.0.0/29] }
options: { max_filters: 2, max_port_set: 8 }
"#;

const T0: Millis = 1_767_225_600_000;

struct Harness {
    cfg: EngineConfig,
    pools: Arc<BlockAllocator>,
    engine: Engine,
    now: Millis,
    /// What the journal would hold: every record of every event so far.
    journal: Loaded,
}

fn engine(cfg: &EngineConfig, epoch: Millis) -> (Arc<BlockAllocator>, Engine) {
    let pools = Arc::new(BlockAllocator::new(cfg));
    let compiled = Arc::new(Compiled::new(cfg.clone(), &pools).expect("valid config"));
    (pools.clone(), Engine::new(compiled, pools, 0, epoch, 7))
}

/// A source address: 8 dynamic subscribers, 8 deterministic ones, the
/// THIRD_PARTY host, and one that is no subscriber.
fn source(b: u8) -> IpAddr {
    IpAddr::V4(match b % 18 {
        i @ 0..=7 => Ipv4Addr::new(100, 64, 0, i),
        i @ 8..=15 => Ipv4Addr::new(100, 65, 0, i - 8),
        16 => Ipv4Addr::new(10, 99, 0, 1),
        _ => Ipv4Addr::new(203, 0, 113, 5),
    })
}

/// Takes `n` bytes, zero-padded when the input runs out.
fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

impl Harness {
    fn new() -> Self {
        static CFG: std::sync::OnceLock<EngineConfig> = std::sync::OnceLock::new();
        let cfg = CFG
            .get_or_init(|| serde_yaml::from_str(CONFIG).expect("config parses"))
            .clone();
        let (pools, engine) = engine(&cfg, T0);
        Harness {
            pools,
            engine,
            cfg,
            now: T0,
            journal: Loaded::default(),
        }
    }

    fn drain_events(&mut self) {
        let mut recs = Vec::new();
        while let Some(e) = self.engine.poll_event() {
            Record::from_event(&e, self.now, &mut recs);
        }
        for r in recs {
            self.journal.apply(r);
        }
        while self.engine.poll_transmit().is_some() {}
    }

    fn datagram(&mut self, src: IpAddr, bytes: &[u8]) {
        let mut out = [0u8; 1100];
        if let Some(n) = self.engine.handle(self.now, SocketAddr::new(src, 4000), bytes, &mut out) {
            assert!(n <= 1100, "reply too long");
        }
    }

    fn pcp(&mut self, data: &mut &[u8], peer: bool) {
        let [s, nonce, proto, iport, lifetime, flags] = take::<6>(data);
        let [e0, e1, r0] = take::<3>(data);
        let src = source(s);
        let map = MapData {
            nonce: Nonce([nonce % 4; 12]),
            protocol: [6, 17, 0, 132][usize::from(proto % 4)],
            internal_port: 1000 + u16::from(iport % 16),
            external_port: if flags & 1 != 0 { u16::from_be_bytes([e0, e1]) } else { 0 },
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let mut opts = Vec::new();
        if flags & 2 != 0 {
            opts.push(PcpOption::PreferFailure);
        }
        if flags & 4 != 0 {
            opts.push(PcpOption::Filter(Filter {
                prefix_len: 96 + (r0 % 33),
                remote_port: 0,
                remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, r0)),
            }));
        }
        if flags & 8 != 0 {
            opts.push(PcpOption::PortSet(PortSet {
                size: 1 + u16::from(r0 % 8),
                first_internal_port: map.internal_port,
                parity: flags & 16 != 0,
            }));
        }
        if flags & 32 != 0 {
            opts.push(PcpOption::ThirdParty(source(r0)));
        }
        let data = if peer {
            OpData::Peer(PeerData {
                map,
                remote_port: 443,
                remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, r0 % 4 + 1)),
            })
        } else {
            OpData::Map(map)
        };
        let req = pcp_wire::Request {
            lifetime: u32::from(lifetime) * 3 % 400,
            client_addr: src,
            data,
            options: Options::List(&opts),
        };
        let mut buf = [0u8; 1100];
        if let Ok(n) = req.emit(&mut buf) {
            self.datagram(src, &buf[..n]);
        }
    }

    fn natpmp(&mut self, data: &mut &[u8]) {
        let [s, op, iport, eport, lifetime] = take::<5>(data);
        let req = if op % 3 == 0 {
            natpmp::Request::PublicAddress
        } else {
            natpmp::Request::Map(natpmp::Mapping {
                protocol: if op % 3 == 1 { natpmp::Protocol::Udp } else { natpmp::Protocol::Tcp },
                internal_port: u16::from(iport % 8) * (u16::from(iport) % 2) + 1000,
                external_port: 1024 + u16::from(eport),
                lifetime: u32::from(lifetime) % 200,
            })
        };
        let mut buf = [0u8; 16];
        if let Ok(n) = req.emit(&mut buf) {
            self.datagram(source(s), &buf[..n]);
        }
    }

    fn operator(&mut self, data: &mut &[u8]) {
        let [what, s, port] = take::<3>(data);
        match what % 4 {
            0 => {
                let internal = InternalEndpoint {
                    addr: source(s),
                    protocol: 6,
                    port: 2000 + u16::from(port % 4),
                };
                let _ = self.engine.create_static(self.now, internal, 0);
            }
            1 => {
                let ids: Vec<MappingId> = self.engine.mappings().map(|m| m.id).collect();
                if let Some(id) = ids.get(usize::from(port) % ids.len().max(1)) {
                    self.engine.delete(self.now, *id);
                }
            }
            2 => {
                let addr = Ipv4Addr::new(192, 0, 2, port % 2);
                let on = s % 2 == 0;
                self.pools.set_draining(addr, on);
                if on {
                    self.engine.drain(self.now, addr);
                }
            }
            _ => {
                let ids: Vec<MappingId> = self.engine.mappings().map(|m| m.id).collect();
                if let Some(id) = ids.first() {
                    self.engine.revoke(self.now, *id);
                }
            }
        }
    }

    fn advance(&mut self, ms: Millis) {
        let end = self.now + ms;
        while let Some(t) = self.engine.poll_timeout() {
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            self.engine.handle_timeout(self.now);
            self.drain_events();
        }
        self.now = end;
        self.engine.handle_timeout(self.now);
    }

    /// A restart: the records replayed into a fresh engine.
    fn restart(&mut self) {
        let live = |e: &Engine, now: Millis| {
            let mut v: Vec<_> = e
                .mappings()
                .filter(|m| m.kind == MappingKind::Static || m.expires_ms > now)
                .map(|m| (m.key(), m.external_addr, m.external_port, m.port_count, m.expires_ms))
                .collect();
            v.sort();
            v
        };
        let before = live(&self.engine, self.now);
        let (pools, mut fresh) = engine(&self.cfg, T0);
        let journal = std::mem::take(&mut self.journal);
        for (_, (sub, block, since)) in &journal.blocks {
            fresh.restore_block(self.now, *sub, *block, *since);
        }
        for m in journal.mappings.values() {
            fresh.restore_mapping(self.now, m.clone());
        }
        let after = live(&fresh, self.now);
        assert_eq!(before, after, "replaying the journal gives the same live mappings");
        self.engine = fresh;
        self.pools = pools;
        // The restored state is the new journal.
        let mut recs = Vec::new();
        for (sub, block, since) in self.engine.blocks() {
            recs.push(Record::Block { subscriber: sub, block, since });
        }
        for m in self.engine.mappings() {
            recs.push(Record::Mapping(m.clone()));
        }
        for r in recs {
            self.journal.apply(r);
        }
        while self.engine.poll_event().is_some() {}
    }

    fn check(&self) {
        let mut holders: HashMap<ExternalEndpoint, (IpAddr, u16)> = HashMap::new();
        let mut used: HashMap<IpAddr, u32> = HashMap::new();
        let mut subs: HashMap<IpAddr, pcp_engine::SubscriberUsage> = HashMap::new();
        for m in self.engine.mappings() {
            let sub = subs.entry(m.internal_addr).or_insert_with(|| {
                self.engine
                    .subscriber(m.internal_addr)
                    .expect("a mapping's subscriber has a record")
            });
            assert_eq!(sub.external_addr, Some(m.external_addr), "mapping on its subscriber's address");
            for i in 0..m.port_count {
                let ext = m.external(i);
                assert!(
                    sub.blocks.iter().any(|b| b.addr == ext.addr && b.contains(ext.port)),
                    "mapping inside its subscriber's port set"
                );
                let internal = (m.internal_addr, m.internal_port.wrapping_add(i));
                if let Some(prev) = holders.insert(ext, internal) {
                    assert_eq!(prev, internal, "external endpoint held twice");
                }
            }
            if m.counts_against_quota() {
                *used.entry(m.internal_addr).or_default() += u32::from(m.port_count);
            }
        }
        for (sub, n) in used {
            let usage = &subs[&sub];
            assert!(n <= usage.max_mappings, "quota exceeded: {n}");
            assert_eq!(n, usage.mappings, "quota accounting");
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let mut h = Harness::new();
    let mut data = input;
    let mut steps = 0;
    while let Some((&op, rest)) = data.split_first() {
        data = rest;
        steps += 1;
        if steps > 64 {
            break;
        }
        match op % 8 {
            0 => {
                let [s, len] = take::<2>(&mut data);
                let n = usize::from(len).min(data.len());
                let (bytes, rest) = data.split_at(n);
                data = rest;
                h.datagram(source(s), bytes);
            }
            1 | 2 => h.pcp(&mut data, false),
            3 => h.pcp(&mut data, true),
            4 => h.natpmp(&mut data),
            5 => h.operator(&mut data),
            6 => {
                let [a, b] = take::<2>(&mut data);
                h.advance(u64::from(u16::from_be_bytes([a, b])) * 20);
            }
            _ => {
                h.drain_events();
                h.restart();
            }
        }
        h.drain_events();
        h.check();
    }
});
