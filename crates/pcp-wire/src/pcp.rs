//! PCP version 2 messages (RFC 6887 §7, §11.1, §12.1, §14.1).
//!
//! ```text
//! request  | 2 |R=0 op| reserved(16)      | lifetime | client address(128) | opcode data | options
//! response | 2 |R=1 op| rsvd(8) | result  | lifetime | epoch | reserved(96) | opcode data | options
//! ```

use core::net::IpAddr;

use crate::addr::{read_addr, write_addr};
use crate::codes::{Opcode, ResultCode};
use crate::error::{EmitError, ParseError};
use crate::options::Options;

/// The PCP version this codec speaks (§7.1).
pub const VERSION: u8 = 2;
/// Maximum PCP message size, in octets (§7).
pub const MAX_MESSAGE_LEN: usize = 1100;
/// Common header length (§7.1, §7.2).
pub const HEADER_LEN: usize = 24;
/// MAP opcode data length (§11.1).
pub const MAP_DATA_LEN: usize = 36;
/// PEER opcode data length (§12.1).
pub const PEER_DATA_LEN: usize = 56;
/// The R bit (§7.1).
pub const RESPONSE_BIT: u8 = 0x80;

/// Byte ranges of the common header and opcode data, from the start of the
/// message (smoltcp's `mod field`).
pub mod field {
    use core::ops::Range;
    /// Version octet.
    pub const VERSION: usize = 0;
    /// R bit and opcode.
    pub const OPCODE: usize = 1;
    /// Result code (responses).
    pub const RESULT: usize = 3;
    /// Requested (request) or assigned (response) lifetime.
    pub const LIFETIME: Range<usize> = 4..8;
    /// PCP client's IP address (request).
    pub const CLIENT_ADDR: Range<usize> = 8..24;
    /// Epoch time (response).
    pub const EPOCH: Range<usize> = 8..12;
    /// Reserved 96 bits (response).
    pub const RESERVED96: Range<usize> = 12..24;
    /// Mapping nonce (MAP and PEER).
    pub const NONCE: Range<usize> = 24..36;
    /// Protocol (MAP and PEER).
    pub const PROTOCOL: usize = 36;
    /// Internal port (MAP and PEER).
    pub const INTERNAL_PORT: Range<usize> = 40..42;
    /// Suggested / assigned external port (MAP and PEER).
    pub const EXTERNAL_PORT: Range<usize> = 42..44;
    /// Suggested / assigned external address (MAP and PEER).
    pub const EXTERNAL_ADDR: Range<usize> = 44..60;
    /// Remote peer port (PEER).
    pub const REMOTE_PORT: Range<usize> = 60..62;
    /// Remote peer address (PEER).
    pub const REMOTE_ADDR: Range<usize> = 64..80;
}

/// A 96-bit mapping nonce (§11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Nonce(pub [u8; 12]);

/// MAP opcode data (§11.1); the same layout serves requests (suggested
/// external endpoint) and responses (assigned external endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapData {
    /// Mapping nonce.
    pub nonce: Nonce,
    /// IANA protocol number; 0 means all protocols.
    pub protocol: u8,
    /// Internal port; 0 means all ports.
    pub internal_port: u16,
    /// Suggested (request) or assigned (response) external port.
    pub external_port: u16,
    /// Suggested (request) or assigned (response) external address.
    pub external_addr: IpAddr,
}

/// PEER opcode data (§12.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerData {
    /// The MAP-shaped first part: nonce, protocol, internal port, external endpoint.
    pub map: MapData,
    /// Remote peer port.
    pub remote_port: u16,
    /// Remote peer address.
    pub remote_addr: IpAddr,
}

/// Opcode-specific data of a known opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpData {
    /// ANNOUNCE has no opcode data (§14.1.1).
    Announce,
    /// MAP (§11.1).
    Map(MapData),
    /// PEER (§12.1).
    Peer(PeerData),
}

impl OpData {
    /// The opcode this data belongs to.
    pub fn opcode(&self) -> Opcode {
        match self {
            OpData::Announce => Opcode::Announce,
            OpData::Map(_) => Opcode::Map,
            OpData::Peer(_) => Opcode::Peer,
        }
    }

    /// Length of the opcode data for `opcode`, if it is known.
    pub fn len_for(opcode: Opcode) -> Option<usize> {
        match opcode {
            Opcode::Announce => Some(0),
            Opcode::Map => Some(MAP_DATA_LEN),
            Opcode::Peer => Some(PEER_DATA_LEN),
            Opcode::Unknown(_) => None,
        }
    }

    /// Length of this data on the wire.
    pub fn len(&self) -> usize {
        match self {
            OpData::Announce => 0,
            OpData::Map(_) => MAP_DATA_LEN,
            OpData::Peer(_) => PEER_DATA_LEN,
        }
    }

    /// True for ANNOUNCE, which carries no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The MAP-shaped part of MAP and PEER data.
    pub fn map_data(&self) -> Option<&MapData> {
        match self {
            OpData::Announce => None,
            OpData::Map(m) => Some(m),
            OpData::Peer(p) => Some(&p.map),
        }
    }

    /// Parses the data of `opcode` from a whole message (`msg.len()` has
    /// been checked to hold it).
    fn parse(opcode: Opcode, msg: &[u8]) -> OpData {
        let map = || MapData {
            nonce: Nonce(array12(&msg[field::NONCE])),
            protocol: msg[field::PROTOCOL],
            internal_port: be16(&msg[field::INTERNAL_PORT]),
            external_port: be16(&msg[field::EXTERNAL_PORT]),
            external_addr: read_addr(&msg[field::EXTERNAL_ADDR]),
        };
        match opcode {
            Opcode::Map => OpData::Map(map()),
            Opcode::Peer => OpData::Peer(PeerData {
                map: map(),
                remote_port: be16(&msg[field::REMOTE_PORT]),
                remote_addr: read_addr(&msg[field::REMOTE_ADDR]),
            }),
            _ => OpData::Announce,
        }
    }

    /// Writes the data into a whole message buffer (reserved octets zeroed).
    fn emit(&self, msg: &mut [u8]) {
        let end = HEADER_LEN + self.len();
        msg[HEADER_LEN..end].fill(0);
        if let Some(m) = self.map_data() {
            msg[field::NONCE].copy_from_slice(&m.nonce.0);
            msg[field::PROTOCOL] = m.protocol;
            msg[field::INTERNAL_PORT].copy_from_slice(&m.internal_port.to_be_bytes());
            msg[field::EXTERNAL_PORT].copy_from_slice(&m.external_port.to_be_bytes());
            msg[field::EXTERNAL_ADDR].copy_from_slice(&write_addr(m.external_addr));
        }
        if let OpData::Peer(p) = self {
            msg[field::REMOTE_PORT].copy_from_slice(&p.remote_port.to_be_bytes());
            msg[field::REMOTE_ADDR].copy_from_slice(&write_addr(p.remote_addr));
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn array12(b: &[u8]) -> [u8; 12] {
    let mut a = [0u8; 12];
    a.copy_from_slice(b);
    a
}

/// Checks the framing rules common to requests and responses (§8.2) and
/// returns the opcode data length. `want_response` selects the R bit.
fn check_frame(buf: &[u8], want_response: bool) -> Result<(Opcode, usize), ParseError> {
    // §8.2: fewer than 2 octets: drop.
    if buf.len() < 2 {
        return Err(ParseError::TooShort);
    }
    // §8.2: R bit set on a request: drop.
    let is_response = buf[field::OPCODE] & RESPONSE_BIT != 0;
    if is_response != want_response {
        return Err(if want_response {
            ParseError::NotResponse
        } else {
            ParseError::NotRequest
        });
    }
    // §8.2, §9: unsupported version: UNSUPP_VERSION.
    if buf[field::VERSION] != VERSION {
        return Err(ParseError::UnsupportedVersion(buf[field::VERSION]));
    }
    // §8.2: supported version but shorter than 24 octets: drop.
    if buf.len() < HEADER_LEN {
        return Err(ParseError::ShortHeader);
    }
    // §8.2: longer than 1100 octets or not a multiple of 4: MALFORMED_REQUEST.
    if buf.len() > MAX_MESSAGE_LEN {
        return Err(ParseError::TooLong);
    }
    if buf.len() % 4 != 0 {
        return Err(ParseError::NotAligned);
    }
    let raw_op = buf[field::OPCODE] & !RESPONSE_BIT;
    let opcode = Opcode::from(raw_op);
    // §8.2: an opcode the server does not understand: UNSUPP_OPCODE.
    let data_len = OpData::len_for(opcode).ok_or(ParseError::UnsupportedOpcode(raw_op))?;
    // §8.2: too short for the opcode: MALFORMED_REQUEST.
    if buf.len() < HEADER_LEN + data_len {
        return Err(ParseError::ShortForOpcode(raw_op));
    }
    Ok((opcode, data_len))
}

/// A PCP request (§7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Requested lifetime in seconds (§7.1).
    pub lifetime: u32,
    /// The PCP client's IP address field (§7.1, §5).
    pub client_addr: IpAddr,
    /// Opcode-specific data.
    pub data: OpData,
    /// Options, in order.
    pub options: Options<'a>,
}

impl<'a> Request<'a> {
    /// The request's opcode.
    pub fn opcode(&self) -> Opcode {
        self.data.opcode()
    }

    /// Parses and validates a request, applying §8.2 and §7.3.
    pub fn parse(buf: &'a [u8]) -> Result<Self, ParseError> {
        let (opcode, data_len) = check_frame(buf, false)?;
        let options = Options::parse(&buf[HEADER_LEN + data_len..], true)?;
        Ok(Request {
            lifetime: be32(&buf[field::LIFETIME]),
            client_addr: read_addr(&buf[field::CLIENT_ADDR]),
            data: OpData::parse(opcode, buf),
            options,
        })
    }

    /// Octets needed to emit this request.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.data.len() + self.options.wire_len()
    }

    /// Writes the request into `out`; returns the octets used.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, EmitError> {
        let len = check_out(self.buffer_len(), out)?;
        out[field::VERSION] = VERSION;
        out[field::OPCODE] = u8::from(self.opcode());
        out[2..4].fill(0);
        out[field::LIFETIME].copy_from_slice(&self.lifetime.to_be_bytes());
        out[field::CLIENT_ADDR].copy_from_slice(&write_addr(self.client_addr));
        self.data.emit(out);
        self.options
            .emit(&mut out[HEADER_LEN + self.data.len()..len])?;
        Ok(len)
    }
}

fn check_out(len: usize, out: &[u8]) -> Result<usize, EmitError> {
    if len > MAX_MESSAGE_LEN {
        return Err(EmitError::TooLong);
    }
    if out.len() < len {
        return Err(EmitError::BufferTooSmall { needed: len });
    }
    Ok(len)
}

/// The fixed part of any PCP response, readable even when the opcode data
/// is not (e.g. UNSUPP_OPCODE or MALFORMED_REQUEST answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Opcode copied from the request.
    pub opcode: Opcode,
    /// Result code (§7.4).
    pub result: ResultCode,
    /// Lifetime (§7.2).
    pub lifetime: u32,
    /// Server epoch time (§8.5).
    pub epoch: u32,
}

impl ResponseHeader {
    /// Parses the header of a response (version 2, R bit set, >= 24 octets).
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        if buf.len() < 2 {
            return Err(ParseError::TooShort);
        }
        if buf[field::OPCODE] & RESPONSE_BIT == 0 {
            return Err(ParseError::NotResponse);
        }
        if buf[field::VERSION] != VERSION {
            return Err(ParseError::UnsupportedVersion(buf[field::VERSION]));
        }
        if buf.len() < HEADER_LEN {
            return Err(ParseError::ShortHeader);
        }
        Ok(ResponseHeader {
            opcode: Opcode::from(buf[field::OPCODE] & !RESPONSE_BIT),
            result: ResultCode::from(buf[field::RESULT]),
            lifetime: be32(&buf[field::LIFETIME]),
            epoch: be32(&buf[field::EPOCH]),
        })
    }
}

/// A PCP response (§7.2) of a known opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a> {
    /// Result code (§7.4).
    pub result: ResultCode,
    /// Assigned lifetime (success) or error lifetime (§7.2).
    pub lifetime: u32,
    /// Server epoch time (§8.5).
    pub epoch: u32,
    /// Opcode-specific data.
    pub data: OpData,
    /// Options, in order.
    pub options: Options<'a>,
}

impl<'a> Response<'a> {
    /// The response's opcode.
    pub fn opcode(&self) -> Opcode {
        self.data.opcode()
    }

    /// Parses a complete response.
    pub fn parse(buf: &'a [u8]) -> Result<Self, ParseError> {
        let (opcode, data_len) = check_frame(buf, true)?;
        let header = ResponseHeader::parse(buf)?;
        let options = Options::parse(&buf[HEADER_LEN + data_len..], false)?;
        Ok(Response {
            result: header.result,
            lifetime: header.lifetime,
            epoch: header.epoch,
            data: OpData::parse(opcode, buf),
            options,
        })
    }

    /// Octets needed to emit this response.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.data.len() + self.options.wire_len()
    }

    /// Writes the response into `out` (reserved fields zero, as §7.2 wants
    /// for requests that parsed); returns the octets used. Fails with
    /// [`EmitError::TooLong`] past 1100 octets, where §7.3 has the server
    /// answer MALFORMED_REQUEST instead.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, EmitError> {
        let len = check_out(self.buffer_len(), out)?;
        out[field::VERSION] = VERSION;
        out[field::OPCODE] = u8::from(self.opcode()) | RESPONSE_BIT;
        out[2] = 0;
        out[field::RESULT] = u8::from(self.result);
        out[field::LIFETIME].copy_from_slice(&self.lifetime.to_be_bytes());
        out[field::EPOCH].copy_from_slice(&self.epoch.to_be_bytes());
        out[field::RESERVED96].fill(0);
        self.data.emit(out);
        self.options
            .emit(&mut out[HEADER_LEN + self.data.len()..len])?;
        Ok(len)
    }
}

/// Builds an error response from the request bytes exactly as §8.2 says:
/// copy the datagram (at most 1100 octets), zero-pad to a multiple of 4 (and
/// to the 24-octet header), set version 2 and the R bit, the result code, the
/// lifetime and the epoch. The reserved 96 bits keep the last 96 bits of the
/// client address when the request did not parse (`parsed == false`), and
/// are zeroed otherwise (§7.2).
///
/// For UNSUPP_VERSION the version octet is 2, the version this server
/// speaks closest to any other (§9 step 3: NAT-PMP's 0 is handled apart).
/// The answer is never longer than max(24, request rounded up to 4): it
/// cannot amplify beyond the header a legitimate request would get.
pub fn emit_error_response(
    request: &[u8],
    result: ResultCode,
    lifetime: u32,
    epoch: u32,
    parsed: bool,
    out: &mut [u8],
) -> Result<usize, EmitError> {
    let copied = request.len().min(MAX_MESSAGE_LEN);
    let len = ((copied + 3) & !3).clamp(HEADER_LEN, MAX_MESSAGE_LEN);
    if out.len() < len {
        return Err(EmitError::BufferTooSmall { needed: len });
    }
    out[..copied].copy_from_slice(&request[..copied]);
    out[copied..len].fill(0);
    out[field::VERSION] = VERSION;
    out[field::OPCODE] |= RESPONSE_BIT;
    out[2] = 0;
    out[field::RESULT] = u8::from(result);
    out[field::LIFETIME].copy_from_slice(&lifetime.to_be_bytes());
    out[field::EPOCH].copy_from_slice(&epoch.to_be_bytes());
    if parsed {
        out[field::RESERVED96].fill(0);
    }
    Ok(len)
}
