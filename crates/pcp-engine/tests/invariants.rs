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

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use harness::*;
use pcp_engine::{Event, MappingKind};
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn allocation_invariants_hold(ops in prop::collection::vec(op(), 1..80)) {
        let mut h = H::new(small_config());
        let mut released: Released = HashMap::new();
        for op in ops {
            match op {
                Op::Map { s, port, nonce: n, lifetime, suggested, set } => {
                    let opts = [PcpOption::PortSet(PortSet { size: set, first_internal_port: port, parity: false })];
                    let o: &[PcpOption<'_>] = if set > 1 { &opts } else { &[] };
                    h.map_opts(sub(s), nonce(n), 6, port, suggested, lifetime, o);
                }
                Op::Peer { s, port, remote, nonce: n, lifetime } => {
                    h.peer(sub(s), nonce(n), port, IpAddr::V4(Ipv4Addr::new(203, 0, 113, remote)), 443, 0, lifetime);
                }
                Op::NatPmp { s, port, lifetime } => {
                    h.natpmp(sub(s), natpmp::Request::Map(natpmp::Mapping {
                        protocol: natpmp::Protocol::Tcp, internal_port: port, external_port: 0, lifetime,
                    }));
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
                Op::Advance { ms } => { h.advance(ms); }
            }
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
