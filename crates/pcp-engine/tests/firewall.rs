//! Firewall classes (RFC 6887 §3 "the mapping is the identity", the IPv6
//! and IPv4 firewall rows of the table in §8.1): MAP and PEER answer with
//! the internal address and port, hold no pool port, and keep every other
//! rule (nonce, quota, FILTER, PORT_SET, PREFER_FAILURE, §15.1) of NAT
//! classes.
#![allow(missing_docs)]

mod harness;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use harness::*;
use pcp_engine::{DeleteReason, EngineConfig, Event, MappingKind};
use pcp_wire::{natpmp, Filter, NatPmpResult, PcpOption, PortSet, ResultCode};

/// The NAT44 test configuration with two firewall classes beside it: an
/// IPv6 one (the common case) and an IPv4 one.
fn firewall_config() -> EngineConfig {
    let mut cfg = test_config();
    let extra: Vec<pcp_engine::config::SubscriberClass> = serde_yaml::from_str(
        r#"
- prefixes: ["2001:db8:f00::/64"]
  kind: firewall
  profile: home
- prefixes: [198.18.0.0/24]
  kind: firewall
  profile: home
"#,
    )
    .unwrap();
    cfg.subscribers.extend(extra);
    cfg
}

fn v6(n: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xf00, 0, 0, 0, 0, n))
}

fn v4fw(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, n))
}

#[test]
fn map_answers_the_internal_endpoint_and_takes_no_pool_port_section_3() {
    let mut h = H::new(firewall_config());
    let r = h.map(v6(1), nonce(1), 8080, 0, 3600);
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.ext(), (v6(1), 8080), "§3: external = internal");
    let ev = h.take_events();
    assert!(
        matches!(&ev[..], [Event::MappingCreated(m)] if m.firewall && m.external_ip() == v6(1)),
        "a pinhole and no block: {ev:?}"
    );
    // Another subscriber's pinhole on the same port does not conflict:
    // nothing is shared.
    let r2 = h.map(v6(2), nonce(2), 8080, 0, 3600);
    assert_eq!(r2.ext(), (v6(2), 8080));
    // A NAT subscriber beside them is translated as before.
    let nat = h.map(sub(1), nonce(3), 8080, 0, 3600);
    assert_eq!(nat.result, ResultCode::Success);
    assert!(matches!(nat.ext().0, IpAddr::V4(a) if a.octets()[..3] == [192, 0, 2]));
    let usage = h.engine.subscriber(v6(1)).unwrap();
    assert!(usage.firewall && usage.blocks.is_empty() && usage.external_addr.is_none());
}

#[test]
fn a_suggestion_is_a_hint_unless_prefer_failure_section_11_3_and_13_2() {
    let mut h = H::new(firewall_config());
    // A different port or address is a hint that cannot be honoured: the
    // answer is what was assigned, the identity (§11.3).
    let r = h.suggest(v6(1), nonce(1), 22, None, (v6(9), 2222), 3600);
    assert_eq!((r.result, r.ext()), (ResultCode::Success, (v6(1), 22)));
    // With PREFER_FAILURE it must be refused (§13.2).
    let pf = [PcpOption::PreferFailure];
    let refused = h.map_opts(v6(1), nonce(1), 17, 53, 5353, 3600, &pf);
    assert_eq!(refused.result, ResultCode::CannotProvideExternal);
    // The identity itself is honoured with PREFER_FAILURE.
    let ok = h.map_opts(v6(1), nonce(1), 17, 53, 53, 3600, &pf);
    assert_eq!((ok.result, ok.ext()), (ResultCode::Success, (v6(1), 53)));
    // And an existing pinhole with PREFER_FAILURE and another port:
    // CANNOT_PROVIDE_EXTERNAL (§11.3 item 1).
    let again = h.map_opts(v6(1), nonce(1), 17, 53, 54, 3600, &pf);
    assert_eq!(again.result, ResultCode::CannotProvideExternal);
}

#[test]
fn nonce_renewal_delete_and_quota_as_for_nat_section_11_3_and_15() {
    let mut h = H::new(firewall_config());
    assert_eq!(
        h.map(v6(1), nonce(1), 80, 0, 3600).result,
        ResultCode::Success
    );
    h.advance(60_000);
    let wrong = h.map(v6(1), nonce(2), 80, 0, 3600);
    assert_eq!(wrong.result, ResultCode::NotAuthorized);
    assert_eq!(wrong.lifetime, 3540, "the remaining lifetime (§11.3)");
    let renewed = h.map(v6(1), nonce(1), 80, 0, 7200);
    assert_eq!(
        (renewed.result, renewed.lifetime),
        (ResultCode::Success, 7200)
    );
    h.take_events();
    let del = h.map(v6(1), nonce(1), 80, 0, 0);
    assert_eq!(del.result, ResultCode::Success);
    assert!(matches!(
        &h.take_events()[..],
        [Event::MappingDeleted { mapping, reason: DeleteReason::Client }] if mapping.firewall
    ));
    // The profile's quota of 8 holds for pinholes too (USER_EX_QUOTA).
    for port in 1..=8 {
        assert_eq!(
            h.map(v6(1), nonce(1), port, 0, 3600).result,
            ResultCode::Success
        );
    }
    assert_eq!(
        h.map(v6(1), nonce(1), 9, 0, 3600).result,
        ResultCode::UserExQuota
    );
    // Expiry removes a pinhole like a mapping.
    h.take_events();
    h.advance(3_601_000);
    assert_eq!(expired_count(&h.take_events()), 8);
    assert_eq!(h.engine.mapping_count(), 0);
}

#[test]
fn port_set_filter_and_peer_section_12_13_3_rfc7753() {
    let mut h = H::new(firewall_config());
    let ps = [PcpOption::PortSet(PortSet {
        size: 4,
        first_internal_port: 6000,
        parity: false,
    })];
    let r = h.map_opts(v6(1), nonce(1), 17, 6000, 0, 3600, &ps);
    assert_eq!((r.result, r.ext()), (ResultCode::Success, (v6(1), 6000)));
    assert!(r.options[0].contains("size: 4"), "{:?}", r.options);
    assert_eq!(h.engine.subscriber(v6(1)).unwrap().mappings, 4);
    let remote = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xeee, 0, 0, 0, 0, 7));
    let f = [PcpOption::Filter(Filter {
        prefix_len: 128,
        remote_port: 0,
        remote_addr: remote,
    })];
    let r = h.map_opts(v6(1), nonce(1), 6, 443, 0, 3600, &f);
    assert_eq!(r.result, ResultCode::Success);
    let m = h
        .engine
        .mappings()
        .find(|m| m.internal_port == 443)
        .unwrap()
        .clone();
    assert_eq!(m.filters().len(), 1);
    // PEER: the identity too, and a suggestion of it is honoured (§12.3).
    let p = h.peer(v6(1), nonce(1), 5000, remote, 9000, 0, 3600);
    assert_eq!((p.result, p.ext()), (ResultCode::Success, (v6(1), 5000)));
    let s = h.suggest(
        v6(1),
        nonce(1),
        5001,
        Some((remote, 9000)),
        (v6(1), 5001),
        3600,
    );
    assert_eq!((s.result, s.ext()), (ResultCode::Success, (v6(1), 5001)));
    // A PEER suggesting another port: CANNOT_PROVIDE_EXTERNAL (§12.3).
    let s = h.suggest(
        v6(1),
        nonce(1),
        5002,
        Some((remote, 9000)),
        (v6(1), 6002),
        3600,
    );
    assert_eq!(s.result, ResultCode::CannotProvideExternal);
    // MAP cannot delete a PEER-created mapping (§15.1).
    assert_eq!(
        h.map(v6(1), nonce(1), 5000, 0, 0).result,
        ResultCode::NotAuthorized
    );
    // Once the PEER is gone, nothing outbound is left to protect.
    assert_eq!(
        h.peer(v6(1), nonce(1), 5000, remote, 9000, 0, 0).result,
        ResultCode::Success
    );
    assert_eq!(
        h.map(v6(1), nonce(1), 5000, 0, 0).result,
        ResultCode::Success
    );
}

#[test]
fn ipv4_firewall_and_natpmp_answer_the_hosts_own_address() {
    let mut h = H::new(firewall_config());
    let r = h.map(v4fw(5), nonce(1), 25565, 0, 3600);
    assert_eq!((r.result, r.ext()), (ResultCode::Success, (v4fw(5), 25565)));
    let natpmp::Response::PublicAddress { result, addr, .. } =
        h.natpmp(v4fw(6), natpmp::Request::PublicAddress)
    else {
        panic!("a public address answer")
    };
    assert_eq!((result, IpAddr::V4(addr)), (NatPmpResult::Success, v4fw(6)));
    let m = natpmp::Mapping {
        protocol: natpmp::Protocol::Udp,
        internal_port: 3478,
        external_port: 40000,
        lifetime: 600,
    };
    let natpmp::Response::Map {
        result, mapping, ..
    } = h.natpmp(v4fw(6), natpmp::Request::Map(m))
    else {
        panic!("a map answer")
    };
    assert_eq!(
        (result, mapping.external_port),
        (NatPmpResult::Success, 3478),
        "RFC 6886 §3.3: the port actually mapped"
    );
}

#[test]
fn pinholes_survive_a_restart_and_only_in_a_firewall_class() {
    let mut h = H::new(firewall_config());
    h.map(v6(1), nonce(1), 8080, 0, 3600);
    h.peer(v6(1), nonce(1), 5000, v6(0x99), 9, 0, 3600);
    let saved: Vec<_> = h.engine.mappings().collect();
    assert_eq!(saved.len(), 2);

    let mut fresh = H::new(firewall_config());
    for m in &saved {
        assert!(fresh.engine.restore_mapping(fresh.now, m.clone()), "{m:?}");
    }
    // The nonce came back with it: a renewal is a renewal (a refresh: the
    // restored expiry already covers it).
    let r = fresh.map(v6(1), nonce(1), 8080, 0, 3600);
    assert_eq!((r.result, r.ext()), (ResultCode::Success, (v6(1), 8080)));
    assert!(matches!(
        &fresh.take_events()[..],
        [Event::MappingRefreshed(_)]
    ));

    // A pinhole record in a class that is NAT now (or the reverse) is not
    // restored: each kind only where it means something.
    let mut nat = H::new(test_config());
    let mut moved = saved[0].clone();
    moved.internal_addr = sub(1);
    assert!(!nat.engine.restore_mapping(nat.now, moved));
    let mut translated = saved[0].clone();
    translated.firewall = false;
    assert!(!fresh.engine.restore_mapping(fresh.now, translated));
    assert!(saved
        .iter()
        .any(|m| matches!(m.kind, MappingKind::Peer { .. })));
}

#[test]
fn a_firewall_class_takes_no_pool_and_needs_none() {
    let mut cfg = firewall_config();
    cfg.subscribers[1].pool = "cgnat".into();
    let problems = cfg.validate();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].path, "subscribers[1].pool");
    assert!(problems[0].message.contains("RFC 6887 §3"));
    // Firewall classes alone need no pool at all.
    let mut only = firewall_config();
    only.subscribers.remove(0);
    only.pools.clear();
    assert_eq!(only.validate(), vec![]);
    let mut h = H::new(only);
    assert_eq!(h.map(v6(3), nonce(1), 22, 0, 600).ext(), (v6(3), 22));
}

#[test]
fn third_party_and_description_work_for_pinholes_section_13_1_rfc7220() {
    let mut cfg = firewall_config();
    cfg.third_party.push(
        serde_yaml::from_str(r#"{ from: ["2001:db8:99::/64"], for: ["2001:db8:f00::/64"] }"#)
            .unwrap(),
    );
    let mut h = H::new(cfg);
    let manager = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 5));
    let opts = [
        PcpOption::ThirdParty(v6(7)),
        PcpOption::Description("game server"),
    ];
    let r = h.map_opts(manager, nonce(1), 17, 27015, 0, 600, &opts);
    assert_eq!((r.result, r.ext()), (ResultCode::Success, (v6(7), 27015)));
    let m = h.engine.mappings().next().unwrap().clone();
    assert!(m.firewall);
    assert_eq!(m.internal_addr, v6(7), "the pinhole is the target's");
    let extra = m.extra.as_deref().unwrap();
    assert_eq!(
        extra.manager,
        Some(manager),
        "§14.2 updates go to the manager"
    );
    assert_eq!(extra.description.as_deref(), Some("game server"));
    // A manager outside the rule may not act for the host (§13.1).
    let stranger = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x98, 0, 0, 0, 0, 5));
    let r = h.map_opts(stranger, nonce(1), 17, 27016, 0, 600, &opts);
    assert_ne!(r.result, ResultCode::Success);
}

#[test]
fn a_static_pinhole_belongs_to_its_subscriber_section_11_3_item_2() {
    let mut h = H::new(firewall_config());
    let internal = pcp_engine::InternalEndpoint {
        addr: v6(4),
        protocol: 6,
        port: 25,
    };
    let m = h.engine.create_static(h.now, internal, 2525).unwrap();
    assert_eq!(
        (m.external_ip(), m.external_port, m.firewall),
        (v6(4), 25, true)
    );
    // The record holds it: it is listed, and PCP cannot delete it (§11.3
    // item 2) but is answered with it, lifetime 2^32-1.
    let usage = h
        .engine
        .subscriber(v6(4))
        .expect("the subscriber's record stays");
    assert!(usage.firewall);
    let r = h.map(v6(4), nonce(1), 25, 0, 600);
    assert_eq!(
        (r.result, r.ext(), r.lifetime),
        (ResultCode::Success, (v6(4), 25), u32::MAX)
    );
    assert_eq!(
        h.map(v6(4), nonce(1), 25, 0, 0).result,
        ResultCode::NotAuthorized
    );
    assert!(h.engine.delete(h.now, m.id).is_some());
    // With nothing held, the record goes after the idle hold (1 s for a
    // class without a pool).
    h.advance(1_500);
    assert!(h.engine.subscriber(v6(4)).is_none(), "nothing left behind");
}
