//! # pcp-wire: bytes <-> typed PCP and NAT-PMP messages
//!
//! The codec of pcpd: RFC 6887 (PCP version 2) requests and responses with
//! MAP, PEER and ANNOUNCE data and every option pcpd supports (THIRD_PARTY,
//! PREFER_FAILURE, FILTER, DESCRIPTION of RFC 7220, PREFIX64 of RFC 7225,
//! PORT_SET of RFC 7753, and unknown options kept as code + bytes), plus
//! NAT-PMP version 0 (RFC 6886).
//!
//! ```text
//!   datagram ──parse_request──▶ Message::{Pcp(Request), NatPmp(Request)}
//!       │                                   │ (engine decides)
//!       └─ Err(ParseError) ─ disposition() ─┴─▶ Drop | PcpError(code) | NatPmpError(code)
//!   Response / error ──emit──▶ caller's buffer
//! ```
//!
//! What it does not do: any I/O, clock reading or allocation; any policy.
//! It never decides whether a request is *allowed*: only whether it is a
//! well-formed message and, if not, what RFC 6887 §8.2 says to do with it.
//! Parsers borrow the datagram; after a successful parse no accessor can
//! fail or panic, and trailing bytes are never accepted silently.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod addr;
pub mod codes;
pub mod error;
pub mod natpmp;
pub mod options;
pub mod pcp;

pub use codes::{NatPmpResult, Opcode, OptionCode, ResultCode};
pub use error::{Disposition, EmitError, OptionFault, ParseError};
pub use options::{Filter, Ipv4PrefixList, OptionIter, Options, PcpOption, PortSet, Prefix64};
pub use pcp::{MapData, Nonce, OpData, PeerData, Request, Response, ResponseHeader};

/// The UDP port PCP servers listen on (RFC 6887 §19.1).
pub const SERVER_PORT: u16 = 5351;
/// The UDP port clients listen on for unsolicited ANNOUNCE (RFC 6887 §14.1.3).
pub const CLIENT_PORT: u16 = 5350;

/// A request received on the PCP port: PCP, or NAT-PMP by version 0 (RFC
/// 6887 §9, Appendix A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A PCP version 2 request.
    Pcp(Request<'a>),
    /// A NAT-PMP version 0 request.
    NatPmp(natpmp::Request),
}

/// Parses a datagram received by a server, dispatching on the version octet.
pub fn parse_request(buf: &[u8]) -> Result<Message<'_>, ParseError> {
    match buf.first() {
        Some(&natpmp::VERSION) => natpmp::Request::parse(buf).map(Message::NatPmp),
        _ => Request::parse(buf).map(Message::Pcp),
    }
}

/// The error answer to a request whose success was written but could not
/// be kept: the dataplane refused the mapping (NETWORK_FAILURE) or the
/// state could not be made durable (NO_RESOURCES). RFC 6887 §8.3 error
/// layout for PCP (the request copied, suggested fields kept, §11.1); RFC
/// 6886 §3.5 for NAT-PMP (external port and lifetime 0; address 0.0.0.0
/// for a public-address request that could not be made durable — it has no
/// mapping a dataplane could refuse, so no NETWORK_FAILURE). `None` for
/// anything else.
pub fn late_error_response(
    request: &[u8],
    code: ResultCode,
    lifetime: u32,
    epoch: u32,
    out: &mut [u8],
) -> Option<usize> {
    let result = NatPmpResult::from(code);
    match parse_request(request).ok()? {
        Message::Pcp(_) => pcp::emit_error_response(request, code, lifetime, epoch, true, out).ok(),
        Message::NatPmp(natpmp::Request::Map(m)) => natpmp::Response::Map {
            result,
            epoch,
            mapping: natpmp::Mapping {
                external_port: 0,
                lifetime: 0,
                ..m
            },
        }
        .emit(out)
        .ok(),
        Message::NatPmp(natpmp::Request::PublicAddress) if code == ResultCode::NetworkFailure => {
            None
        }
        Message::NatPmp(natpmp::Request::PublicAddress) => natpmp::Response::PublicAddress {
            result,
            epoch,
            addr: core::net::Ipv4Addr::UNSPECIFIED,
        }
        .emit(out)
        .ok(),
    }
}
