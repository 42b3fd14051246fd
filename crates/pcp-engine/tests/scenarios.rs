//! Scenario tests: one per RFC rule, on a virtual clock.
#![allow(missing_docs)]

mod harness;

use std::net::{IpAddr, Ipv4Addr};

use harness::*;
use pcp_engine::{DeleteReason, Event, MappingKind, TIMER_BUDGET};
use pcp_wire::{
    natpmp, Filter, MapData, NatPmpResult, OpData, Options, PcpOption, PeerData, PortSet, Prefix64,
    Request, Response, ResultCode,
};

const POOL: [Ipv4Addr; 4] = [
    Ipv4Addr::new(192, 0, 2, 0),
    Ipv4Addr::new(192, 0, 2, 1),
    Ipv4Addr::new(192, 0, 2, 2),
    Ipv4Addr::new(192, 0, 2, 3),
];

fn in_pool(a: IpAddr) -> bool {
    matches!(a, IpAddr::V4(v4) if POOL.contains(&v4))
}

/// With a renewal slack, the store is asked to hold each mapping that
/// many lifetimes beyond the one granted; a renewal that only moves the
/// expiry within that is a refresh (no write), and every expiry a client
/// is told (§15: the lifetime in the response) is covered by what the
/// store holds.
#[test]
fn renewals_within_the_renewal_slack_are_refreshes_covered_by_the_stored_expiry() {
    let mut h = H::default();
    h.engine.set_renewal_slack(2);
    let r = h.map(sub(1), nonce(1), 8080, 0, 100);
    assert_eq!(r.result, ResultCode::Success);
    let stored = match &h.take_events()[..] {
        [Event::BlockAllocated { .. }, Event::MappingCreated(m)] => m.as_stored(),
        other => panic!("{other:?}"),
    };
    // Granted L (the configured minimum may raise the 100 s asked for),
    // stored for 3 L.
    let lifetime = u64::from(r.lifetime) * 1000;
    assert_eq!(stored.expires_ms, h.now + 3 * lifetime);
    let mut refreshes = 0;
    let mut writes = 0;
    let mut held = stored.expires_ms;
    // Renew every half lifetime (§11.2.1) for 10 lifetimes.
    for _ in 0..20 {
        h.advance(lifetime / 2);
        let again = h.map(sub(1), nonce(1), 8080, 0, 100);
        assert_eq!((again.result, again.ext()), (ResultCode::Success, r.ext()));
        let told = h.now + u64::from(again.lifetime) * 1000;
        match &h.take_events()[..] {
            [Event::MappingRefreshed(m)] => {
                refreshes += 1;
                assert_eq!(m.expires_ms, told);
            }
            [Event::MappingRenewed(m)] => {
                writes += 1;
                held = m.as_stored().expires_ms;
            }
            other => panic!("{other:?}"),
        }
        assert!(told <= held, "told {told} beyond the stored {held}");
    }
    // One write per 2.5 lifetimes of renewals: 4 of 20, the rest refreshes.
    assert_eq!((writes, refreshes), (4, 16));

    // A change other than the expiry is always written.
    let mut h = H::default();
    h.engine.set_renewal_slack(2);
    h.map(sub(1), nonce(1), 8080, 0, 100);
    h.take_events();
    let filter = [PcpOption::Filter(Filter {
        prefix_len: 128,
        remote_port: 0,
        remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
    })];
    let r = h.map_opts(sub(1), nonce(1), 6, 8080, 0, 100, &filter);
    assert_eq!(r.result, ResultCode::Success);
    assert!(matches!(h.take_events()[..], [Event::MappingRenewed(_)]));
    // The same filter again changes nothing: a refresh.
    h.map_opts(sub(1), nonce(1), 6, 8080, 0, 100, &filter);
    assert!(matches!(h.take_events()[..], [Event::MappingRefreshed(_)]));
}

#[test]
fn map_create_renew_delete_section_11_3_and_15_1() {
    let mut h = H::default();
    let r = h.map(sub(1), nonce(1), 8080, 0, 3600);
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.lifetime, 3600);
    assert!(in_pool(r.ext().0));
    assert!(matches!(
        h.take_events()[..],
        [Event::BlockAllocated { .. }, Event::MappingCreated(_)]
    ));

    // Renewal with the same nonce keeps the external endpoint (§11.3 item 3).
    h.advance(10_000);
    let again = h.map(sub(1), nonce(1), 8080, 0, 7200);
    assert_eq!((again.result, again.ext()), (ResultCode::Success, r.ext()));
    assert_eq!(again.lifetime, 7200);
    assert!(matches!(h.take_events()[..], [Event::MappingRenewed(_)]));

    // Delete with lifetime 0 (§15.1); the response copies the suggestion fields.
    let del = h.map(sub(1), nonce(1), 8080, 0, 0);
    assert_eq!(
        (del.result, del.lifetime, del.ext_port()),
        (ResultCode::Success, 0, 0)
    );
    assert!(matches!(
        h.take_events()[..],
        [Event::MappingDeleted {
            reason: DeleteReason::Client,
            ..
        }]
    ));
    // Idempotent: deleting again is SUCCESS (§15.1).
    assert_eq!(
        h.map(sub(1), nonce(1), 8080, 0, 0).result,
        ResultCode::Success
    );
    assert!(h.take_events().is_empty());
    assert_eq!(h.engine.mapping_count(), 0);
}

#[test]
fn wrong_nonce_is_not_authorized_with_remaining_lifetime_section_11_3() {
    let mut h = H::default();
    h.map(sub(1), nonce(1), 8080, 0, 3600);
    h.advance(600_000);
    for lifetime in [3600, 0] {
        let r = h.map(sub(1), nonce(2), 8080, 0, lifetime);
        assert_eq!(r.result, ResultCode::NotAuthorized);
        assert_eq!(r.lifetime, 3000, "lifetime of the existing mapping");
    }
    assert_eq!(h.engine.mapping_count(), 1);
}

#[test]
fn suggested_port_honoured_inside_the_port_set_section_11_3() {
    let mut h = H::default();
    let first = h.map(sub(1), nonce(1), 1000, 0, 3600);
    let usage = h.engine.subscriber(sub(1)).unwrap();
    let block = usage.blocks[0];
    // A free port of the subscriber's own block is honoured.
    let want = if first.ext_port() == block.first {
        block.first + 1
    } else {
        block.first
    };
    let r = h.map(sub(1), nonce(1), 2000, want, 3600);
    assert_eq!(r.ext_port(), want);
    // A port outside the set is only a hint: another port is given (§11.3).
    let outside = if block.first > 2000 { 1024 } else { 65000 };
    let r = h.map(sub(1), nonce(1), 3000, outside, 3600);
    assert_eq!(r.result, ResultCode::Success);
    assert!(block.contains(r.ext_port()));
    // A port already taken is a hint too.
    let r = h.map(sub(1), nonce(1), 4000, want, 3600);
    assert_eq!(r.result, ResultCode::Success);
    assert_ne!(r.ext_port(), want);
}

#[test]
fn prefer_failure_section_13_2() {
    let mut h = H::default();
    let taken = h.map(sub(1), nonce(1), 1000, 0, 3600).ext_port();
    let pf = [PcpOption::PreferFailure];
    // The suggestion cannot be provided: CANNOT_PROVIDE_EXTERNAL, no state.
    let r = h.map_opts(sub(1), nonce(1), 6, 2000, taken, 3600, &pf);
    assert_eq!(r.result, ResultCode::CannotProvideExternal);
    assert_eq!(h.engine.mapping_count(), 1);
    // It can: granted exactly, and the option is echoed.
    let free = if taken % 2 == 0 { taken + 1 } else { taken - 1 };
    let r = h.map_opts(sub(1), nonce(1), 6, 2000, free, 3600, &pf);
    assert_eq!((r.result, r.ext_port()), (ResultCode::Success, free));
    assert_eq!(r.options, vec!["PreferFailure".to_string()]);
    // Renewal suggesting another port: CANNOT_PROVIDE_EXTERNAL (§11.3 item 1).
    let r = h.map_opts(sub(1), nonce(1), 6, 2000, taken, 3600, &pf);
    assert_eq!(r.result, ResultCode::CannotProvideExternal);
    // Suggested port 0: MALFORMED_OPTION (§13.2); lifetime 0: MALFORMED_OPTION (§11.3).
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 6, 3000, 0, 3600, &pf).result,
        ResultCode::MalformedOption
    );
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 6, 3000, free, 0, &pf).result,
        ResultCode::MalformedOption
    );
}

#[test]
fn protocol_and_port_zero_rules_section_11_3() {
    let mut h = H::default();
    // Protocol 0 with a port: MALFORMED_REQUEST, for create and delete.
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 0, 80, 0, 3600, &[]).result,
        ResultCode::MalformedRequest
    );
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 0, 80, 0, 0, &[]).result,
        ResultCode::MalformedRequest
    );
    // All-ports and DMZ mappings cannot be given inside a port set.
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 6, 0, 0, 3600, &[]).result,
        ResultCode::UnsuppProtocol
    );
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 0, 0, 0, 3600, &[]).result,
        ResultCode::UnsuppProtocol
    );
    // A protocol the NAT does not handle.
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 132, 80, 0, 3600, &[]).result,
        ResultCode::UnsuppProtocol
    );
    // Deleting a wildcard that does not exist is SUCCESS.
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 6, 0, 0, 0, &[]).result,
        ResultCode::Success
    );
    assert_eq!(h.engine.mapping_count(), 0);
}

#[test]
fn lifetimes_are_clamped_section_15() {
    let mut h = H::default();
    assert_eq!(h.map(sub(1), nonce(1), 1, 0, 5).lifetime, 120);
    assert_eq!(h.map(sub(1), nonce(1), 2, 0, u32::MAX).lifetime, 86_400);
    assert_eq!(h.map(sub(1), nonce(1), 3, 0, 600).lifetime, 600);
}

#[test]
fn error_lifetimes_short_and_long_section_7_4() {
    let mut cfg = test_config();
    cfg.lifetimes.short_error = 7;
    cfg.lifetimes.long_error = 777;
    let mut h = H::new(cfg);
    // Long: MALFORMED_REQUEST.
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 0, 80, 0, 3600, &[]).lifetime,
        777
    );
    // Short: NO_RESOURCES from the rate limiter is sized to the wait; fill
    // the pool instead to see the configured value.
    let r = h.map_opts(
        sub(1),
        nonce(1),
        6,
        80,
        0,
        3600,
        &[PcpOption::Unknown { code: 5, data: &[] }],
    );
    assert_eq!((r.result, r.lifetime), (ResultCode::UnsuppOption, 777));
}

#[test]
fn peer_section_12_3_and_endpoint_independence() {
    let mut h = H::default();
    let peer1: IpAddr = "203.0.113.9".parse().unwrap();
    let peer2: IpAddr = "198.51.100.20".parse().unwrap();
    let a = h.peer(sub(1), nonce(1), 5000, peer1, 443, 0, 600);
    assert_eq!(a.result, ResultCode::Success);
    // Remote peer fields are echoed.
    match a.data {
        OpData::Peer(p) => assert_eq!((p.remote_addr, p.remote_port), (peer1, 443)),
        _ => panic!("PEER reply"),
    }
    // Same internal endpoint, other peer: same external port (RFC 4787 EIM).
    let b = h.peer(sub(1), nonce(2), 5000, peer2, 80, 0, 600);
    assert_eq!((b.result, b.ext()), (ResultCode::Success, a.ext()));
    // Renewal keeps it; another nonce is NOT_AUTHORIZED.
    assert_eq!(
        h.peer(sub(1), nonce(1), 5000, peer1, 443, 0, 900).ext(),
        a.ext()
    );
    assert_eq!(
        h.peer(sub(1), nonce(9), 5000, peer1, 443, 0, 900).result,
        ResultCode::NotAuthorized
    );
    // A suggestion that cannot be honoured: CANNOT_PROVIDE_EXTERNAL (§12.3).
    let other = if a.ext_port() % 2 == 0 {
        a.ext_port() + 1
    } else {
        a.ext_port() - 1
    };
    let peer3: IpAddr = "198.51.100.30".parse().unwrap();
    assert_eq!(
        h.peer(sub(1), nonce(3), 5000, peer3, 80, other, 600).result,
        ResultCode::CannotProvideExternal
    );
    // MAP for the same endpoint replicates the outbound port (§11.3 item 4)...
    let m = h.map(sub(1), nonce(4), 5000, 0, 600);
    assert_eq!(m.ext(), a.ext());
    // ...and MAP cannot delete an outbound mapping (§15.1) once the MAP is gone.
    h.map(sub(1), nonce(4), 5000, 0, 0);
    assert_eq!(
        h.map(sub(1), nonce(4), 5000, 0, 0).result,
        ResultCode::NotAuthorized
    );
    // Invalid remote peers: MALFORMED_REQUEST (§12.3).
    for bad in ["127.0.0.1", "0.0.0.0", "224.0.0.1"] {
        let r = h.peer(sub(1), nonce(5), 6000, bad.parse().unwrap(), 80, 0, 600);
        assert_eq!(r.result, ResultCode::MalformedRequest, "{bad}");
    }
    // PEER delete.
    assert_eq!(
        h.peer(sub(1), nonce(1), 5000, peer1, 443, 0, 0).result,
        ResultCode::Success
    );
    assert_eq!(h.engine.mapping_count(), 1);
}

#[test]
fn announce_section_14_1() {
    let mut h = H::default();
    let req = pcp_wire::Request {
        lifetime: 0,
        client_addr: sub(1),
        data: OpData::Announce,
        options: pcp_wire::Options::NONE,
    };
    h.advance(5_000);
    let r = h.pcp(from(sub(1)), &req);
    assert_eq!((r.result, r.lifetime, r.epoch), (ResultCode::Success, 0, 5));
    assert!(
        h.take_events().is_empty(),
        "solicited ANNOUNCE changes no state"
    );
    // Even from a non-subscriber: ANNOUNCE only reports the epoch.
    let outsider: IpAddr = "198.18.0.1".parse().unwrap();
    let req = pcp_wire::Request {
        client_addr: outsider,
        ..req
    };
    assert_eq!(h.pcp(from(outsider), &req).result, ResultCode::Success);
}

#[test]
fn unsolicited_announce_schedule_section_14_1_3() {
    let mut h = H::default();
    let client: std::net::SocketAddr = "100.64.0.1:5350".parse().unwrap();
    h.engine.announce_restart(h.now, &[client]);
    let start = h.now;
    let mut seen = Vec::new();
    for tx in h.advance(10_000) {
        let r = pcp_wire::Response::parse(&tx.payload).unwrap();
        assert_eq!(
            (r.result, r.opcode()),
            (ResultCode::Success, pcp_wire::Opcode::Announce)
        );
        seen.push((tx.dst, r.epoch));
    }
    // 3 destinations (224.0.0.1, ff02::1, the client) x 4 sends.
    assert_eq!(seen.len(), 12);
    assert!(seen.iter().any(|(d, _)| d.to_string() == "224.0.0.1:5350"));
    assert!(seen.iter().any(|(d, _)| d.to_string() == "[ff02::1]:5350"));
    // Intervals at least 250 ms, then doubling: sends at 0, 250, 750, 1750 ms.
    let _ = start;
    let epochs: Vec<u32> = seen
        .iter()
        .filter(|(d, _)| *d == client)
        .map(|(_, e)| *e)
        .collect();
    assert_eq!(epochs, vec![0, 0, 0, 1]);
}

#[test]
fn filters_section_13_3() {
    let mut h = H::default();
    let f = |last: u8| {
        PcpOption::Filter(Filter {
            prefix_len: 128,
            remote_port: 0,
            remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, last)),
        })
    };
    let clear = PcpOption::Filter(Filter {
        prefix_len: 0,
        remote_port: 0,
        remote_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    let r = h.map_opts(sub(1), nonce(1), 6, 22, 0, 3600, &[f(1)]);
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.options.len(), 1, "FILTER echoed");
    let filters = |h: &H| h.engine.mappings().next().unwrap().filters().to_vec();
    assert_eq!(filters(&h).len(), 1);
    // Renewal adds filters (§13.3: "added to any existing filters").
    h.map_opts(sub(1), nonce(1), 6, 22, 0, 3600, &[f(2)]);
    assert_eq!(filters(&h).len(), 2);
    // Over the limit of 2: EXCESSIVE_REMOTE_PEERS and nothing changes.
    let r = h.map_opts(sub(1), nonce(1), 6, 22, 0, 3600, &[f(3)]);
    assert_eq!(r.result, ResultCode::ExcessiveRemotePeers);
    assert_eq!(filters(&h).len(), 2);
    // Prefix length 0 first clears, then the new one is added.
    h.map_opts(sub(1), nonce(1), 6, 22, 0, 3600, &[clear, f(3)]);
    assert_eq!(filters(&h).len(), 1);
    assert_eq!(
        filters(&h)[0].remote_addr,
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 3))
    );
    // New mapping with too many filters: refused, no state.
    let r = h.map_opts(sub(1), nonce(1), 6, 23, 0, 3600, &[f(1), f(2), f(3)]);
    assert_eq!(r.result, ResultCode::ExcessiveRemotePeers);
    assert_eq!(h.engine.mapping_count(), 1);
    // FILTER with lifetime 0: MALFORMED_OPTION; FILTER on PEER: UNSUPP_OPTION.
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 6, 22, 0, 0, &[f(1)]).result,
        ResultCode::MalformedOption
    );
    let mut buf = [0u8; 1100];
    let req = pcp_wire::Request {
        lifetime: 600,
        client_addr: sub(1),
        data: OpData::Peer(pcp_wire::PeerData {
            map: pcp_wire::MapData {
                nonce: nonce(1),
                protocol: 6,
                internal_port: 22,
                external_port: 0,
                external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            },
            remote_port: 80,
            remote_addr: "203.0.113.1".parse().unwrap(),
        }),
        options: pcp_wire::Options::List(&[f(1)]),
    };
    let n = req.emit(&mut buf).unwrap();
    let reply = h.raw(from(sub(1)), &buf[..n]).unwrap();
    assert_eq!(reply[3], u8::from(ResultCode::UnsuppOption));
}

#[test]
fn filter_disabled_is_unsupp_option_section_7_3() {
    let mut cfg = test_config();
    cfg.options.filter = false;
    let mut h = H::new(cfg);
    let f = PcpOption::Filter(Filter {
        prefix_len: 128,
        remote_port: 0,
        remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)),
    });
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 6, 22, 0, 3600, &[f]).result,
        ResultCode::UnsuppOption
    );
}

#[test]
fn description_rfc7220_is_stored_and_echoed() {
    let mut h = H::default();
    let r = h.map_opts(
        sub(1),
        nonce(1),
        6,
        80,
        0,
        3600,
        &[PcpOption::Description("web server")],
    );
    assert_eq!(r.options, vec![r#"Description("web server")"#.to_string()]);
    let m = h.engine.mappings().next().unwrap();
    assert_eq!(
        m.extra.as_ref().unwrap().description.as_deref(),
        Some("web server")
    );

    let mut cfg = test_config();
    cfg.options.description = false;
    let mut h = H::new(cfg);
    let r = h.map_opts(
        sub(1),
        nonce(1),
        6,
        80,
        0,
        3600,
        &[PcpOption::Description("x")],
    );
    assert_eq!(r.result, ResultCode::Success);
    assert!(
        r.options.is_empty(),
        "unprocessed optional options are not echoed (§7.3)"
    );
}

#[test]
fn port_set_rfc7753_is_contiguous() {
    let mut h = H::default();
    let ps = [PcpOption::PortSet(PortSet {
        size: 4,
        first_internal_port: 6000,
        parity: true,
    })];
    let r = h.map_opts(sub(1), nonce(1), 17, 6000, 0, 3600, &ps);
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.ext_port() % 2, 0, "parity of internal port 6000 kept");
    assert!(r.options[0].contains("size: 4"), "{:?}", r.options);
    let m = h.engine.mappings().next().unwrap();
    assert_eq!(m.port_count, 4);
    // Each of the 4 ports is held; they count against the quota of 8.
    for i in 0..4 {
        assert!(h
            .engine
            .mapping_at(m.external_addr, 17, m.external_port + i)
            .is_some());
    }
    assert_eq!(h.engine.subscriber(sub(1)).unwrap().mappings, 4);
    // A set of 1 is a plain mapping: no PORT_SET in the response.
    let one = [PcpOption::PortSet(PortSet {
        size: 1,
        first_internal_port: 7000,
        parity: false,
    })];
    let r = h.map_opts(sub(1), nonce(1), 17, 7000, 0, 3600, &one);
    assert!(r.options.is_empty());
    // PORT_SET with PREFER_FAILURE: MALFORMED_OPTION (RFC 7753 §4.2).
    let both = [
        PcpOption::PortSet(PortSet {
            size: 2,
            first_internal_port: 8000,
            parity: false,
        }),
        PcpOption::PreferFailure,
    ];
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 17, 8000, 9000, 3600, &both)
            .result,
        ResultCode::MalformedOption
    );
    // Quota caps the set: 3 ports left of 8.
    let big = [PcpOption::PortSet(PortSet {
        size: 50,
        first_internal_port: 9000,
        parity: false,
    })];
    let r = h.map_opts(sub(1), nonce(1), 17, 9000, 0, 3600, &big);
    assert!(r.options[0].contains("size: 3"), "{:?}", r.options);
}

#[test]
fn prefix64_rfc7225_answered_from_config() {
    let mut h = H::default();
    let req_opt = [PcpOption::Prefix64(Prefix64 {
        prefix_len: 12,
        prefix_and_suffix: [0; 12],
        ipv4_prefixes: None,
    })];
    let r = h.map_opts(sub(1), nonce(1), 6, 80, 0, 3600, &req_opt);
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.options.len(), 1);
    assert!(
        r.options[0].contains("prefix_and_suffix: [0, 100, 255, 155, 0"),
        "{:?}",
        r.options
    );
    // Not configured: never sent (RFC 7225 §4.2).
    let mut cfg = test_config();
    cfg.options.prefix64 = None;
    let mut h = H::new(cfg);
    assert!(h
        .map_opts(sub(1), nonce(1), 6, 80, 0, 3600, &req_opt)
        .options
        .is_empty());
}

#[test]
fn address_mismatch_section_8_2() {
    let mut h = H::default();
    let req = pcp_wire::Request {
        lifetime: 3600,
        client_addr: sub(2),
        data: OpData::Announce,
        options: pcp_wire::Options::NONE,
    };
    let r = h.pcp(from(sub(1)), &req);
    assert_eq!((r.result, r.lifetime), (ResultCode::AddressMismatch, 1800));
}

#[test]
fn epoch_counts_seconds_from_its_start_section_8_5() {
    let mut h = H::default();
    assert_eq!(h.map(sub(1), nonce(1), 1, 0, 600).epoch, 0);
    h.advance(90_500);
    assert_eq!(h.map(sub(1), nonce(1), 1, 0, 600).epoch, 90);
    // A shard started with a recovered epoch start continues it.
    assert_eq!(h.engine.epoch(h.now + 1000), 91);
}

#[test]
fn natpmp_rfc6886_shares_state_with_pcp() {
    let mut h = H::default();
    let pa = h.natpmp(sub(1), natpmp::Request::PublicAddress);
    let natpmp::Response::PublicAddress { result, addr, .. } = pa else {
        panic!()
    };
    assert_eq!(result, NatPmpResult::Success);
    assert!(POOL.contains(&addr));
    let m = natpmp::Mapping {
        protocol: natpmp::Protocol::Tcp,
        internal_port: 8080,
        external_port: 0,
        lifetime: 7200,
    };
    let natpmp::Response::Map {
        result, mapping, ..
    } = h.natpmp(sub(1), natpmp::Request::Map(m))
    else {
        panic!()
    };
    assert_eq!(
        (result, mapping.internal_port, mapping.lifetime),
        (NatPmpResult::Success, 8080, 7200)
    );
    // The same mapping is what PCP sees (§11.3: an existing mapping's port);
    // a NAT-PMP mapping has no nonce, so PCP from the same host adopts it.
    let pcp = h.map(sub(1), nonce(1), 8080, 0, 600);
    assert_eq!(pcp.ext_port(), mapping.external_port);
    assert_eq!(pcp.ext().0, IpAddr::V4(addr));
    assert_eq!(
        h.map(sub(1), nonce(2), 8080, 0, 600).result,
        ResultCode::NotAuthorized,
        "adopted nonce holds"
    );
    // Delete all TCP mappings (§3.4): those NAT-PMP made. The one PCP
    // adopted is PCP's now and stays; a NAT-PMP one on 8081 goes.
    let other = natpmp::Mapping {
        internal_port: 8081,
        ..m
    };
    h.natpmp(sub(1), natpmp::Request::Map(other));
    assert_eq!(h.engine.mapping_count(), 2);
    let all = natpmp::Mapping {
        internal_port: 0,
        external_port: 0,
        lifetime: 0,
        ..m
    };
    let natpmp::Response::Map { result, .. } = h.natpmp(sub(1), natpmp::Request::Map(all)) else {
        panic!()
    };
    assert_eq!(result, NatPmpResult::Success);
    assert_eq!(h.engine.mapping_count(), 1, "the PCP mapping stays");
    // A non-subscriber is refused.
    let outsider: IpAddr = "198.18.0.1".parse().unwrap();
    let natpmp::Response::Map {
        result, mapping, ..
    } = h.natpmp(outsider, natpmp::Request::Map(m))
    else {
        panic!()
    };
    assert_eq!(
        (result, mapping.external_port, mapping.lifetime),
        (NatPmpResult::NotAuthorized, 0, 0)
    );
}

#[test]
fn natpmp_disabled_answers_unsupp_version_section_9() {
    let mut cfg = test_config();
    cfg.natpmp = false;
    let mut h = H::new(cfg);
    let reply = h.raw(from(sub(1)), &[0, 0]).unwrap();
    assert_eq!(&reply[..4], &[2, 0x80, 0, 1]);
}

#[test]
fn paired_pooling_and_block_growth_rfc6888() {
    let mut cfg = test_config();
    cfg.pools.get_mut("cgnat").unwrap().block_size = 4;
    cfg.pools.get_mut("cgnat").unwrap().ports = pcp_engine::config::PortRange {
        first: 1024,
        last: 1039,
    };
    cfg.profiles.get_mut("home").unwrap().max_mappings = 100;
    let mut h = H::new(cfg);
    // Quota of 2 blocks x 4 ports = 8 mappings; all on one address.
    let mut addrs = std::collections::HashSet::new();
    for p in 0..8 {
        let r = h.map(sub(1), nonce(1), 1000 + p, 0, 3600);
        assert_eq!(r.result, ResultCode::Success, "mapping {p}");
        addrs.insert(r.ext().0);
    }
    assert_eq!(addrs.len(), 1, "paired pooling: one external address");
    assert_eq!(h.engine.subscriber(sub(1)).unwrap().blocks.len(), 2);
    // A third block would exceed max_blocks: USER_EX_QUOTA.
    assert_eq!(
        h.map(sub(1), nonce(1), 2000, 0, 3600).result,
        ResultCode::UserExQuota
    );
    assert!(h
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::QuotaExceeded { .. })));
    // 4 addresses x 4 blocks = 16 blocks: fill the pool with other subscribers.
    let mut n = 2u8;
    loop {
        let r = h.map(sub(n), nonce(1), 1, 0, 3600);
        if r.result != ResultCode::Success {
            assert_eq!(r.result, ResultCode::NoResources);
            assert_eq!(r.lifetime, 30, "short lifetime error");
            break;
        }
        n += 1;
    }
    assert_eq!(n, 2 + 14, "16 blocks, 2 taken by the first subscriber");
    assert!(h
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::PoolExhausted { .. })));
}

#[test]
fn deterministic_pool_rfc7422() {
    let yaml = r#"
pools:
  det:
    prefixes: [198.51.100.0/30]
    ports: { first: 1024, last: 2047 }
    block_size: 256
    mode: deterministic
profiles:
  p: { max_mappings: 10 }
subscribers:
  - prefixes: [100.64.0.0/28]
    pool: det
    profile: p
"#;
    let mut h = H::new(serde_yaml::from_str(yaml).unwrap());
    // Subscriber index i: address i / 4, range (i % 4) * 256.
    let r = h.map(
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, 6)),
        nonce(1),
        80,
        0,
        600,
    );
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.ext().0, IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)));
    assert!((1024 + 2 * 256..1024 + 3 * 256).contains(&r.ext_port()));
    // "Who held 198.51.100.3:1800?" is computed: index 3*4 + 3 = 15.
    let who = h
        .engine
        .lookup(Ipv4Addr::new(198, 51, 100, 3), 1800, T0)
        .unwrap();
    assert_eq!(who.internal_addr, IpAddr::V4(Ipv4Addr::new(100, 64, 0, 15)));
    assert_eq!(who.block.first, 1792);
}

#[test]
fn ports_are_unpredictable_rfc6888_req13() {
    // The same request from 20 subscribers lands on different offsets
    // within their blocks, and one subscriber's successive ports are not
    // sequential.
    let mut h = H::default();
    let mut offsets = std::collections::HashSet::new();
    for n in 1..=20u8 {
        let r = h.map(sub(n), nonce(1), 80, 0, 600);
        let block = h.engine.subscriber(sub(n)).unwrap().blocks[0];
        offsets.insert(r.ext_port() - block.first);
    }
    assert!(
        offsets.len() >= 15,
        "offsets within blocks vary: {offsets:?}"
    );
    let ports: Vec<u16> = (0..6)
        .map(|i| h.map(sub(1), nonce(1), 100 + i, 0, 600).ext_port())
        .collect();
    let sequential = ports.windows(2).filter(|w| w[1] == w[0] + 1).count();
    assert!(sequential <= 1, "{ports:?}");
}

#[test]
fn reuse_delay_rfc6888_req8_and_section_15() {
    let mut cfg = test_config();
    cfg.pools.get_mut("cgnat").unwrap().block_size = 2;
    cfg.pools.get_mut("cgnat").unwrap().ports = pcp_engine::config::PortRange {
        first: 1024,
        last: 1025,
    };
    cfg.profiles.get_mut("home").unwrap().max_blocks = 1;
    let mut h = H::new(cfg);
    let a = h.map(sub(1), nonce(1), 10, 0, 600).ext_port();
    let b = h.map(sub(1), nonce(1), 11, 0, 600).ext_port();
    assert_ne!(a, b);
    h.map(sub(1), nonce(1), 10, 0, 0); // release port a
                                       // Another internal port cannot take `a` during the reuse delay.
    assert_eq!(
        h.map(sub(1), nonce(1), 12, 0, 600).result,
        ResultCode::UserExQuota
    );
    // The same client (address, port, nonce) may reclaim it (§15).
    assert_eq!(h.map(sub(1), nonce(1), 10, a, 600).ext_port(), a);
    h.map(sub(1), nonce(1), 10, 0, 0);
    h.advance(120_000);
    assert_eq!(
        h.map(sub(1), nonce(1), 12, 0, 600).ext_port(),
        a,
        "free after 120 s"
    );
}

#[test]
fn quota_user_ex_quota_section_7_4() {
    let mut h = H::default();
    for p in 0..8 {
        assert_eq!(
            h.map(sub(1), nonce(1), 100 + p, 0, 600).result,
            ResultCode::Success
        );
    }
    let r = h.map(sub(1), nonce(1), 200, 0, 600);
    assert_eq!(r.result, ResultCode::UserExQuota);
    assert!(r.lifetime >= 1 && r.lifetime <= 30);
    // Renewing existing ones still works.
    assert_eq!(
        h.map(sub(1), nonce(1), 100, 0, 600).result,
        ResultCode::Success
    );
    assert_eq!(h.engine.stats().quota_refusals, 1);
}

#[test]
fn rate_limit_answers_no_resources_section_8_2() {
    let mut cfg = test_config();
    let p = cfg.profiles.get_mut("home").unwrap();
    p.rate_per_sec = 1;
    p.burst = 3;
    let mut h = H::new(cfg);
    for _ in 0..3 {
        assert_eq!(
            h.map(sub(1), nonce(1), 80, 0, 600).result,
            ResultCode::Success
        );
    }
    let r = h.map(sub(1), nonce(1), 80, 0, 600);
    assert_eq!((r.result, r.lifetime), (ResultCode::NoResources, 1));
    h.advance(1000);
    assert_eq!(
        h.map(sub(1), nonce(1), 80, 0, 600).result,
        ResultCode::Success
    );
    assert_eq!(h.engine.stats().rate_limited, 1);
}

#[test]
fn non_subscribers_are_not_authorized() {
    let mut h = H::default();
    let outsider: IpAddr = "198.18.0.1".parse().unwrap();
    let r = h.map(outsider, nonce(1), 80, 0, 600);
    assert_eq!((r.result, r.lifetime), (ResultCode::NotAuthorized, 1800));
}

#[test]
fn third_party_section_13_1() {
    let tp = |a: IpAddr| [PcpOption::ThirdParty(a)];
    let manager: IpAddr = "10.99.0.5".parse().unwrap();
    // Disabled: UNSUPP_OPTION.
    let mut cfg = test_config();
    cfg.third_party.clear();
    let mut h = H::new(cfg);
    assert_eq!(
        h.map_opts(manager, nonce(1), 6, 80, 0, 600, &tp(sub(1)))
            .result,
        ResultCode::UnsuppOption
    );

    let mut h = H::default();
    // Unauthorized source: UNSUPP_OPTION.
    assert_eq!(
        h.map_opts(sub(7), nonce(1), 6, 80, 0, 600, &tp(sub(1)))
            .result,
        ResultCode::UnsuppOption
    );
    // The sender's own address: MALFORMED_REQUEST.
    assert_eq!(
        h.map_opts(manager, nonce(1), 6, 80, 0, 600, &tp(manager))
            .result,
        ResultCode::MalformedRequest
    );
    // Authorized source, target outside its `for` prefixes: NOT_AUTHORIZED.
    let far: IpAddr = "100.65.0.1".parse().unwrap();
    assert_eq!(
        h.map_opts(manager, nonce(1), 6, 80, 0, 600, &tp(far))
            .result,
        ResultCode::NotAuthorized
    );
    assert_eq!(h.engine.stats().third_party_refusals, 3);
    // Authorized: the mapping belongs to the target, the option is echoed.
    let r = h.map_opts(manager, nonce(1), 6, 80, 0, 600, &tp(sub(1)));
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.options.len(), 1);
    let m = h.engine.mappings().next().unwrap();
    assert_eq!(m.internal_addr, sub(1));
    // The target itself renewing with the same nonce sees the same mapping.
    assert_eq!(h.map(sub(1), nonce(1), 80, 0, 600).ext(), r.ext());
}

#[test]
fn unknown_options_section_7_3() {
    let mut h = H::default();
    let mandatory = [PcpOption::Unknown {
        code: 99,
        data: &[1, 2],
    }];
    assert_eq!(
        h.map_opts(sub(1), nonce(1), 6, 80, 0, 600, &mandatory)
            .result,
        ResultCode::UnsuppOption
    );
    let optional = [PcpOption::Unknown {
        code: 200,
        data: &[1, 2],
    }];
    let r = h.map_opts(sub(1), nonce(1), 6, 80, 0, 600, &optional);
    assert_eq!(r.result, ResultCode::Success);
    assert!(r.options.is_empty());
}

#[test]
fn error_response_is_a_copy_of_the_request_section_7_2() {
    let mut h = H::default();
    let r = h.map_opts(
        sub(1),
        nonce(3),
        6,
        80,
        0,
        600,
        &[PcpOption::Unknown {
            code: 99,
            data: &[1, 2],
        }],
    );
    let mut req = [0u8; 1100];
    let n = pcp_wire::Request {
        lifetime: 600,
        client_addr: sub(1),
        data: OpData::Map(pcp_wire::MapData {
            nonce: nonce(3),
            protocol: 6,
            internal_port: 80,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: pcp_wire::Options::List(&[PcpOption::Unknown {
            code: 99,
            data: &[1, 2],
        }]),
    }
    .emit(&mut req)
    .unwrap();
    assert_eq!(r.bytes.len(), n);
    assert_eq!(
        &r.bytes[24..n],
        &req[24..n],
        "opcode data and options copied"
    );
}

/// An expiry storm is worked off TIMER_BUDGET timers a call, the engine
/// saying "due now" until it is done, so a shard answers requests between
/// slices instead of stalling for the whole storm; every mapping expires.
#[test]
fn an_expiry_storm_is_worked_off_a_slice_at_a_time() {
    let mut cfg = test_config();
    cfg.profiles.get_mut("home").unwrap().max_mappings = 500;
    let mut h = H::new(cfg);
    let n = 2 * TIMER_BUDGET + 100;
    // 420 mappings per subscriber: each within its one block of 512.
    for i in 0..n {
        let (who, port) = (sub(1 + (i / 420) as u8), 10_000 + (i % 420) as u16);
        let r = h.map(who, nonce(1), port, 0, 120);
        assert_eq!(r.result, ResultCode::Success, "mapping {i}");
    }
    h.take_events();
    let due = T0 + 121_000;
    let mut calls = Vec::new();
    while h.engine.poll_timeout().is_some_and(|t| t <= due) && calls.len() < 10 {
        let before = h.engine.mapping_count();
        h.engine.handle_timeout(due);
        calls.push(before - h.engine.mapping_count());
    }
    assert_eq!(calls, [TIMER_BUDGET, TIMER_BUDGET, 100]);
    assert_eq!(h.engine.mapping_count(), 0);
    assert_eq!(expired_count(&h.take_events()), n);
}

#[test]
fn expiry_on_the_virtual_clock() {
    let mut h = H::default();
    h.map(sub(1), nonce(1), 80, 0, 120);
    h.take_events();
    h.advance(119_000);
    assert_eq!(h.engine.mapping_count(), 1);
    h.advance(1_000);
    assert_eq!(h.engine.mapping_count(), 0);
    assert!(matches!(
        h.take_events()[..],
        [Event::MappingDeleted {
            reason: DeleteReason::Expired,
            ..
        }]
    ));
    // The idle block goes back after block_hold (300 s) and is in history.
    let block = h.engine.subscriber(sub(1)).unwrap().blocks[0];
    h.advance(300_000);
    assert!(h.engine.subscriber(sub(1)).is_none());
    assert!(h
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::BlockReleased { .. })));
    assert_eq!(h.shared.block_owner(block.addr, block.first), None);
    let who = h
        .engine
        .lookup(block.addr, block.first + 3, T0 + 60_000)
        .unwrap();
    assert_eq!(who.internal_addr, sub(1));
    assert!(h
        .engine
        .lookup(block.addr, block.first + 3, h.now)
        .is_none());
}

#[test]
fn drain_moves_mappings_and_sends_updates_section_14_2() {
    let mut h = H::default();
    let r = h.map_opts(
        sub(1),
        nonce(1),
        6,
        80,
        0,
        3600,
        &[PcpOption::Filter(Filter {
            prefix_len: 120,
            remote_port: 0,
            remote_addr: "203.0.113.0".parse().unwrap(),
        })],
    );
    let IpAddr::V4(old) = r.ext().0 else { panic!() };
    let pf_port = h.map(sub(1), nonce(1), 81, 0, 3600).ext_port();
    let pf = h.map_opts(
        sub(1),
        nonce(1),
        6,
        82,
        pf_port + 1,
        3600,
        &[PcpOption::PreferFailure],
    );
    assert_eq!(pf.result, ResultCode::Success);
    h.take_events();
    assert!(h.shared.set_draining(old, true));
    let moved = h.engine.drain(h.now, old);
    assert_eq!(moved, 2, "the PREFER_FAILURE mapping cannot move");
    let events = h.take_events();
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::MappingMoved { .. })));
    assert!(events.iter().any(|e| matches!(
        e,
        Event::MappingDeleted {
            reason: DeleteReason::Drained,
            ..
        }
    )));
    let m = h
        .engine
        .mappings_of(sub(1))
        .into_iter()
        .find(|m| m.internal_port == 80)
        .unwrap()
        .clone();
    assert_ne!(m.external_addr, old);
    assert_eq!(m.filters().len(), 1, "filters move with the mapping");
    // Updates at 0, 250 and 750 ms (§14.2), three each.
    let sent = h.advance(100);
    assert_eq!(sent.len(), 3);
    for tx in &sent {
        assert_eq!(tx.dst, from(sub(1)));
    }
    let upd: Vec<_> = sent
        .iter()
        .map(|t| pcp_wire::Response::parse(&t.payload).unwrap())
        .collect();
    let ok = upd
        .iter()
        .find(|r| r.result == ResultCode::Success && r.data.map_data().unwrap().internal_port == 80)
        .unwrap();
    assert_eq!(
        ok.data.map_data().unwrap().external_addr,
        IpAddr::V4(m.external_addr)
    );
    assert_eq!(ok.options.iter().count(), 1, "FILTER sent in the update");
    assert!(upd
        .iter()
        .any(|r| r.result == ResultCode::CannotProvideExternal));
    assert_eq!(h.advance(100).len(), 0, "nothing at 200 ms");
    assert_eq!(h.advance(100).len(), 3, "second send at 250 ms");
    // The client refreshes mapping 80: its third send is cancelled.
    h.map(sub(1), nonce(1), 80, 0, 3600);
    assert_eq!(h.advance(1000).len(), 2, "third send only for the others");
    // New blocks never land on the drained address.
    assert!(h
        .engine
        .subscriber(sub(1))
        .unwrap()
        .blocks
        .iter()
        .all(|b| b.addr != old));
}

#[test]
fn static_mappings_section_11_3_item_2() {
    let mut h = H::default();
    let s = h
        .engine
        .create_static(
            h.now,
            pcp_engine::InternalEndpoint {
                addr: sub(1),
                protocol: 6,
                port: 443,
            },
            0,
        )
        .unwrap();
    assert_eq!(s.kind, MappingKind::Static);
    let r = h.map(sub(1), nonce(1), 443, 0, 600);
    assert_eq!((r.result, r.lifetime), (ResultCode::Success, u32::MAX));
    assert_eq!(r.ext_port(), s.external_port);
    assert_eq!(
        h.map(sub(1), nonce(1), 443, 0, 0).result,
        ResultCode::NotAuthorized
    );
    // Operators delete it by id.
    assert!(h.engine.delete(h.now, s.id).is_some());
    assert_eq!(h.engine.mapping_count(), 0);
    assert!(h.engine.delete(h.now, s.id).is_none(), "ids are not reused");
}

#[test]
fn bad_datagrams_are_dropped_or_answered_section_8_2() {
    let mut h = H::default();
    assert!(h.raw(from(sub(1)), &[2]).is_none());
    let mut resp = vec![2u8, 0x81];
    resp.resize(60, 0);
    assert!(h.raw(from(sub(1)), &resp).is_none());
    let r = h.raw(from(sub(1)), &[3, 1, 0, 0]).unwrap();
    assert_eq!(
        (r.len(), r[0], r[3]),
        (24, 2, u8::from(ResultCode::UnsuppVersion))
    );
    let mut unknown_op = vec![2u8, 9];
    unknown_op.resize(28, 7);
    let r = h.raw(from(sub(1)), &unknown_op).unwrap();
    assert_eq!(
        (r.len(), r[1], r[3]),
        (28, 0x89, u8::from(ResultCode::UnsuppOpcode))
    );
    assert_eq!(&r[24..], &[7, 7, 7, 7], "payload copied (§8.2)");
    // Unknown versions and opcodes are counted in the "other" row.
    let other = h.engine.stats().responses[4];
    assert_eq!(other[usize::from(u8::from(ResultCode::UnsuppVersion))], 1);
    assert_eq!(other[usize::from(u8::from(ResultCode::UnsuppOpcode))], 1);
    let drops = &h.engine.stats().drops;
    assert_eq!(drops.get("too_short"), Some(&1));
    assert_eq!(drops.get("not_request"), Some(&1));
}

#[test]
fn sharding_is_a_pure_function_and_blocks_never_overlap() {
    use pcp_engine::{shard_of, subscriber_key, Compiled, Engine};
    use std::sync::Arc;
    assert_eq!(shard_of(sub(1), 4), shard_of(sub(1), 4));
    let mut counts = [0u32; 4];
    for i in 0..4000u32 {
        counts[shard_of(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i)), 4)] += 1;
    }
    assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    // THIRD_PARTY requests are steered to the target's shard.
    let mut buf = [0u8; 1100];
    let tp = [PcpOption::ThirdParty(sub(9))];
    let n = pcp_wire::Request {
        lifetime: 1,
        client_addr: "10.99.0.5".parse().unwrap(),
        data: OpData::Announce,
        options: pcp_wire::Options::List(&tp),
    }
    .emit(&mut buf)
    .unwrap();
    assert_eq!(
        subscriber_key(&buf[..n], "10.99.0.5".parse().unwrap()),
        sub(9)
    );

    // Two shards share one allocator: no block is handed out twice.
    let cfg = test_config();
    let shared = Arc::new(pcp_engine::BlockAllocator::new(&cfg));
    let compiled = Arc::new(Compiled::new(cfg, &shared).unwrap());
    let mut shards: Vec<Engine> = (0..2)
        .map(|i| Engine::new(compiled.clone(), shared.clone(), i, T0, i as u64))
        .collect();
    let mut blocks = std::collections::HashSet::new();
    for i in 1..=200u8 {
        let s = sub(i);
        let e = &mut shards[shard_of(s, 2)];
        let mut out = [0u8; 1100];
        let req = pcp_wire::Request {
            lifetime: 600,
            client_addr: s,
            data: OpData::Map(pcp_wire::MapData {
                nonce: nonce(1),
                protocol: 6,
                internal_port: 80,
                external_port: 0,
                external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            }),
            options: pcp_wire::Options::NONE,
        };
        let mut b = [0u8; 1100];
        let len = req.emit(&mut b).unwrap();
        let n = e.handle(T0, from(s), &b[..len], &mut out).unwrap();
        if out[3] == 0 {
            let u = e.subscriber(s).unwrap();
            assert!(
                blocks.insert((u.blocks[0].addr, u.blocks[0].first)),
                "block reused"
            );
        } else {
            assert_eq!(out[3], u8::from(ResultCode::NoResources));
        }
        let _ = n;
    }
    assert_eq!(blocks.len(), 200, "every subscriber got its own block");
}

#[test]
fn reuse_delay_same_client_is_per_port_for_port_sets() {
    // Found by the invariants property test: a PORT_SET run could reclaim a
    // cooling port for a different internal port of the same client.
    let mut cfg = test_config();
    cfg.pools.get_mut("cgnat").unwrap().block_size = 4;
    cfg.pools.get_mut("cgnat").unwrap().ports = pcp_engine::config::PortRange {
        first: 1024,
        last: 1027,
    };
    cfg.profiles.get_mut("home").unwrap().max_blocks = 1;
    let mut h = H::new(cfg);
    let set = |n| {
        [PcpOption::PortSet(PortSet {
            size: n,
            first_internal_port: 11,
            parity: false,
        })]
    };
    let r = h.map_opts(sub(1), nonce(1), 6, 11, 1025, 600, &set(2));
    assert_eq!(r.ext_port(), 1025, "1025->11, 1026->12");
    h.map(sub(1), nonce(1), 11, 0, 0);
    // Shifted by one, 1025 would forward to 12 and 1026 to 13: not the same client.
    let r = h.map_opts(sub(1), nonce(1), 6, 11, 1024, 600, &set(3));
    assert_eq!(r.result, ResultCode::Success);
    let m = h.engine.mappings().next().unwrap().clone();
    for i in 0..m.port_count {
        let (ext, int) = (m.external_port + i, m.internal_port + i);
        // A cooling port may only come back forwarding where it did: 1025->11, 1026->12.
        if ext == 1025 || ext == 1026 {
            assert_eq!(int, ext - 1014, "{m:?}");
        }
    }
    assert_ne!(m.external_port, 1024, "1024.. would send 1025 to 12: {m:?}");
    h.map(sub(1), nonce(1), 11, 0, 0);
    // The exact same client and ports may reclaim them (§15).
    let r = h.map_opts(sub(1), nonce(1), 6, 11, 1025, 600, &set(2));
    assert_eq!(r.ext_port(), 1025);
}

#[test]
fn drain_moves_peer_mappings_with_peer_updates_section_14_2() {
    let mut h = H::default();
    let remote: IpAddr = "203.0.113.50".parse().unwrap();
    let r = h.peer(sub(2), nonce(7), 4000, remote, 8443, 0, 600);
    assert_eq!(r.result, ResultCode::Success);
    let IpAddr::V4(old) = r.ext().0 else { panic!() };
    h.take_events();
    assert!(h.shared.set_draining(old, true));
    assert_eq!(h.engine.drain(h.now, old), 1);
    let sent = h.advance(10);
    assert_eq!(sent.len(), 1);
    let upd = pcp_wire::Response::parse(&sent[0].payload).unwrap();
    assert_eq!(upd.result, ResultCode::Success);
    let OpData::Peer(p) = upd.data else {
        panic!("a PEER update: {upd:?}")
    };
    assert_eq!(
        (p.remote_addr, p.remote_port, p.map.nonce),
        (remote, 8443, nonce(7))
    );
    assert_ne!(p.map.external_addr, IpAddr::V4(old));
    // The moved mapping answers renewals at its new endpoint.
    let again = h.peer(sub(2), nonce(7), 4000, remote, 8443, 0, 600);
    assert_eq!(again.ext(), (p.map.external_addr, p.map.external_port));
}

#[test]
fn peer_with_prefer_failure_is_malformed_request_section_12_1() {
    // RFC 6887 §12.1: "The PREFER_FAILURE option is neither required nor
    // allowed in PEER requests, and if a PCP server receives a PEER request
    // containing the PREFER_FAILURE option it MUST return a
    // MALFORMED_REQUEST error response."
    let mut h = H::default();
    let options = [PcpOption::PreferFailure];
    let req = Request {
        lifetime: 3600,
        client_addr: sub(1),
        data: OpData::Peer(PeerData {
            map: MapData {
                nonce: nonce(1),
                protocol: 6,
                internal_port: 5000,
                external_port: 0,
                external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            },
            remote_port: 443,
            remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
        }),
        options: Options::List(&options),
    };
    let r = h.pcp(from(sub(1)), &req);
    assert_eq!(r.result, ResultCode::MalformedRequest);
    assert_eq!(h.engine.mapping_count(), 0);
}

#[test]
fn description_not_utf8_is_ignored_rfc7220_section_3() {
    // RFC 7220 §3: an invalid DESCRIPTION (not UTF-8) is ignored: the
    // request is processed and no DESCRIPTION comes back.
    let mut h = H::default();
    let mut buf = [0u8; 1100];
    let req = Request {
        lifetime: 3600,
        client_addr: sub(1),
        data: OpData::Map(MapData {
            nonce: nonce(1),
            protocol: 6,
            internal_port: 80,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::NONE,
    };
    let n = req.emit(&mut buf).unwrap();
    // DESCRIPTION (code 128), length 2, bytes ff fe (not UTF-8), padding.
    buf[n..n + 8].copy_from_slice(&[0x80, 0, 0, 2, 0xff, 0xfe, 0, 0]);
    let bytes = h.raw(from(sub(1)), &buf[..n + 8]).expect("answered");
    let r = Response::parse(&bytes).expect("reply parses");
    assert_eq!(r.result, ResultCode::Success);
    assert_eq!(r.options.iter().count(), 0, "no DESCRIPTION is returned");
    let m = h.engine.mappings().next().expect("the mapping was made");
    assert!(m
        .extra
        .as_ref()
        .and_then(|e| e.description.as_ref())
        .is_none());
}

#[test]
fn dynamic_pools_above_2_to_the_20_addresses_are_refused_with_their_path() {
    // Each address of a dynamic pool has its free list in memory: a /0
    // would be 2^32 of them. The limit is a /12.
    let mut cfg = test_config();
    cfg.pools.get_mut("cgnat").unwrap().prefixes = vec!["10.0.0.0/11".parse().unwrap()];
    let problems = cfg.validate();
    assert!(
        problems
            .iter()
            .any(|p| p.path == "pools.cgnat.prefixes" && p.message.contains("at most 1048576")),
        "{problems:?}"
    );
    cfg.pools.get_mut("cgnat").unwrap().prefixes = vec!["10.0.0.0/12".parse().unwrap()];
    assert!(cfg.validate().is_empty());
}

#[test]
fn a_mapping_is_gone_the_instant_its_lifetime_ends_section_15() {
    let mut h = H::default();
    // Off a whole second, so the timer wheel (whole seconds) reaps it late.
    h.advance(500);
    let r = h.map(sub(1), nonce(1), 8080, 0, 3600);
    assert_eq!(r.result, ResultCode::Success);
    h.take_events();
    // 5 ms after expiry, before any sweep: a new nonce for the same
    // internal port is a new mapping, not NOT_AUTHORIZED (§15: the old one
    // no longer exists).
    h.now += 3_600_000 + 5;
    let again = h.map(sub(1), nonce(2), 8080, 0, 3600);
    assert_eq!((again.result, again.lifetime), (ResultCode::Success, 3600));
    let events = h.take_events();
    assert!(
        matches!(
            events[..],
            [
                Event::MappingDeleted {
                    reason: DeleteReason::Expired,
                    ..
                },
                Event::MappingCreated(_)
            ]
        ),
        "{events:?}"
    );
    // A PEER likewise.
    let remote = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    let p = h.peer(sub(2), nonce(3), 5000, remote, 443, 0, 120);
    assert_eq!(p.result, ResultCode::Success);
    h.now += 120_000 + 5;
    let p2 = h.peer(sub(2), nonce(4), 5000, remote, 443, 0, 120);
    assert_eq!(p2.result, ResultCode::Success);
}

#[test]
fn natpmp_cannot_renew_shorten_or_delete_a_pcp_mapping() {
    let mut h = H::default();
    let pcp = h.map(sub(1), nonce(1), 8080, 0, 3600);
    assert_eq!(pcp.result, ResultCode::Success);
    // Renew, shorten, delete: NAT-PMP has no nonce to prove it is the
    // client that made the mapping, so result 2 (Not Authorized/Refused).
    for lifetime in [7200, 60, 0] {
        let m = natpmp::Mapping {
            protocol: natpmp::Protocol::Tcp,
            internal_port: 8080,
            external_port: 0,
            lifetime,
        };
        let natpmp::Response::Map { result, .. } = h.natpmp(sub(1), natpmp::Request::Map(m)) else {
            panic!()
        };
        assert_eq!(result, NatPmpResult::NotAuthorized, "lifetime {lifetime}");
    }
    // Nor does NAT-PMP's delete-all (RFC 6886 §3.4) take it.
    let all = natpmp::Mapping {
        protocol: natpmp::Protocol::Tcp,
        internal_port: 0,
        external_port: 0,
        lifetime: 0,
    };
    let natpmp::Response::Map { result, .. } = h.natpmp(sub(1), natpmp::Request::Map(all)) else {
        panic!()
    };
    assert_eq!(result, NatPmpResult::Success);
    // The PCP mapping is untouched: same port, its lifetime left.
    let again = h.map(sub(1), nonce(1), 8080, 0, 3600);
    assert_eq!(
        (again.result, again.ext()),
        (ResultCode::Success, pcp.ext())
    );
    assert_eq!(h.engine.mapping_count(), 1);
}

#[test]
fn no_suggested_address_in_either_form_and_port_zero_mean_any_section_11_1() {
    // §11.1: an IPv4 client says "no suggestion" with ::ffff:0.0.0.0 or,
    // as some clients do, with ::; a suggested port 0 means "any".
    let mut h = H::default();
    let forms = [
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    ];
    for (i, suggested) in forms.into_iter().enumerate() {
        let req = Request {
            lifetime: 600,
            client_addr: sub(1),
            data: OpData::Map(MapData {
                nonce: nonce(1),
                protocol: 6,
                internal_port: 8000 + i as u16,
                external_port: 0,
                external_addr: suggested,
            }),
            options: Options::NONE,
        };
        let r = h.pcp(from(sub(1)), &req);
        assert_eq!(r.result, ResultCode::Success, "{suggested}");
        assert!(in_pool(r.ext().0), "{suggested}: {:?}", r.ext());
        assert_ne!(r.ext_port(), 0);
    }
}

/// §11.2.1, §14.1.3, §16.3.1: after a restart that lost state, clients
/// re-send their mappings suggesting the old external endpoints; a
/// subscriber with no block gets the block that holds them, when free.
#[test]
fn old_endpoints_come_back_after_state_loss_section_11_2_1() {
    let peer: IpAddr = "203.0.113.9".parse().unwrap();
    // Before the loss: four others take block 0 of every address, so the
    // subscriber's block is the second one of its address.
    let mut before = H::default();
    for n in 3..=6 {
        assert_eq!(
            before.map(sub(n), nonce(n), 80, 0, 3600).result,
            ResultCode::Success
        );
    }
    let map = before.map(sub(1), nonce(1), 8080, 0, 3600);
    let peer_old = before.peer(sub(1), nonce(2), 5000, peer, 443, 0, 3600);
    assert_eq!(
        (map.result, peer_old.result),
        (ResultCode::Success, ResultCode::Success)
    );
    let block = before.engine.subscriber(sub(1)).unwrap().blocks[0];
    assert_ne!(
        block.first, 1024,
        "the test needs a block other than the first"
    );

    // State lost: a fresh engine, where the first free block would be
    // another one. The client comes back suggesting its old endpoints.
    let mut after = H::default();
    let again = after.suggest(sub(1), nonce(1), 8080, None, map.ext(), 3600);
    assert_eq!(
        (again.result, again.ext()),
        (ResultCode::Success, map.ext())
    );
    // The PEER (which fails rather than move, §12.3) gets its port back too.
    let peer_new = after.suggest(
        sub(1),
        nonce(2),
        5000,
        Some((peer, 443)),
        peer_old.ext(),
        3600,
    );
    assert_eq!(
        (peer_new.result, peer_new.ext()),
        (ResultCode::Success, peer_old.ext())
    );
    assert_eq!(after.engine.subscriber(sub(1)).unwrap().blocks, vec![block]);

    // A block someone else holds now is not taken from them: the MAP's
    // suggestion stays a hint (§11.3), answered from a block of its own.
    let mut taken = H::default();
    for n in 3..=6 {
        taken.map(sub(n), nonce(n), 80, 0, 3600);
    }
    taken.map(sub(7), nonce(7), 80, 0, 3600);
    let owner = taken.engine.subscriber(sub(7)).unwrap().blocks[0];
    assert_eq!(owner, block);
    let moved = taken.suggest(sub(1), nonce(1), 8080, None, map.ext(), 3600);
    assert_eq!(moved.result, ResultCode::Success);
    assert_ne!(taken.engine.subscriber(sub(1)).unwrap().blocks[0], block);
    assert_eq!(taken.engine.subscriber(sub(7)).unwrap().blocks, vec![owner]);

    // A draining address gives out no block, not even a suggested one.
    let mut draining = H::default();
    let IpAddr::V4(addr) = map.ext().0 else {
        panic!("IPv4")
    };
    assert!(draining.shared.set_draining(addr, true));
    let elsewhere = draining.suggest(sub(1), nonce(1), 8080, None, map.ext(), 3600);
    assert_eq!(elsewhere.result, ResultCode::Success);
    assert_ne!(elsewhere.ext().0, map.ext().0);
}

/// §15.1 copies the request's suggestion into a delete's answer; with
/// `compatibility.delete_answer: external` it reports the external
/// endpoint instead, as miniupnpd does and as deployed clients read it.
#[test]
fn delete_answer_rfc_by_default_external_by_choice_section_15_1() {
    let peer: IpAddr = "203.0.113.9".parse().unwrap();
    // Default: the suggested fields (all zero) come back.
    let mut rfc = H::default();
    rfc.map(sub(1), nonce(1), 8080, 0, 3600);
    rfc.peer(sub(1), nonce(2), 5000, peer, 443, 0, 3600);
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    assert_eq!(
        rfc.map(sub(1), nonce(1), 8080, 0, 0).ext(),
        (unspecified, 0)
    );
    assert_eq!(
        rfc.peer(sub(1), nonce(2), 5000, peer, 443, 0, 0).ext(),
        (unspecified, 0)
    );
    assert_eq!(rfc.map(sub(2), nonce(1), 0, 0, 0).ext(), (unspecified, 0));

    let mut cfg = test_config();
    cfg.compatibility.delete_answer = pcp_engine::config::DeleteAnswer::External;
    let mut h = H::new(cfg);
    // Nothing to delete, no block yet: the address its block will be on,
    // and asking allocates nothing.
    let probe = h.map(sub(2), nonce(1), 0, 0, 0);
    assert_eq!(probe.result, ResultCode::Success);
    assert!(in_pool(probe.ext().0), "{:?}", probe.ext());
    assert_eq!(probe.ext_port(), 0);
    assert!(
        h.engine.subscriber(sub(2)).is_none(),
        "no block for a question"
    );
    assert_eq!(
        h.map(sub(2), nonce(1), 0, 0, 0).ext(),
        probe.ext(),
        "the same answer again"
    );
    // The promise holds: the first mapping lands on that address.
    let made = h.map(sub(2), nonce(1), 8080, 0, 3600);
    assert_eq!(made.ext().0, probe.ext().0);
    // Deleting reports the deleted mapping's endpoint, MAP and PEER alike.
    assert_eq!(h.map(sub(2), nonce(1), 8080, 0, 0).ext(), made.ext());
    let p = h.peer(sub(2), nonce(2), 5000, peer, 443, 0, 3600);
    let gone = h.peer(sub(2), nonce(2), 5000, peer, 443, 0, 0);
    assert_eq!(
        (gone.result, gone.lifetime, gone.ext()),
        (ResultCode::Success, 0, p.ext())
    );
    assert_eq!(h.engine.mapping_count(), 0);
    // With a block and nothing to delete: the address it has.
    assert_eq!(
        h.map(sub(2), nonce(1), 9999, 0, 0).ext(),
        (probe.ext().0, 0)
    );
    // The promise differs between subscribers (spread over the pool) and
    // is the same in every engine (nothing stored).
    let addrs: std::collections::BTreeSet<IpAddr> = (10..60)
        .map(|n| h.map(sub(n), nonce(1), 0, 0, 0).ext().0)
        .collect();
    assert!(addrs.len() > 1, "{addrs:?}");
    let mut cfg = test_config();
    cfg.compatibility.delete_answer = pcp_engine::config::DeleteAnswer::External;
    let mut other = H::new(cfg);
    assert_eq!(other.map(sub(2), nonce(1), 0, 0, 0).ext(), probe.ext());
}

/// RFC 6886 §3.2.1: after a loss of state the gateway multicasts its
/// public address to 224.0.0.1:5350, 10 times, 250 ms apart then
/// doubling, the epoch updated in each. Only when one address is true for
/// the whole link; and a NAT-PMP client whose address changes hears it
/// on its port 5350.
#[test]
fn natpmp_address_announcements_rfc6886_section_3_2_1() {
    let natpmp_sends = |txs: &[pcp_engine::Transmit]| -> Vec<(String, u32, Ipv4Addr)> {
        txs.iter()
            .filter(|t| t.payload.first() == Some(&0))
            .map(|t| match natpmp::Response::parse(&t.payload).unwrap() {
                natpmp::Response::PublicAddress {
                    result,
                    epoch,
                    addr,
                } => {
                    assert_eq!(result, NatPmpResult::Success);
                    (t.dst.to_string(), epoch, addr)
                }
                other => panic!("{other:?}"),
            })
            .collect()
    };
    // One external address: the multicast goes.
    let mut cfg = test_config();
    cfg.pools.get_mut("cgnat").unwrap().prefixes = vec!["192.0.2.7/32".parse().unwrap()];
    let mut h = H::new(cfg.clone());
    h.engine.announce_restart(h.now, &[]);
    let mut sent = Vec::new();
    let mut at = Vec::new();
    for step in 0..1500 {
        let txs = h.advance(100);
        for s in natpmp_sends(&txs) {
            at.push(step * 100 + 100);
            sent.push(s);
        }
    }
    assert_eq!(sent.len(), 10, "{sent:?}");
    assert!(sent
        .iter()
        .all(|(dst, _, addr)| dst == "224.0.0.1:5350" && *addr == Ipv4Addr::new(192, 0, 2, 7)));
    // 0, 250, 750, 1750 ms ... (to this loop's 100 ms steps).
    let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for w in gaps.windows(2) {
        assert!(w[1] >= 2 * w[0] - 100, "doubling: {gaps:?}");
    }
    assert!(gaps[0] >= 200, "{gaps:?}");
    // The epoch moves with time (§3.2.1: MUST be updated).
    assert!(sent.last().unwrap().1 > sent[0].1 + 60, "{sent:?}");

    // NAT-PMP off: nothing in its form.
    let mut off = cfg.clone();
    off.natpmp = false;
    let mut h = H::new(off);
    h.engine.announce_restart(h.now, &[]);
    assert!(natpmp_sends(&h.advance(600_000)).is_empty());

    // Four addresses (the test pool): no address is true for the link.
    let mut h = H::default();
    h.engine.announce_restart(h.now, &[]);
    let txs = h.advance(600_000);
    assert!(natpmp_sends(&txs).is_empty());
    assert!(
        !txs.is_empty(),
        "the PCP ANNOUNCE still goes (RFC 6887 §14.1.3)"
    );

    // A NAT-PMP client moved to another address hears it on port 5350;
    // a PCP client gets its §14.2 update instead.
    let m = h.natpmp(
        sub(1),
        natpmp::Request::Map(natpmp::Mapping {
            protocol: natpmp::Protocol::Tcp,
            internal_port: 80,
            external_port: 0,
            lifetime: 3600,
        }),
    );
    assert!(matches!(
        m,
        natpmp::Response::Map {
            result: NatPmpResult::Success,
            ..
        }
    ));
    let old = h.engine.subscriber(sub(1)).unwrap().blocks[0].addr;
    assert!(h.shared.set_draining(old, true));
    assert_eq!(h.engine.drain(h.now, old), 1);
    let new = h.engine.mappings_of(sub(1))[0].external_addr;
    assert_ne!(new, old);
    let heard = natpmp_sends(&h.advance(600_000));
    assert_eq!(heard.len(), 10, "{heard:?}");
    assert!(heard
        .iter()
        .all(|(dst, _, addr)| *dst == format!("{}:5350", sub(1)) && *addr == new));
}

fn expired(events: &[Event]) -> bool {
    expired_count(events) > 0
}

/// §15: a renewal may ask for a shorter lifetime, and the mapping then
/// goes when that one ends, not when the longer one would have; a mapping
/// renewed for longer outlives its first expiry. One expiry timer per
/// mapping either way.
#[test]
fn a_renewal_for_a_shorter_lifetime_ends_the_mapping_then() {
    let mut h = H::default();
    assert_eq!(h.map(sub(1), nonce(1), 8080, 0, 3600).lifetime, 3600);
    h.advance(10_000);
    assert_eq!(h.map(sub(1), nonce(1), 8080, 0, 120).lifetime, 120);
    h.take_events();
    h.advance(119_000);
    assert!(!expired(&h.take_events()), "not before its time");
    h.advance(2_000);
    assert!(expired(&h.take_events()), "gone 120 s after the renewal");

    let mut h = H::default();
    h.map(sub(2), nonce(2), 8080, 0, 120);
    h.advance(60_000);
    assert_eq!(h.map(sub(2), nonce(2), 8080, 0, 600).lifetime, 600);
    h.take_events();
    h.advance(540_000);
    assert!(!expired(&h.take_events()), "renewed for 600 s at 60 s");
    h.advance(61_000);
    assert!(expired(&h.take_events()), "gone 600 s after the renewal");
}

#[test]
fn a_block_taken_by_a_refused_request_goes_back_after_the_idle_hold() {
    let mut h = H::default();
    // §13.2: the suggested port is outside the pool (ports from 1024), so
    // the request is refused with no mapping, but the block allocated for
    // it stays with the subscriber.
    let pf = [PcpOption::PreferFailure];
    let r = h.map_opts(sub(2), nonce(1), 6, 80, 80, 3600, &pf);
    assert_eq!(r.result, ResultCode::CannotProvideExternal);
    assert_eq!(h.engine.mapping_count(), 0);
    let block = h.engine.subscriber(sub(2)).unwrap().blocks[0];
    assert!(h
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::BlockAllocated { .. })));
    // Held through the pool's block_hold (300 s), given back at its end.
    h.advance(299_000);
    assert!(h.engine.subscriber(sub(2)).is_some());
    h.advance(1_000);
    assert!(h.engine.subscriber(sub(2)).is_none());
    assert!(h
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::BlockReleased { .. })));
    assert_eq!(h.shared.block_owner(block.addr, block.first), None);
}

/// After a restart, a mapping whose external port another internal port
/// of the subscriber already holds is not restored; one that shares it as
/// the same internal endpoint (a PEER beside a MAP, RFC 4787 EIM, RFC 6887
/// §12) is.
#[test]
fn a_restore_refuses_an_external_port_held_for_another_internal_port() {
    let mut h = H::default();
    let remote = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    assert_eq!(
        h.map(sub(1), nonce(1), 8080, 0, 3600).result,
        ResultCode::Success
    );
    assert_eq!(
        h.peer(sub(1), nonce(1), 8080, remote, 443, 0, 3600).result,
        ResultCode::Success
    );
    let saved: Vec<_> = h.engine.mappings().collect();
    assert_eq!(saved.len(), 2);
    assert_eq!(
        saved[0].external(0),
        saved[1].external(0),
        "EIM: one external port"
    );

    let mut fresh = H::default();
    for (s, block, since) in h.engine.blocks() {
        assert!(fresh.engine.restore_block(fresh.now, s, block, since));
    }
    let mut clash = saved[0].clone();
    clash.internal_port = 9090;
    assert!(fresh.engine.restore_mapping(fresh.now, saved[0].clone()));
    assert!(
        !fresh.engine.restore_mapping(fresh.now, clash),
        "held for 8080"
    );
    assert!(
        fresh.engine.restore_mapping(fresh.now, saved[1].clone()),
        "shared by the same endpoint"
    );
    assert_eq!(fresh.engine.mapping_count(), 2);
}
