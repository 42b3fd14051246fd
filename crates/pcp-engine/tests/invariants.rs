//! Stateful property test: random sequences of MAP, PEER, NAT-PMP, delete,
//! drain and clock steps, with the allocation invariants checked after
//! every step:
//! * no two live mappings of different internal endpoints share an
//!   external (address, protocol, port);
//! * every mapping lies inside its subscriber's port set;
//! * no subscriber exceeds its quota;
//! * a released port is given to someone else only after the reuse delay.
#![allow(missing_docs)]

mod harness;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use harness::*;
use pcp_engine::{Event, MappingKind, StateItem};
use pcp_wire::{natpmp, PcpOption, PortSet};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Map {
        s: u8,
        port: u16,
        nonce: u8,
        lifetime: u32,
        suggested: u16,
        set: u16,
    },
    Peer {
        s: u8,
        port: u16,
        remote: u8,
        nonce: u8,
        lifetime: u32,
    },
    NatPmp {
        s: u8,
        port: u16,
        lifetime: u32,
    },
    Delete {
        s: u8,
        port: u16,
        nonce: u8,
    },
    Drain {
        addr: u8,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let s = 1u8..6;
    let port = 1u16..12;
    prop_oneof![
        4 => (s.clone(), port.clone(), 1u8..3, prop::sample::select(vec![0u32, 60, 300, 3600]), 0u16..3, prop::sample::select(vec![1u16, 1, 1, 3, 8]))
            .prop_map(|(s, port, nonce, lifetime, sg, set)| Op::Map {
                s, port, nonce, lifetime,
                suggested: if sg == 0 { 0 } else { 1024 + sg * 7 },
                set,
            }),
        2 => (s.clone(), port.clone(), 1u8..4, 1u8..3, prop::sample::select(vec![0u32, 120, 600]))
            .prop_map(|(s, port, remote, nonce, lifetime)| Op::Peer { s, port, remote, nonce, lifetime }),
        1 => (s.clone(), port.clone(), prop::sample::select(vec![0u32, 600]))
            .prop_map(|(s, port, lifetime)| Op::NatPmp { s, port, lifetime }),
        2 => (s, port, 1u8..3).prop_map(|(s, port, nonce)| Op::Delete { s, port, nonce }),
        1 => (0u8..4).prop_map(|addr| Op::Drain { addr }),
        3 => prop::sample::select(vec![1_000u64, 30_000, 121_000, 400_000]).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn small_config() -> pcp_engine::EngineConfig {
    let mut cfg = test_config();
    let pool = cfg.pools.get_mut("cgnat").unwrap();
    // 4 addresses x 4 blocks of 16 ports: collisions and exhaustion happen.
    pool.ports = pcp_engine::config::PortRange {
        first: 1024,
        last: 1087,
    };
    pool.block_size = 16;
    let p = cfg.profiles.get_mut("home").unwrap();
    p.max_mappings = 10;
    p.max_blocks = 2;
    cfg
}

/// (addr, proto, port) -> (released at, internal addr, internal port, nonce)
type Released = HashMap<(Ipv4Addr, u8, u16), (u64, IpAddr, u16, [u8; 12])>;

fn check(h: &H, released: &Released, events: &[Event]) -> Result<(), TestCaseError> {
    let mut holders: HashMap<(Ipv4Addr, u8, u16), (IpAddr, u16)> = HashMap::new();
    let mut per_sub: HashMap<IpAddr, u32> = HashMap::new();
    for m in h.engine.mappings() {
        let usage = h
            .engine
            .subscriber(m.internal_addr)
            .expect("subscriber of a live mapping");
        for i in 0..m.port_count {
            let port = m.external_port + i;
            let key = (m.external_addr, m.protocol, port);
            let who = (m.internal_addr, m.internal_port.wrapping_add(i));
            if let Some(prev) = holders.insert(key, who) {
                prop_assert_eq!(prev, who, "external {:?} shared by two endpoints", key);
            }
            prop_assert!(
                usage
                    .blocks
                    .iter()
                    .any(|b| b.addr == m.external_addr && b.contains(port)),
                "mapping {:?} outside its port set {:?}",
                key,
                usage.blocks
            );
            prop_assert!(!(m.protocol == 17 && (port == 5350 || port == 5351)));
        }
        if m.kind != MappingKind::Static {
            *per_sub.entry(m.internal_addr).or_default() += u32::from(m.port_count);
        }
    }
    for (sub, n) in per_sub {
        prop_assert!(n <= 10, "{sub} holds {n} ports, quota 10");
        prop_assert_eq!(h.engine.subscriber(sub).unwrap().mappings, n);
    }
    // Created in this step: a port released less than 120 s ago goes only
    // back to the same client (RFC 6887 §15).
    for e in events {
        if let Event::MappingCreated(m) = e {
            for i in 0..m.port_count {
                let key = (m.external_addr, m.protocol, m.external_port + i);
                if let Some((at, addr, port, nonce)) = released.get(&key) {
                    if h.now < at + 120_000 {
                        prop_assert_eq!(
                            (*addr, *port, *nonce),
                            (m.internal_addr, m.internal_port.wrapping_add(i), m.nonce.0),
                            "port {:?} reused within the delay",
                            key
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs one step on the engine.
fn apply(h: &mut H, op: Op) {
    match op {
        Op::Map {
            s,
            port,
            nonce: n,
            lifetime,
            suggested,
            set,
        } => {
            let opts = [PcpOption::PortSet(PortSet {
                size: set,
                first_internal_port: port,
                parity: false,
            })];
            let o: &[PcpOption<'_>] = if set > 1 { &opts } else { &[] };
            h.map_opts(sub(s), nonce(n), 6, port, suggested, lifetime, o);
        }
        Op::Peer {
            s,
            port,
            remote,
            nonce: n,
            lifetime,
        } => {
            h.peer(
                sub(s),
                nonce(n),
                port,
                IpAddr::V4(Ipv4Addr::new(203, 0, 113, remote)),
                443,
                0,
                lifetime,
            );
        }
        Op::NatPmp { s, port, lifetime } => {
            h.natpmp(
                sub(s),
                natpmp::Request::Map(natpmp::Mapping {
                    protocol: natpmp::Protocol::Tcp,
                    internal_port: port,
                    external_port: 0,
                    lifetime,
                }),
            );
        }
        Op::Delete { s, port, nonce: n } => {
            h.map(sub(s), nonce(n), port, 0, 0);
        }
        Op::Drain { addr } => {
            let a = Ipv4Addr::new(192, 0, 2, addr);
            h.shared.set_draining(a, true);
            h.engine.drain(h.now, a);
            h.shared.set_draining(a, false);
        }
        Op::Advance { ms } => {
            h.advance(ms);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn allocation_invariants_hold(ops in prop::collection::vec(op(), 1..80)) {
        let mut h = H::new(small_config());
        let mut released: Released = HashMap::new();
        for op in ops {
            apply(&mut h, op);
            let events = h.take_events();
            check(&h, &released, &events)?;
            // A port held again is no longer "released" (later sharers of the
            // same internal endpoint, e.g. PEER reusing a MAP's port, are EIM).
            for e in &events {
                if let Event::MappingCreated(m) | Event::MappingMoved { new: m, .. } = e {
                    for i in 0..m.port_count {
                        released.remove(&(m.external_addr, m.protocol, m.external_port + i));
                    }
                }
            }
            for e in &events {
                // Expiries fire inside `advance`, on the second after expiry.
                let gone = match e {
                    Event::MappingDeleted { mapping, reason: pcp_engine::DeleteReason::Expired } => {
                        Some((mapping, mapping.expires_ms.div_ceil(1000) * 1000))
                    }
                    Event::MappingDeleted { mapping, .. } => Some((mapping, h.now)),
                    Event::MappingMoved { old, .. } => Some((old, h.now)),
                    _ => None,
                };
                if let Some((m, at)) = gone {
                    for i in 0..m.port_count {
                        let key = (m.external_addr, m.protocol, m.external_port + i);
                        // Still held by another mapping of the same endpoint (EIM)?
                        let still = h.engine.mapping_at(key.0, key.1, key.2).is_some();
                        if !still {
                            released.insert(key, (at, m.internal_addr, m.internal_port.wrapping_add(i), m.nonce.0));
                        }
                    }
                }
            }
        }
    }
}

/// What a replay of a snapshot and the journal after it holds: mappings
/// by key (with their external endpoint), blocks by (address, first
/// port), and the history in order.
#[derive(Default, Debug, PartialEq)]
struct Replayed {
    mappings: BTreeMap<String, (Ipv4Addr, u16, u16)>,
    blocks: BTreeMap<(Ipv4Addr, u16), IpAddr>,
    history: Vec<(IpAddr, Ipv4Addr, u16)>,
}

impl Replayed {
    fn mapping(&mut self, m: &pcp_engine::Mapping) {
        self.mappings.insert(
            m.key().to_string(),
            (m.external_addr, m.external_port, m.port_count),
        );
    }

    fn visit(&mut self, item: StateItem<'_>) {
        match item {
            StateItem::Mapping(m) => self.mapping(&m),
            StateItem::Block(s, b, _) => {
                self.blocks.insert((b.addr, b.first), s);
            }
            StateItem::History(h) => {
                self.history
                    .push((h.internal_addr, h.block.addr, h.block.first));
            }
        }
    }

    /// Applies what the daemon journals for `e` (pcp-store's records).
    fn journal(&mut self, e: &Event) {
        match e {
            Event::MappingCreated(m) | Event::MappingRenewed(m) | Event::MappingRefreshed(m) => {
                self.mapping(m)
            }
            Event::MappingDeleted { mapping, .. } => {
                self.mappings.remove(&mapping.key().to_string());
            }
            Event::MappingMoved { old, new } => {
                self.mappings.remove(&old.key().to_string());
                self.mapping(new);
            }
            Event::BlockAllocated { subscriber, block } => {
                self.blocks.insert((block.addr, block.first), *subscriber);
            }
            Event::BlockReleased {
                subscriber, block, ..
            } => {
                self.blocks.remove(&(block.addr, block.first));
                self.history.push((*subscriber, block.addr, block.first));
            }
            _ => {}
        }
    }

    /// The engine's state now, as whole.
    fn of(engine: &pcp_engine::Engine) -> Self {
        let mut r = Replayed::default();
        let mut cursor = engine.state_cursor();
        while engine.state_slice(&mut cursor, usize::MAX, |i| r.visit(i)) {}
        r
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A snapshot taken in slices between steps, replayed with the events
    /// journaled after it began, is the engine's state: every record
    /// present when it began and not removed since is visited, whatever
    /// the steps in between move (issue 15 item 2; `slices.rs`).
    #[test]
    fn a_snapshot_taken_in_slices_replays_to_the_state(
        before in prop::collection::vec(op(), 0..60),
        during in prop::collection::vec((op(), 1usize..4), 1..60),
    ) {
        // History short enough that records age out while the cursor goes.
        let mut cfg = small_config();
        cfg.history_max_records = 3;
        let mut h = H::new(cfg);
        for op in before {
            apply(&mut h, op);
        }
        h.take_events();
        let mut snapshot = Replayed::default();
        let mut cursor = h.engine.state_cursor();
        let mut journal = Vec::new();
        let mut more = true;
        for (op, budget) in during {
            if more {
                more = h.engine.state_slice(&mut cursor, budget, |i| snapshot.visit(i));
            }
            apply(&mut h, op);
            journal.extend(h.take_events());
        }
        while h.engine.state_slice(&mut cursor, 1, |i| snapshot.visit(i)) {}
        for e in &journal {
            snapshot.journal(e);
        }
        let now = Replayed::of(&h.engine);
        prop_assert_eq!(&snapshot.mappings, &now.mappings);
        prop_assert_eq!(&snapshot.blocks, &now.blocks);
        // History is a list: what is kept now ends the replayed one.
        prop_assert!(
            snapshot.history.ends_with(&now.history),
            "history {:?} does not end with {:?}", snapshot.history, now.history
        );
    }
}
