//! Property tests: every message type survives emit -> parse -> emit, and
//! arbitrary bytes never make the parser panic.
#![allow(missing_docs)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pcp_wire::natpmp;
use pcp_wire::{
    parse_request, Filter, Ipv4PrefixList, MapData, Message, NatPmpResult, Nonce, OpData, Options,
    PcpOption, PeerData, PortSet, Prefix64, Request, Response, ResultCode,
};
use proptest::prelude::*;

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        // IPv4-mapped IPv6 addresses are IPv4 by definition (§5).
        any::<[u8; 16]>()
            .prop_map(|o| IpAddr::V6(Ipv6Addr::from(o)))
            .prop_filter("not v4-mapped", |a| a.to_canonical() == *a),
    ]
}

#[derive(Debug, Clone)]
enum OwnedOpt {
    ThirdParty(IpAddr),
    PreferFailure,
    Filter(Filter),
    Description(String),
    Prefix64(u8, [u8; 12], Option<Vec<(Ipv4Addr, u8)>>),
    PortSet(PortSet),
    Unknown(u8, Vec<u8>),
}

fn owned_opt() -> impl Strategy<Value = OwnedOpt> {
    let filter = (ip(), any::<u16>(), any::<u8>()).prop_map(|(addr, port, p)| {
        let prefix_len = match addr {
            IpAddr::V4(_) if p % 5 == 0 => 0,
            IpAddr::V4(_) => 96 + p % 33,
            IpAddr::V6(_) => p % 129,
        };
        OwnedOpt::Filter(Filter {
            prefix_len,
            remote_port: port,
            remote_addr: addr,
        })
    });
    let prefix64 = (
        prop::sample::select(vec![4u8, 5, 6, 7, 8, 12]),
        any::<[u8; 12]>(),
        prop::option::of(prop::collection::vec(
            (any::<[u8; 4]>().prop_map(Ipv4Addr::from), 0u8..=32),
            0..4,
        )),
    )
        .prop_map(|(l, b, list)| OwnedOpt::Prefix64(l, b, list));
    prop_oneof![
        ip().prop_map(OwnedOpt::ThirdParty),
        Just(OwnedOpt::PreferFailure),
        filter,
        ".{0,40}".prop_map(OwnedOpt::Description),
        prefix64,
        (1u16.., any::<u16>(), any::<bool>()).prop_map(|(size, first, parity)| {
            OwnedOpt::PortSet(PortSet {
                size,
                first_internal_port: first,
                parity,
            })
        }),
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40))
            .prop_filter("unknown code", |(c, _)| ![1, 2, 3, 128, 129, 130]
                .contains(c))
            .prop_map(|(c, d)| OwnedOpt::Unknown(c, d)),
    ]
}

/// Keeps the first of each option that may appear once in a request.
fn dedupe(opts: Vec<OwnedOpt>) -> Vec<OwnedOpt> {
    let mut seen = std::collections::HashSet::new();
    opts.into_iter()
        .filter(|o| {
            let key = match o {
                OwnedOpt::ThirdParty(_) => 1,
                OwnedOpt::PreferFailure => 2,
                OwnedOpt::Description(_) => 3,
                OwnedOpt::Prefix64(..) => 4,
                OwnedOpt::PortSet(_) => 5,
                _ => return true,
            };
            seen.insert(key)
        })
        .collect()
}

/// Encoded IPv4 prefix lists, kept alive while options borrow them.
fn encode_lists(opts: &[OwnedOpt]) -> Vec<Vec<u8>> {
    opts.iter()
        .map(|o| match o {
            OwnedOpt::Prefix64(_, _, Some(list)) => {
                let mut buf = vec![0u8; list.len() * 6];
                Ipv4PrefixList::encode(list, &mut buf).unwrap();
                buf
            }
            _ => Vec::new(),
        })
        .collect()
}

fn borrow<'a>(opts: &'a [OwnedOpt], lists: &'a [Vec<u8>]) -> Vec<PcpOption<'a>> {
    opts.iter()
        .zip(lists)
        .map(|(o, list)| match o {
            OwnedOpt::ThirdParty(a) => PcpOption::ThirdParty(*a),
            OwnedOpt::PreferFailure => PcpOption::PreferFailure,
            OwnedOpt::Filter(f) => PcpOption::Filter(*f),
            OwnedOpt::Description(s) => PcpOption::Description(s),
            OwnedOpt::Prefix64(l, b, has) => PcpOption::Prefix64(Prefix64 {
                prefix_len: *l,
                prefix_and_suffix: *b,
                ipv4_prefixes: has.as_ref().map(|_| Ipv4PrefixList::new(list).unwrap()),
            }),
            OwnedOpt::PortSet(p) => PcpOption::PortSet(*p),
            OwnedOpt::Unknown(c, d) => PcpOption::Unknown { code: *c, data: d },
        })
        .collect()
}

fn map_data() -> impl Strategy<Value = MapData> {
    (
        any::<[u8; 12]>(),
        any::<u8>(),
        any::<u16>(),
        any::<u16>(),
        ip(),
    )
        .prop_map(
            |(n, protocol, internal_port, external_port, external_addr)| MapData {
                nonce: Nonce(n),
                protocol,
                internal_port,
                external_port,
                external_addr,
            },
        )
}

fn op_data() -> impl Strategy<Value = OpData> {
    prop_oneof![
        Just(OpData::Announce),
        map_data().prop_map(OpData::Map),
        (map_data(), any::<u16>(), ip()).prop_map(|(map, remote_port, remote_addr)| {
            OpData::Peer(PeerData {
                map,
                remote_port,
                remote_addr,
            })
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn request_round_trip(
        lifetime in any::<u32>(),
        client_addr in ip(),
        data in op_data(),
        opts in prop::collection::vec(owned_opt(), 0..8),
    ) {
        let opts = dedupe(opts);
        let lists = encode_lists(&opts);
        let list = borrow(&opts, &lists);
        let req = Request { lifetime, client_addr, data, options: Options::List(&list) };
        let mut buf = [0u8; 1100];
        let n = req.emit(&mut buf).unwrap();
        prop_assert_eq!(n, req.buffer_len());
        let parsed = match parse_request(&buf[..n]).unwrap() {
            Message::Pcp(r) => r,
            Message::NatPmp(_) => unreachable!("version 2 is PCP"),
        };
        prop_assert_eq!(parsed, req);
        let mut again = [0u8; 1100];
        let m = parsed.emit(&mut again).unwrap();
        prop_assert_eq!(&again[..m], &buf[..n]);
    }

    #[test]
    fn response_round_trip(
        result in any::<u8>(),
        lifetime in any::<u32>(),
        epoch in any::<u32>(),
        data in op_data(),
        opts in prop::collection::vec(owned_opt(), 0..8),
    ) {
        // Responses may repeat options (e.g. PREFIX64, RFC 7225 §4).
        let lists = encode_lists(&opts);
        let list = borrow(&opts, &lists);
        let resp = Response {
            result: ResultCode::from(result), lifetime, epoch, data, options: Options::List(&list),
        };
        let mut buf = [0u8; 1100];
        let n = resp.emit(&mut buf).unwrap();
        let parsed = Response::parse(&buf[..n]).unwrap();
        prop_assert_eq!(parsed, resp);
        let mut again = [0u8; 1100];
        let m = parsed.emit(&mut again).unwrap();
        prop_assert_eq!(&again[..m], &buf[..n]);
    }

    #[test]
    fn natpmp_round_trip(
        kind in 0u8..3,
        internal_port in any::<u16>(),
        external_port in any::<u16>(),
        lifetime in any::<u32>(),
        result in any::<u16>(),
        epoch in any::<u32>(),
        addr in any::<[u8; 4]>(),
    ) {
        let mut buf = [0u8; 16];
        let (req, resp) = if kind == 0 {
            (natpmp::Request::PublicAddress, natpmp::Response::PublicAddress {
                result: NatPmpResult::from(result), epoch, addr: Ipv4Addr::from(addr),
            })
        } else {
            let protocol = if kind == 1 { natpmp::Protocol::Udp } else { natpmp::Protocol::Tcp };
            let m = natpmp::Mapping { protocol, internal_port, external_port, lifetime };
            (natpmp::Request::Map(m), natpmp::Response::Map {
                result: NatPmpResult::from(result), epoch, mapping: m,
            })
        };
        let n = req.emit(&mut buf).unwrap();
        prop_assert_eq!(parse_request(&buf[..n]).unwrap(), Message::NatPmp(req));
        let n = resp.emit(&mut buf).unwrap();
        prop_assert_eq!(natpmp::Response::parse(&buf[..n]).unwrap(), resp);
    }

    /// Arbitrary datagrams: parse never panics; whatever parses re-emits to
    /// something that parses to the same value.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1200), version in 0u8..4) {
        let mut bytes = bytes;
        if let Some(b) = bytes.first_mut() { *b = version; }
        if let Ok(msg) = parse_request(&bytes) {
            let mut out = [0u8; 1100];
            match msg {
                Message::Pcp(r) => {
                    let n = r.emit(&mut out).unwrap();
                    prop_assert_eq!(parse_request(&out[..n]).unwrap(), Message::Pcp(r));
                }
                Message::NatPmp(r) => {
                    let n = r.emit(&mut out).unwrap();
                    prop_assert_eq!(parse_request(&out[..n]).unwrap(), Message::NatPmp(r));
                }
            }
        }
        let _ = Response::parse(&bytes);
        let _ = natpmp::Response::parse(&bytes);
    }
}
