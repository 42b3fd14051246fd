//! NAT-PMP, version 0 (RFC 6886), answered on the PCP port (RFC 6887 §9,
//! Appendix A).
//!
//! ```text
//! public address request  | 0 | 0 |                                       (2 octets)
//! public address response | 0 |128| result(16) | epoch(32) | address(32)   (12 octets)
//! mapping request         | 0 |1/2| rsvd(16) | int port | ext port | lifetime      (12)
//! mapping response        | 0 |129/130| result | epoch | int port | ext port | lifetime (16)
//! ```

use core::net::Ipv4Addr;

use crate::codes::NatPmpResult;
use crate::error::{EmitError, ParseError};

/// NAT-PMP's version number (RFC 6886 §3).
pub const VERSION: u8 = 0;
/// Length of a public address request.
pub const PUBLIC_ADDRESS_REQUEST_LEN: usize = 2;
/// Length of a public address response.
pub const PUBLIC_ADDRESS_RESPONSE_LEN: usize = 12;
/// Length of a mapping request.
pub const MAP_REQUEST_LEN: usize = 12;
/// Length of a mapping response.
pub const MAP_RESPONSE_LEN: usize = 16;
/// The response bit added to the opcode (RFC 6886 §3.1).
pub const RESPONSE_BIT: u8 = 0x80;

/// The transport protocol of a NAT-PMP mapping (opcode 1 or 2, RFC 6886 §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Opcode 1.
    Udp,
    /// Opcode 2.
    Tcp,
}

impl Protocol {
    /// The NAT-PMP opcode of a request for this protocol.
    pub fn opcode(self) -> u8 {
        match self {
            Protocol::Udp => 1,
            Protocol::Tcp => 2,
        }
    }

    /// The IANA protocol number, as PCP uses it.
    pub fn ip_protocol(self) -> u8 {
        match self {
            Protocol::Udp => 17,
            Protocol::Tcp => 6,
        }
    }

    fn from_opcode(op: u8) -> Option<Self> {
        match op {
            1 => Some(Protocol::Udp),
            2 => Some(Protocol::Tcp),
            _ => None,
        }
    }
}

/// A mapping request or response body (RFC 6886 §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// UDP or TCP.
    pub protocol: Protocol,
    /// Internal port; with lifetime 0 and port 0, "all mappings" (§3.4).
    pub internal_port: u16,
    /// Suggested (request) or mapped (response) external port.
    pub external_port: u16,
    /// Requested or granted lifetime in seconds; 0 deletes (§3.4).
    pub lifetime: u32,
}

/// A NAT-PMP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// Opcode 0: determine the external address (§3.2).
    PublicAddress,
    /// Opcode 1 or 2: create, renew or delete a mapping (§3.3, §3.4).
    Map(Mapping),
}

impl Request {
    /// Parses a version-0 request. The caller has checked `buf[0] == 0`.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        if buf.len() < 2 {
            return Err(ParseError::TooShort);
        }
        if buf[0] != VERSION {
            return Err(ParseError::UnsupportedVersion(buf[0]));
        }
        let op = buf[1];
        // RFC 6886 §3.5: opcodes >= 128 are responses and are ignored.
        if op >= RESPONSE_BIT {
            return Err(ParseError::NotRequest);
        }
        match op {
            0 if buf.len() == PUBLIC_ADDRESS_REQUEST_LEN => Ok(Request::PublicAddress),
            1 | 2 if buf.len() == MAP_REQUEST_LEN => Ok(Request::Map(Mapping {
                protocol: Protocol::from_opcode(op).unwrap_or(Protocol::Udp),
                internal_port: u16::from_be_bytes([buf[4], buf[5]]),
                external_port: u16::from_be_bytes([buf[6], buf[7]]),
                lifetime: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
            })),
            0..=2 => Err(ParseError::NatPmpBadLength(op)),
            // §3.5: an undefined opcode below 128 gets "unsupported opcode".
            _ => Err(ParseError::NatPmpUnsupportedOpcode(op)),
        }
    }

    /// Octets needed to emit this request.
    pub fn buffer_len(&self) -> usize {
        match self {
            Request::PublicAddress => PUBLIC_ADDRESS_REQUEST_LEN,
            Request::Map(_) => MAP_REQUEST_LEN,
        }
    }

    /// Writes the request; returns the octets used.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, EmitError> {
        let len = self.buffer_len();
        if out.len() < len {
            return Err(EmitError::BufferTooSmall { needed: len });
        }
        out[0] = VERSION;
        match self {
            Request::PublicAddress => out[1] = 0,
            Request::Map(m) => {
                out[1] = m.protocol.opcode();
                out[2..4].fill(0);
                out[4..6].copy_from_slice(&m.internal_port.to_be_bytes());
                out[6..8].copy_from_slice(&m.external_port.to_be_bytes());
                out[8..12].copy_from_slice(&m.lifetime.to_be_bytes());
            }
        }
        Ok(len)
    }
}

/// A NAT-PMP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Response {
    /// Opcode 128 (§3.2).
    PublicAddress {
        /// Result code.
        result: NatPmpResult,
        /// Seconds since start of epoch (§3.6).
        epoch: u32,
        /// The external address, 0.0.0.0 when unknown.
        addr: Ipv4Addr,
    },
    /// Opcode 129 or 130 (§3.3).
    Map {
        /// Result code.
        result: NatPmpResult,
        /// Seconds since start of epoch (§3.6).
        epoch: u32,
        /// The mapping; external port and lifetime are 0 on failure (§3.5).
        mapping: Mapping,
    },
}

impl Response {
    /// Parses a response.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        if buf.len() < 2 {
            return Err(ParseError::TooShort);
        }
        if buf[0] != VERSION {
            return Err(ParseError::UnsupportedVersion(buf[0]));
        }
        if buf[1] & RESPONSE_BIT == 0 {
            return Err(ParseError::NotResponse);
        }
        let op = buf[1] & !RESPONSE_BIT;
        let need = match op {
            0 => PUBLIC_ADDRESS_RESPONSE_LEN,
            1 | 2 => MAP_RESPONSE_LEN,
            _ => return Err(ParseError::NatPmpUnsupportedOpcode(op)),
        };
        if buf.len() != need {
            return Err(ParseError::NatPmpBadLength(op));
        }
        let result = NatPmpResult::from(u16::from_be_bytes([buf[2], buf[3]]));
        let epoch = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        Ok(match Protocol::from_opcode(op) {
            None => Response::PublicAddress {
                result,
                epoch,
                addr: Ipv4Addr::new(buf[8], buf[9], buf[10], buf[11]),
            },
            Some(protocol) => Response::Map {
                result,
                epoch,
                mapping: Mapping {
                    protocol,
                    internal_port: u16::from_be_bytes([buf[8], buf[9]]),
                    external_port: u16::from_be_bytes([buf[10], buf[11]]),
                    lifetime: u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]),
                },
            },
        })
    }

    /// Octets needed to emit this response.
    pub fn buffer_len(&self) -> usize {
        match self {
            Response::PublicAddress { .. } => PUBLIC_ADDRESS_RESPONSE_LEN,
            Response::Map { .. } => MAP_RESPONSE_LEN,
        }
    }

    /// Writes the response; returns the octets used.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, EmitError> {
        let len = self.buffer_len();
        if out.len() < len {
            return Err(EmitError::BufferTooSmall { needed: len });
        }
        out[0] = VERSION;
        let (op, result, epoch) = match self {
            Response::PublicAddress { result, epoch, .. } => (0, *result, *epoch),
            Response::Map {
                result,
                epoch,
                mapping,
            } => (mapping.protocol.opcode(), *result, *epoch),
        };
        out[1] = op | RESPONSE_BIT;
        out[2..4].copy_from_slice(&u16::from(result).to_be_bytes());
        out[4..8].copy_from_slice(&epoch.to_be_bytes());
        match self {
            Response::PublicAddress { addr, .. } => out[8..12].copy_from_slice(&addr.octets()),
            Response::Map { mapping, .. } => {
                out[8..10].copy_from_slice(&mapping.internal_port.to_be_bytes());
                out[10..12].copy_from_slice(&mapping.external_port.to_be_bytes());
                out[12..16].copy_from_slice(&mapping.lifetime.to_be_bytes());
            }
        }
        Ok(len)
    }
}

/// RFC 6886 §3.5: "the entire request MUST be returned to the sender, with
/// the top bit of the opcode set and the result code set to 5". The result
/// code field is octets 2..4; a request shorter than that is padded to 4
/// octets. The copy is capped at 1100 octets, the PCP port's message limit.
pub fn emit_unsupported_opcode(request: &[u8], out: &mut [u8]) -> Result<usize, EmitError> {
    let copied = request.len().min(crate::pcp::MAX_MESSAGE_LEN);
    let len = copied.max(4);
    if out.len() < len {
        return Err(EmitError::BufferTooSmall { needed: len });
    }
    out[..copied].copy_from_slice(&request[..copied]);
    out[copied..len].fill(0);
    out[1] |= RESPONSE_BIT;
    out[2..4].copy_from_slice(&u16::from(NatPmpResult::UnsupportedOpcode).to_be_bytes());
    Ok(len)
}
