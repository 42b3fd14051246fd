//! PCP options (RFC 6887 §7.3, §13; RFC 7220; RFC 7225; RFC 7753).
//!
//! On the wire an option is `code(8) reserved(8) length(16) data`, with the
//! data padded by zero octets to a multiple of 4; `length` does not count the
//! padding (§7.3). Options are validated once when a message is parsed;
//! afterwards [`Options::iter`] walks them without any further failure.

use core::net::{IpAddr, Ipv4Addr};

use crate::addr::{read_addr, write_addr};
use crate::codes::OptionCode;
use crate::error::{EmitError, OptionFault, ParseError};

/// Length of an option header (§7.3).
pub const OPTION_HEADER_LEN: usize = 4;
/// THIRD_PARTY data length (§13.1).
pub const THIRD_PARTY_LEN: usize = 16;
/// FILTER data length (§13.3).
pub const FILTER_LEN: usize = 20;
/// PORT_SET data length (RFC 7753 §4).
pub const PORT_SET_LEN: usize = 5;
/// Longest DESCRIPTION text (RFC 7220 §2).
pub const DESCRIPTION_MAX_LEN: usize = 1016;
/// PREFIX64 fixed part: Prefix64-Length (16 bits) + prefix + suffix (12 octets), RFC 7225 §4.
pub const PREFIX64_FIXED_LEN: usize = 14;
/// One entry of the PREFIX64 IPv4 prefix list: length (16 bits) + address (RFC 7225 Figure 2).
pub const PREFIX64_IPV4_ENTRY_LEN: usize = 6;

/// Rounds an option data length up to the 4-octet boundary (§7.3).
pub const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// The FILTER option (RFC 6887 §13.3): permit inbound packets from a remote
/// prefix and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Filter {
    /// Significant bits of `remote_addr`, counted over the 128-bit (IPv4-mapped)
    /// form: 96..=128 for IPv4, 0..=128 for IPv6. 0 means "remove all filters".
    pub prefix_len: u8,
    /// Remote peer port, 0 for all ports.
    pub remote_port: u16,
    /// Remote peer address.
    pub remote_addr: IpAddr,
}

impl Filter {
    /// The prefix length in the address family's own terms (0..=32 for IPv4).
    pub fn family_prefix_len(&self) -> u8 {
        match self.remote_addr {
            IpAddr::V4(_) => self.prefix_len.saturating_sub(96),
            IpAddr::V6(_) => self.prefix_len,
        }
    }
}

/// The PORT_SET option (RFC 7753 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortSet {
    /// Number of ports requested or granted; never zero.
    pub size: u16,
    /// First internal port of the set.
    pub first_internal_port: u16,
    /// P bit: port parity preservation requested.
    pub parity: bool,
}

/// The PREFIX64 option (RFC 7225 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix64<'a> {
    /// Length of Pref64::/n in octets: 4, 5, 6, 7, 8 or 12 (RFC 6052).
    pub prefix_len: u8,
    /// The prefix in the first `prefix_len` octets, the suffix in the rest.
    pub prefix_and_suffix: [u8; 12],
    /// The IPv4 prefix list, if the option carries one.
    pub ipv4_prefixes: Option<Ipv4PrefixList<'a>>,
}

/// A validated RFC 7225 IPv4 prefix list: `count` entries of
/// (prefix length: 16 bits, IPv4 address: 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4PrefixList<'a> {
    entries: &'a [u8],
}

impl<'a> Ipv4PrefixList<'a> {
    /// Wraps already encoded entries (6 octets each, prefix length <= 32).
    pub fn new(entries: &'a [u8]) -> Result<Self, OptionFault> {
        if entries.len() % PREFIX64_IPV4_ENTRY_LEN != 0
            || entries.len() / PREFIX64_IPV4_ENTRY_LEN > usize::from(u16::MAX)
        {
            return Err(OptionFault::BadLength);
        }
        if entries
            .chunks_exact(PREFIX64_IPV4_ENTRY_LEN)
            .any(|e| u16::from_be_bytes([e[0], e[1]]) > 32)
        {
            return Err(OptionFault::BadValue);
        }
        Ok(Ipv4PrefixList { entries })
    }

    /// Encodes `(address, prefix length)` pairs into `out`; returns the bytes
    /// used, for [`Ipv4PrefixList::new`].
    pub fn encode(prefixes: &[(Ipv4Addr, u8)], out: &mut [u8]) -> Result<usize, EmitError> {
        let needed = prefixes.len() * PREFIX64_IPV4_ENTRY_LEN;
        if out.len() < needed {
            return Err(EmitError::BufferTooSmall { needed });
        }
        for ((addr, len), chunk) in prefixes
            .iter()
            .zip(out.chunks_exact_mut(PREFIX64_IPV4_ENTRY_LEN))
        {
            chunk[..2].copy_from_slice(&u16::from(*len).to_be_bytes());
            chunk[2..].copy_from_slice(&addr.octets());
        }
        Ok(needed)
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.entries.len() / PREFIX64_IPV4_ENTRY_LEN
    }

    /// True when the list holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The prefixes as `(address, prefix length)`.
    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Addr, u8)> + 'a {
        self.entries
            .chunks_exact(PREFIX64_IPV4_ENTRY_LEN)
            .map(|e| (Ipv4Addr::new(e[2], e[3], e[4], e[5]), e[1]))
    }
}

/// One PCP option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PcpOption<'a> {
    /// THIRD_PARTY (§13.1): the internal address the request acts for.
    ThirdParty(IpAddr),
    /// PREFER_FAILURE (§13.2).
    PreferFailure,
    /// FILTER (§13.3).
    Filter(Filter),
    /// DESCRIPTION (RFC 7220): UTF-8 text, not NUL-terminated.
    Description(&'a str),
    /// PREFIX64 (RFC 7225).
    Prefix64(Prefix64<'a>),
    /// PORT_SET (RFC 7753).
    PortSet(PortSet),
    /// An option this codec does not know, kept so the engine can answer
    /// UNSUPP_OPTION (mandatory, code < 128) or ignore it (optional).
    Unknown {
        /// The option code.
        code: u8,
        /// The option data, without padding.
        data: &'a [u8],
    },
}

impl<'a> PcpOption<'a> {
    /// The option's code.
    pub fn code(&self) -> OptionCode {
        match self {
            PcpOption::ThirdParty(_) => OptionCode::ThirdParty,
            PcpOption::PreferFailure => OptionCode::PreferFailure,
            PcpOption::Filter(_) => OptionCode::Filter,
            PcpOption::Description(_) => OptionCode::Description,
            PcpOption::Prefix64(_) => OptionCode::Prefix64,
            PcpOption::PortSet(_) => OptionCode::PortSet,
            PcpOption::Unknown { code, .. } => OptionCode::from(*code),
        }
    }

    /// The semantic data length written in the Option Length field.
    pub fn data_len(&self) -> usize {
        match self {
            PcpOption::ThirdParty(_) => THIRD_PARTY_LEN,
            PcpOption::PreferFailure => 0,
            PcpOption::Filter(_) => FILTER_LEN,
            PcpOption::Description(text) => text.len(),
            PcpOption::Prefix64(p) => {
                PREFIX64_FIXED_LEN + p.ipv4_prefixes.map_or(0, |l| 2 + l.entries.len())
            }
            PcpOption::PortSet(_) => PORT_SET_LEN,
            PcpOption::Unknown { data, .. } => data.len(),
        }
    }

    /// Octets the option occupies on the wire: header, data and padding.
    pub fn wire_len(&self) -> usize {
        OPTION_HEADER_LEN + padded(self.data_len())
    }

    /// Parses one option's data (RFC 6887 §7.3: each kind has an exact length).
    pub fn parse(code: u8, data: &'a [u8]) -> Result<Self, OptionFault> {
        let exact = |len: usize| {
            if data.len() == len {
                Ok(())
            } else {
                Err(OptionFault::BadLength)
            }
        };
        Ok(match OptionCode::from(code) {
            OptionCode::ThirdParty => {
                exact(THIRD_PARTY_LEN)?;
                PcpOption::ThirdParty(read_addr(data))
            }
            OptionCode::PreferFailure => {
                exact(0)?;
                PcpOption::PreferFailure
            }
            OptionCode::Filter => {
                exact(FILTER_LEN)?;
                let prefix_len = data[1];
                let remote_addr = read_addr(&data[4..20]);
                // §13.3: IPv4 prefixes are 96..=128 over the mapped form,
                // IPv6 0..=128; 0 ("remove all") is valid for both.
                let valid = match remote_addr {
                    _ if prefix_len == 0 => true,
                    IpAddr::V4(_) => (96..=128).contains(&prefix_len),
                    IpAddr::V6(_) => prefix_len <= 128,
                };
                if !valid {
                    return Err(OptionFault::BadValue);
                }
                PcpOption::Filter(Filter {
                    prefix_len,
                    remote_port: u16::from_be_bytes([data[2], data[3]]),
                    remote_addr,
                })
            }
            OptionCode::Description => {
                // RFC 7220 §2: at most 1016 octets of UTF-8.
                if data.len() > DESCRIPTION_MAX_LEN {
                    return Err(OptionFault::BadLength);
                }
                match core::str::from_utf8(data) {
                    Ok(text) => PcpOption::Description(text),
                    // RFC 7220 §3: text that is not UTF-8 is ignored, not an
                    // error: kept as an unknown optional option, which the
                    // engine neither processes nor echoes.
                    Err(_) => PcpOption::Unknown { code, data },
                }
            }
            OptionCode::Prefix64 => PcpOption::Prefix64(parse_prefix64(data)?),
            OptionCode::PortSet => {
                exact(PORT_SET_LEN)?;
                let size = u16::from_be_bytes([data[0], data[1]]);
                // RFC 7753 §4.2: a Port Set Size of zero is MALFORMED_OPTION.
                if size == 0 {
                    return Err(OptionFault::BadValue);
                }
                PcpOption::PortSet(PortSet {
                    size,
                    first_internal_port: u16::from_be_bytes([data[2], data[3]]),
                    parity: data[4] & 1 == 1,
                })
            }
            OptionCode::Unknown(code) => PcpOption::Unknown { code, data },
        })
    }

    /// Writes header, data and zero padding into `out`; returns the octets used.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, EmitError> {
        let data_len = self.data_len();
        let total = self.wire_len();
        if out.len() < total {
            return Err(EmitError::BufferTooSmall { needed: total });
        }
        let len16 = u16::try_from(data_len).map_err(|_| EmitError::TooLong)?;
        out[0] = u8::from(self.code());
        out[1] = 0;
        out[2..4].copy_from_slice(&len16.to_be_bytes());
        let data = &mut out[OPTION_HEADER_LEN..total];
        data.fill(0);
        match self {
            PcpOption::ThirdParty(addr) => data[..16].copy_from_slice(&write_addr(*addr)),
            PcpOption::PreferFailure => {}
            PcpOption::Filter(f) => {
                data[1] = f.prefix_len;
                data[2..4].copy_from_slice(&f.remote_port.to_be_bytes());
                data[4..20].copy_from_slice(&write_addr(f.remote_addr));
            }
            PcpOption::Description(text) => data[..text.len()].copy_from_slice(text.as_bytes()),
            PcpOption::Prefix64(p) => {
                data[..2].copy_from_slice(&u16::from(p.prefix_len).to_be_bytes());
                data[2..14].copy_from_slice(&p.prefix_and_suffix);
                if let Some(list) = p.ipv4_prefixes {
                    // len() is bounded by u16::MAX in Ipv4PrefixList::new.
                    let count = u16::try_from(list.len()).map_err(|_| EmitError::TooLong)?;
                    data[14..16].copy_from_slice(&count.to_be_bytes());
                    data[16..16 + list.entries.len()].copy_from_slice(list.entries);
                }
            }
            PcpOption::PortSet(p) => {
                data[..2].copy_from_slice(&p.size.to_be_bytes());
                data[2..4].copy_from_slice(&p.first_internal_port.to_be_bytes());
                data[4] = u8::from(p.parity);
            }
            PcpOption::Unknown { data: raw, .. } => data[..raw.len()].copy_from_slice(raw),
        }
        Ok(total)
    }
}

fn parse_prefix64(data: &[u8]) -> Result<Prefix64<'_>, OptionFault> {
    if data.len() < PREFIX64_FIXED_LEN {
        return Err(OptionFault::BadLength);
    }
    let len16 = u16::from_be_bytes([data[0], data[1]]);
    // RFC 7225 §4: Prefix64 Length is one of the RFC 6052 lengths (in octets).
    let prefix_len = match len16 {
        4..=8 | 12 => len16 as u8,
        _ => return Err(OptionFault::BadValue),
    };
    let mut prefix_and_suffix = [0u8; 12];
    prefix_and_suffix.copy_from_slice(&data[2..14]);
    let rest = &data[PREFIX64_FIXED_LEN..];
    let ipv4_prefixes = if rest.is_empty() {
        None
    } else {
        if rest.len() < 2 {
            return Err(OptionFault::BadLength);
        }
        let count = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let entries = &rest[2..];
        if entries.len() != count * PREFIX64_IPV4_ENTRY_LEN {
            return Err(OptionFault::BadLength);
        }
        Some(Ipv4PrefixList::new(entries)?)
    };
    Ok(Prefix64 {
        prefix_len,
        prefix_and_suffix,
        ipv4_prefixes,
    })
}

/// The options of a message: either validated wire bytes (after parsing) or
/// a list built by the caller (for emitting). Equality compares the options,
/// not the representation.
#[derive(Debug, Clone, Copy)]
pub enum Options<'a> {
    /// The options area of a parsed message, already validated.
    Wire(&'a [u8]),
    /// Options to emit.
    List(&'a [PcpOption<'a>]),
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options::List(&[])
    }
}

impl PartialEq for Options<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Options<'_> {}

impl<'a> Options<'a> {
    /// No options.
    pub const NONE: Options<'static> = Options::List(&[]);

    /// Validates the options area of a request or response (§7.3) and
    /// returns it. `request` enables the per-request occurrence limits.
    pub fn parse(buf: &'a [u8], request: bool) -> Result<Self, ParseError> {
        let mut seen: u8 = 0;
        let mut rest = buf;
        while !rest.is_empty() {
            let (code, data, next) = split_option(rest)?;
            let opt = PcpOption::parse(code, data)
                .map_err(|fault| ParseError::MalformedOption { code, fault })?;
            if request {
                // Options allowed at most once in a request: THIRD_PARTY,
                // PREFER_FAILURE (§13.1, §13.2), DESCRIPTION (RFC 7220),
                // PREFIX64 (RFC 7225 §4), PORT_SET (RFC 7753 §4). A repeat is
                // MALFORMED_OPTION (§7.3).
                let bit = match opt {
                    PcpOption::ThirdParty(_) => 1,
                    PcpOption::PreferFailure => 2,
                    PcpOption::Description(_) => 4,
                    PcpOption::Unknown { code: 128, .. } => 4,
                    PcpOption::Prefix64(_) => 8,
                    PcpOption::PortSet(_) => 16,
                    PcpOption::Filter(_) | PcpOption::Unknown { .. } => 0,
                };
                if seen & bit != 0 {
                    return Err(ParseError::MalformedOption {
                        code,
                        fault: OptionFault::Repeated,
                    });
                }
                seen |= bit;
            }
            rest = next;
        }
        Ok(Options::Wire(buf))
    }

    /// Walks the options in order (§7.3: they are processed in the order
    /// they appear).
    pub fn iter(&self) -> OptionIter<'a> {
        match *self {
            Options::Wire(buf) => OptionIter::Wire(buf),
            Options::List(list) => OptionIter::List(list.iter()),
        }
    }

    /// Octets the options take on the wire.
    pub fn wire_len(&self) -> usize {
        match *self {
            Options::Wire(buf) => buf.len(),
            Options::List(list) => list.iter().map(PcpOption::wire_len).sum(),
        }
    }

    /// True when there is no option.
    pub fn is_empty(&self) -> bool {
        self.wire_len() == 0
    }

    /// Writes every option into `out`; returns the octets used.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, EmitError> {
        let needed = self.wire_len();
        if out.len() < needed {
            return Err(EmitError::BufferTooSmall { needed });
        }
        let mut at = 0;
        for opt in self.iter() {
            at += opt.emit(&mut out[at..])?;
        }
        Ok(at)
    }
}

/// Splits the first option off `buf`: (code, data without padding, rest).
fn split_option(buf: &[u8]) -> Result<(u8, &[u8], &[u8]), ParseError> {
    let code = buf[0];
    if buf.len() < OPTION_HEADER_LEN {
        return Err(ParseError::MalformedOption {
            code,
            fault: OptionFault::Truncated,
        });
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let end = OPTION_HEADER_LEN + padded(len);
    if end > buf.len() {
        // §7.3: an option longer than the packet is MALFORMED_OPTION.
        return Err(ParseError::MalformedOption {
            code,
            fault: OptionFault::Truncated,
        });
    }
    Ok((
        code,
        &buf[OPTION_HEADER_LEN..OPTION_HEADER_LEN + len],
        &buf[end..],
    ))
}

/// Iterator over [`Options`].
#[derive(Debug, Clone)]
pub enum OptionIter<'a> {
    /// Over validated wire bytes.
    Wire(&'a [u8]),
    /// Over a caller's list.
    List(core::slice::Iter<'a, PcpOption<'a>>),
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = PcpOption<'a>;

    fn next(&mut self) -> Option<PcpOption<'a>> {
        match self {
            OptionIter::List(it) => it.next().copied(),
            OptionIter::Wire(buf) => {
                if buf.is_empty() {
                    return None;
                }
                // The bytes were validated by Options::parse; a failure here
                // can only come from a hand-built Options::Wire and ends the walk.
                match split_option(buf) {
                    Ok((code, data, rest)) => {
                        *buf = rest;
                        PcpOption::parse(code, data).ok()
                    }
                    Err(_) => {
                        *buf = &[];
                        None
                    }
                }
            }
        }
    }
}
