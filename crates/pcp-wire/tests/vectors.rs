//! Byte-exact vectors, built by hand from the RFC figures, checked in both
//! directions: bytes -> parse -> expected Repr, and Repr -> emit -> bytes.
#![allow(missing_docs)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pcp_wire::natpmp;
use pcp_wire::{
    parse_request, Disposition, Filter, Ipv4PrefixList, MapData, Message, NatPmpResult, Nonce,
    OpData, OptionFault, Options, PcpOption, PeerData, PortSet, Prefix64, Request, Response,
    ResponseHeader, ResultCode,
};

/// Hex with spaces and `|` separators ignored.
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    assert_eq!(digits.len() % 2, 0, "odd hex");
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

const V4_CLIENT: &str = "00000000 00000000 0000ffff 64400001"; // ::ffff:100.64.0.1
const NONCE: &str = "01020304 05060708 090a0b0c";
const V4_EXT: &str = "00000000 00000000 0000ffff c6336407"; // ::ffff:198.51.100.7
const V4_PEER: &str = "00000000 00000000 0000ffff cb007109"; // ::ffff:203.0.113.9

fn client() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))
}

fn map_data() -> MapData {
    MapData {
        nonce: Nonce([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
        protocol: 6,
        internal_port: 8080,
        external_port: 40000,
        external_addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
    }
}

fn peer_data() -> PeerData {
    PeerData {
        map: map_data(),
        remote_port: 443,
        remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
    }
}

/// Asserts `bytes` parses as a request equal to `expected` and that
/// emitting `expected` gives back exactly `bytes`.
fn check_request(bytes: &[u8], expected: &Request<'_>) {
    let parsed = match parse_request(bytes).expect("parses") {
        Message::Pcp(r) => r,
        other => panic!("not PCP: {other:?}"),
    };
    assert_eq!(&parsed, expected);
    let mut out = [0xAAu8; 1100];
    let n = expected.emit(&mut out).unwrap();
    assert_eq!(&out[..n], bytes);
    assert_eq!(expected.buffer_len(), bytes.len());
}

fn check_response(bytes: &[u8], expected: &Response<'_>) {
    assert_eq!(&Response::parse(bytes).expect("parses"), expected);
    let mut out = [0xAAu8; 1100];
    let n = expected.emit(&mut out).unwrap();
    assert_eq!(&out[..n], bytes);
}

#[test]
fn map_request_section_11_1() {
    let bytes = hex(&format!(
        "02 01 0000 | 00001c20 | {V4_CLIENT} | {NONCE} | 06 000000 | 1f90 9c40 | {V4_EXT}"
    ));
    assert_eq!(bytes.len(), 24 + 36);
    check_request(
        &bytes,
        &Request {
            lifetime: 7200,
            client_addr: client(),
            data: OpData::Map(map_data()),
            options: Options::NONE,
        },
    );
}

#[test]
fn map_response_section_11_1() {
    let bytes = hex(&format!(
        "02 81 00 00 | 00001c20 | 00003039 | 00000000 00000000 00000000 | {NONCE} | 06 000000 | 1f90 9c40 | {V4_EXT}"
    ));
    check_response(
        &bytes,
        &Response {
            result: ResultCode::Success,
            lifetime: 7200,
            epoch: 12345,
            data: OpData::Map(map_data()),
            options: Options::NONE,
        },
    );
    let header = ResponseHeader::parse(&bytes).unwrap();
    assert_eq!(header.epoch, 12345);
    assert_eq!(header.result, ResultCode::Success);
}

#[test]
fn peer_request_and_response_section_12_1() {
    let body = format!("{NONCE} | 06 000000 | 1f90 9c40 | {V4_EXT} | 01bb 0000 | {V4_PEER}");
    let req = hex(&format!("02 02 0000 | 00000078 | {V4_CLIENT} | {body}"));
    assert_eq!(req.len(), 24 + 56);
    check_request(
        &req,
        &Request {
            lifetime: 120,
            client_addr: client(),
            data: OpData::Peer(peer_data()),
            options: Options::NONE,
        },
    );
    let resp = hex(&format!(
        "02 82 00 0b | 0000001e | 00000001 | 00000000 00000000 00000000 | {body}"
    ));
    check_response(
        &resp,
        &Response {
            result: ResultCode::CannotProvideExternal,
            lifetime: 30,
            epoch: 1,
            data: OpData::Peer(peer_data()),
            options: Options::NONE,
        },
    );
}

#[test]
fn announce_request_and_response_section_14_1() {
    let v6 = "20010db8 00000000 00000000 00000001";
    let req = hex(&format!("02 00 0000 | 00000000 | {v6}"));
    check_request(
        &req,
        &Request {
            lifetime: 0,
            client_addr: "2001:db8::1".parse().unwrap(),
            data: OpData::Announce,
            options: Options::NONE,
        },
    );
    let resp = hex("02 80 00 00 | 00000000 | 0000000a | 00000000 00000000 00000000");
    check_response(
        &resp,
        &Response {
            result: ResultCode::Success,
            lifetime: 0,
            epoch: 10,
            data: OpData::Announce,
            options: Options::NONE,
        },
    );
}

/// A MAP request carrying `opts_hex`; checks both directions with `opts`.
fn check_map_with_options(opts_hex: &str, opts: &[PcpOption<'_>]) {
    let bytes = hex(&format!(
        "02 01 0000 | 00001c20 | {V4_CLIENT} | {NONCE} | 06 000000 | 1f90 9c40 | {V4_EXT} | {opts_hex}"
    ));
    check_request(
        &bytes,
        &Request {
            lifetime: 7200,
            client_addr: client(),
            data: OpData::Map(map_data()),
            options: Options::List(opts),
        },
    );
}

#[test]
fn third_party_option_section_13_1() {
    check_map_with_options(
        "01 00 0010 | 00000000 00000000 0000ffff 64400063",
        &[PcpOption::ThirdParty(IpAddr::V4(Ipv4Addr::new(
            100, 64, 0, 99,
        )))],
    );
}

#[test]
fn prefer_failure_option_section_13_2() {
    check_map_with_options("02 00 0000", &[PcpOption::PreferFailure]);
}

#[test]
fn filter_options_section_13_3() {
    // Two filters: an IPv4 /24 on any port (prefix 96+24) and "remove all".
    check_map_with_options(
        "03 00 0014 | 00 78 0000 | 00000000 00000000 0000ffff cb007100 \
         03 00 0014 | 00 00 0000 | 00000000 00000000 00000000 00000000",
        &[
            PcpOption::Filter(Filter {
                prefix_len: 120,
                remote_port: 0,
                remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)),
            }),
            PcpOption::Filter(Filter {
                prefix_len: 0,
                remote_port: 0,
                remote_addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            }),
        ],
    );
    let f = Filter {
        prefix_len: 120,
        remote_port: 0,
        remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)),
    };
    assert_eq!(f.family_prefix_len(), 24);
}

#[test]
fn description_option_rfc7220_is_padded() {
    // "web" is 3 octets: length 3, one zero octet of padding (§7.3).
    check_map_with_options("80 00 0003 | 776562 00", &[PcpOption::Description("web")]);
    // 4 octets: no padding.
    check_map_with_options("80 00 0004 | 6e617321", &[PcpOption::Description("nas!")]);
    // Empty description: length 0 is allowed (§7.3).
    check_map_with_options("80 00 0000", &[PcpOption::Description("")]);
}

#[test]
fn description_not_utf8_is_ignored_rfc7220_section_3() {
    // RFC 7220 §3: "If the PCP client request contains invalid DESCRIPTION
    // options (e.g., the content is not a legal UTF-8 string), the PCP
    // server MUST ignore the request" option: it parses, as an optional
    // option nobody processes, never as MALFORMED_OPTION.
    check_map_with_options(
        "80 00 0002 | ff fe 0000",
        &[PcpOption::Unknown {
            code: 128,
            data: &[0xff, 0xfe],
        }],
    );
}

#[test]
fn prefix64_option_rfc7225() {
    // Request form: ::/96 (length 12, all zero), no IPv4 prefix list.
    check_map_with_options(
        "81 00 000e | 000c 00000000 00000000 00000000 | 0000",
        &[PcpOption::Prefix64(Prefix64 {
            prefix_len: 12,
            prefix_and_suffix: [0; 12],
            ipv4_prefixes: None,
        })],
    );
    // Response form: 64:ff9b::/96 with a list of one prefix 192.0.2.0/24.
    let list_bytes = hex("0018 c0000200");
    let list = Ipv4PrefixList::new(&list_bytes).unwrap();
    assert_eq!(
        list.iter().collect::<Vec<_>>(),
        vec![(Ipv4Addr::new(192, 0, 2, 0), 24)]
    );
    let mut enc = [0u8; 6];
    Ipv4PrefixList::encode(&[(Ipv4Addr::new(192, 0, 2, 0), 24)], &mut enc).unwrap();
    assert_eq!(&enc[..], &list_bytes[..]);
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(&[0x00, 0x64, 0xff, 0x9b]);
    let opts = [PcpOption::Prefix64(Prefix64 {
        prefix_len: 12,
        prefix_and_suffix: p,
        ipv4_prefixes: Some(list),
    })];
    let bytes = hex(&format!(
        "02 81 00 00 | 00001c20 | 00000005 | 00000000 00000000 00000000 | {NONCE} | 06 000000 | 1f90 9c40 | {V4_EXT} \
         | 81 00 0016 | 000c 0064ff9b 00000000 00000000 | 0001 | 0018 c0000200 | 0000"
    ));
    check_response(
        &bytes,
        &Response {
            result: ResultCode::Success,
            lifetime: 7200,
            epoch: 5,
            data: OpData::Map(map_data()),
            options: Options::List(&opts),
        },
    );
}

#[test]
fn port_set_option_rfc7753() {
    check_map_with_options(
        "82 00 0005 | 0010 1f90 | 01 000000",
        &[PcpOption::PortSet(PortSet {
            size: 16,
            first_internal_port: 8080,
            parity: true,
        })],
    );
}

#[test]
fn unknown_options_are_kept_section_7_3() {
    // A mandatory (code 99) and an optional (code 200) unknown option.
    check_map_with_options(
        "63 00 0002 | abcd 0000 | c8 00 0000",
        &[
            PcpOption::Unknown {
                code: 99,
                data: &[0xab, 0xcd],
            },
            PcpOption::Unknown {
                code: 200,
                data: &[],
            },
        ],
    );
}

fn map_request_bytes(opts_hex: &str) -> Vec<u8> {
    hex(&format!(
        "02 01 0000 | 00001c20 | {V4_CLIENT} | {NONCE} | 06 000000 | 1f90 9c40 | {V4_EXT} | {opts_hex}"
    ))
}

fn disposition(bytes: &[u8]) -> Disposition {
    parse_request(bytes).unwrap_err().disposition()
}

#[test]
fn silently_dropped_datagrams_section_8_2() {
    // < 2 octets.
    assert_eq!(disposition(&[]), Disposition::Drop);
    assert_eq!(disposition(&[2]), Disposition::Drop);
    // R bit set.
    let mut resp = map_request_bytes("");
    resp[1] |= 0x80;
    assert_eq!(disposition(&resp), Disposition::Drop);
    // Supported version, < 24 octets.
    assert_eq!(disposition(&hex("02 01 0000 00001c20")), Disposition::Drop);
}

#[test]
fn unsupported_version_section_9() {
    for v in [1u8, 3, 255] {
        let mut b = map_request_bytes("");
        b[0] = v;
        assert_eq!(
            disposition(&b),
            Disposition::PcpError(ResultCode::UnsuppVersion),
            "version {v}"
        );
    }
    // Unknown version, even 2 octets long, is answered (§8.2 order).
    assert_eq!(
        disposition(&[7, 1]),
        Disposition::PcpError(ResultCode::UnsuppVersion)
    );
}

#[test]
fn malformed_request_section_8_2() {
    let mut long = map_request_bytes("");
    long.resize(1104, 0);
    assert_eq!(
        disposition(&long),
        Disposition::PcpError(ResultCode::MalformedRequest)
    );
    let mut odd = map_request_bytes("");
    odd.push(0);
    assert_eq!(
        disposition(&odd),
        Disposition::PcpError(ResultCode::MalformedRequest)
    );
    // 24-octet header only, opcode MAP: too short for the opcode.
    let short = &map_request_bytes("")[..24];
    assert_eq!(
        disposition(short),
        Disposition::PcpError(ResultCode::MalformedRequest)
    );
    // Exactly 1100 octets of valid framing parses (options fill the rest).
    let mut max = map_request_bytes("");
    let pad = 1100 - max.len() - 4;
    max.extend_from_slice(&[0xc8, 0, (pad >> 8) as u8, pad as u8]);
    max.resize(1100, 0);
    assert!(parse_request(&max).is_ok());
}

#[test]
fn unsupported_opcode_section_8_2() {
    let b = hex(&format!("02 05 0000 | 00000000 | {V4_CLIENT} | deadbeef"));
    assert_eq!(
        disposition(&b),
        Disposition::PcpError(ResultCode::UnsuppOpcode)
    );
}

#[test]
fn malformed_options_section_7_3() {
    let cases: &[(&str, OptionFault)] = &[
        // THIRD_PARTY of the wrong length.
        ("01 00 0004 | 64400063", OptionFault::BadLength),
        // PREFER_FAILURE with data.
        ("02 00 0004 | 00000000", OptionFault::BadLength),
        // FILTER with an IPv4 prefix below 96.
        (
            "03 00 0014 | 00 20 0000 | 00000000 00000000 0000ffff cb007100",
            OptionFault::BadValue,
        ),
        // FILTER with a prefix above 128.
        (
            "03 00 0014 | 00 81 0000 | 20010db8 00000000 00000000 00000000",
            OptionFault::BadValue,
        ),
        // Option length running past the datagram.
        ("80 00 0100 | 41424344", OptionFault::Truncated),
        // PORT_SET with size 0 (RFC 7753 §4.2).
        ("82 00 0005 | 0000 1f90 | 00 000000", OptionFault::BadValue),
        // PREFIX64 with a length RFC 6052 does not allow.
        (
            "81 00 000e | 0009 00000000 00000000 00000000 | 0000",
            OptionFault::BadValue,
        ),
        // PREFIX64 whose prefix count disagrees with its length.
        (
            "81 00 0010 | 000c 00000000 00000000 00000000 | 0001",
            OptionFault::BadLength,
        ),
        // THIRD_PARTY twice (maximum occurrences 1).
        (
            "01 00 0010 | 00000000 00000000 0000ffff 64400063 \
             01 00 0010 | 00000000 00000000 0000ffff 64400064",
            OptionFault::Repeated,
        ),
        // PREFER_FAILURE twice.
        ("02 00 0000 02 00 0000", OptionFault::Repeated),
        // PORT_SET twice (RFC 7753 §4.2).
        (
            "82 00 0005 | 0010 1f90 | 00 000000 82 00 0005 | 0010 1f90 | 00 000000",
            OptionFault::Repeated,
        ),
    ];
    for (opts, fault) in cases {
        let err = parse_request(&map_request_bytes(opts)).unwrap_err();
        assert_eq!(
            err.disposition(),
            Disposition::PcpError(ResultCode::MalformedOption),
            "{opts}"
        );
        match err {
            pcp_wire::ParseError::MalformedOption { fault: f, .. } => {
                assert_eq!(f, *fault, "{opts}")
            }
            other => panic!("{opts}: {other:?}"),
        }
    }
    // FILTER may repeat (§13.3).
    assert!(parse_request(&map_request_bytes(
        "03 00 0014 | 00 78 0000 | 00000000 00000000 0000ffff cb007100 \
         03 00 0014 | 00 78 0000 | 00000000 00000000 0000ffff cb007200"
    ))
    .is_ok());
}

#[test]
fn error_response_copies_request_section_8_2() {
    let req = map_request_bytes("80 00 0003 | 776562 00");
    let mut out = [0u8; 1100];
    // Parsed request, policy error: copy, set R, result, lifetime, epoch; reserved zero.
    let n = pcp_wire::pcp::emit_error_response(
        &req,
        ResultCode::NotAuthorized,
        1800,
        77,
        true,
        &mut out,
    )
    .unwrap();
    let mut expected = req.clone();
    expected[1] = 0x81;
    expected[2] = 0;
    expected[3] = 2;
    expected[4..8].copy_from_slice(&1800u32.to_be_bytes());
    expected[8..12].copy_from_slice(&77u32.to_be_bytes());
    expected[12..24].fill(0);
    assert_eq!(&out[..n], &expected[..]);
    // And it parses as a response carrying the copied data and options.
    let resp = Response::parse(&out[..n]).unwrap();
    assert_eq!(resp.result, ResultCode::NotAuthorized);
    assert_eq!(resp.data, OpData::Map(map_data()));
    assert_eq!(
        resp.options.iter().collect::<Vec<_>>(),
        vec![PcpOption::Description("web")]
    );

    // Unparsed request: the last 96 bits of the client address are kept.
    let mut odd = req.clone();
    odd.push(0xee); // not a multiple of 4
    let n = pcp_wire::pcp::emit_error_response(
        &odd,
        ResultCode::MalformedRequest,
        1800,
        77,
        false,
        &mut out,
    )
    .unwrap();
    assert_eq!(n, odd.len() + 3, "zero-padded to a multiple of 4");
    assert_eq!(&out[12..24], &req[12..24]);
    assert_eq!(&out[odd.len()..n], &[0, 0, 0]);
    assert_eq!(out[odd.len() - 1], 0xee);

    // Over 1100 octets: truncated to 1100.
    let mut long = req.clone();
    long.resize(1500, 0x55);
    let n = pcp_wire::pcp::emit_error_response(
        &long,
        ResultCode::MalformedRequest,
        1800,
        0,
        false,
        &mut out,
    )
    .unwrap();
    assert_eq!(n, 1100);

    // UNSUPP_VERSION from a 2-octet datagram: a 24-octet header, version 2.
    let n = pcp_wire::pcp::emit_error_response(
        &[9, 1],
        ResultCode::UnsuppVersion,
        1800,
        3,
        false,
        &mut out,
    )
    .unwrap();
    assert_eq!(n, 24);
    assert_eq!(&out[..4], &[2, 0x81, 0, 1]);
    let h = ResponseHeader::parse(&out[..n]).unwrap();
    assert_eq!(
        (h.result, h.lifetime, h.epoch),
        (ResultCode::UnsuppVersion, 1800, 3)
    );
}

#[test]
fn natpmp_public_address_rfc6886_3_2() {
    let req = [0u8, 0];
    assert_eq!(
        parse_request(&req).unwrap(),
        Message::NatPmp(natpmp::Request::PublicAddress)
    );
    let mut out = [0u8; 16];
    assert_eq!(natpmp::Request::PublicAddress.emit(&mut out).unwrap(), 2);
    assert_eq!(&out[..2], &req);

    let resp_bytes = hex("00 80 0000 | 0000012c | c6336407");
    let resp = natpmp::Response::PublicAddress {
        result: NatPmpResult::Success,
        epoch: 300,
        addr: Ipv4Addr::new(198, 51, 100, 7),
    };
    assert_eq!(natpmp::Response::parse(&resp_bytes).unwrap(), resp);
    let n = resp.emit(&mut out).unwrap();
    assert_eq!(&out[..n], &resp_bytes[..]);
}

#[test]
fn natpmp_mapping_rfc6886_3_3() {
    for (op, protocol) in [(1u8, natpmp::Protocol::Udp), (2, natpmp::Protocol::Tcp)] {
        let req_bytes = hex(&format!("00 {op:02x} 0000 | 1f90 9c40 | 00001c20"));
        let m = natpmp::Mapping {
            protocol,
            internal_port: 8080,
            external_port: 40000,
            lifetime: 7200,
        };
        assert_eq!(
            parse_request(&req_bytes).unwrap(),
            Message::NatPmp(natpmp::Request::Map(m))
        );
        let mut out = [0u8; 16];
        let n = natpmp::Request::Map(m).emit(&mut out).unwrap();
        assert_eq!(&out[..n], &req_bytes[..]);

        let resp_bytes = hex(&format!(
            "00 {:02x} 0004 | 0000012c | 1f90 9c40 | 00001c20",
            op | 0x80
        ));
        let resp = natpmp::Response::Map {
            result: NatPmpResult::OutOfResources,
            epoch: 300,
            mapping: m,
        };
        assert_eq!(natpmp::Response::parse(&resp_bytes).unwrap(), resp);
        let n = resp.emit(&mut out).unwrap();
        assert_eq!(&out[..n], &resp_bytes[..]);
    }
}

#[test]
fn natpmp_errors_rfc6886_3_5() {
    // A response (opcode >= 128) sent to the server: ignored.
    assert_eq!(disposition(&hex("00 80 0000")), Disposition::Drop);
    // A mapping request of the wrong length: dropped.
    assert_eq!(disposition(&hex("00 01 0000 1f90")), Disposition::Drop);
    // Undefined opcode below 128: "unsupported opcode", whole request returned.
    let req = hex("00 07 0000 | 01020304");
    assert_eq!(
        disposition(&req),
        Disposition::NatPmpError(NatPmpResult::UnsupportedOpcode)
    );
    let mut out = [0u8; 16];
    let n = natpmp::emit_unsupported_opcode(&req, &mut out).unwrap();
    assert_eq!(&out[..n], &hex("00 87 0005 | 01020304")[..]);
    // A 2-octet one is padded to carry the result code.
    let n = natpmp::emit_unsupported_opcode(&[0, 9], &mut out).unwrap();
    assert_eq!(&out[..n], &[0, 0x89, 0, 5]);
}

#[test]
fn emit_refuses_small_buffers_and_oversize() {
    let req = Request {
        lifetime: 1,
        client_addr: client(),
        data: OpData::Map(map_data()),
        options: Options::NONE,
    };
    let mut small = [0u8; 59];
    assert_eq!(
        req.emit(&mut small),
        Err(pcp_wire::EmitError::BufferTooSmall { needed: 60 })
    );
    let text = "x".repeat(1016);
    let opts = [PcpOption::Description(&text), PcpOption::Description(&text)];
    let big = Response {
        result: ResultCode::Success,
        lifetime: 1,
        epoch: 1,
        data: OpData::Map(map_data()),
        options: Options::List(&opts),
    };
    let mut out = [0u8; 4096];
    assert_eq!(big.emit(&mut out), Err(pcp_wire::EmitError::TooLong));
}

/// A mapping granted by the engine but refused by the dataplane is answered
/// NETWORK_FAILURE: the request copied with its suggested fields (§8.3,
/// §11.1), short lifetime; NAT-PMP gets port and lifetime 0 (RFC 6886 §3.5).
#[test]
fn network_failure_answers_copy_the_request() {
    let req = hex(&format!(
        "02 01 0000 | 00001c20 | {V4_CLIENT} | {NONCE} | 06 000000 | 1f90 9c40 | {V4_EXT}"
    ));
    let mut out = [0u8; 1100];
    let n =
        pcp_wire::late_error_response(&req, ResultCode::NetworkFailure, 30, 77, &mut out).unwrap();
    assert_eq!(
        out[..n],
        hex(&format!(
            "02 81 00 07 | 0000001e | 0000004d | 00000000 00000000 00000000 | {NONCE} | 06 000000 | 1f90 9c40 | {V4_EXT}"
        ))[..]
    );
    let natpmp_req = hex("00 02 0000 | 1f90 | 9c40 | 00001c20");
    let n =
        pcp_wire::late_error_response(&natpmp_req, ResultCode::NetworkFailure, 30, 77, &mut out)
            .unwrap();
    assert_eq!(
        out[..n],
        hex("00 82 0003 | 0000004d | 1f90 | 0000 | 00000000")[..]
    );
    // Nothing to fail for a public-address request or garbage.
    assert_eq!(
        pcp_wire::late_error_response(&hex("00 00"), ResultCode::NetworkFailure, 30, 77, &mut out),
        None
    );
    assert_eq!(
        pcp_wire::late_error_response(&[2, 1, 0], ResultCode::NetworkFailure, 30, 77, &mut out),
        None
    );
}

/// State that could not be made durable is answered NO_RESOURCES (short
/// lifetime, RFC 6887 §7.4); NAT-PMP's public-address request gets
/// OUT_OF_RESOURCES (4) and address 0.0.0.0 (RFC 6886 §3.5).
#[test]
fn not_durable_answers_are_no_resources() {
    let req = hex(&format!(
        "02 01 0000 | 00001c20 | {V4_CLIENT} | {NONCE} | 06 000000 | 1f90 9c40 | {V4_EXT}"
    ));
    let mut out = [0u8; 1100];
    let n = pcp_wire::late_error_response(&req, ResultCode::NoResources, 30, 77, &mut out).unwrap();
    assert_eq!(out[3], u8::from(ResultCode::NoResources));
    assert_eq!(n, req.len());
    let n = pcp_wire::late_error_response(&hex("00 00"), ResultCode::NoResources, 30, 77, &mut out)
        .unwrap();
    assert_eq!(out[..n], hex("00 80 0004 | 0000004d | 00000000")[..]);
}
