//! What went wrong with a datagram, and what the RFC says to do about it.

use crate::codes::{NatPmpResult, ResultCode};

/// What a server must do with a datagram that did not parse (RFC 6887 §8.2,
/// RFC 6886 §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Drop silently; never answer.
    Drop,
    /// Answer with a PCP error response built by
    /// [`crate::pcp::emit_error_response`] with this result code.
    PcpError(ResultCode),
    /// Answer with a NAT-PMP error built by
    /// [`crate::natpmp::emit_unsupported_opcode`].
    NatPmpError(NatPmpResult),
}

/// Why a single option was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OptionFault {
    /// The option header or data runs past the end of the message (§7.3).
    Truncated,
    /// The Option Length is wrong for this kind of option.
    BadLength,
    /// A field holds a value the option's definition forbids.
    BadValue,
    /// The option may appear only once in a request (§7.3).
    Repeated,
}

/// A datagram that is not a well-formed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Fewer than 2 octets (§8.2: drop).
    #[error("datagram shorter than 2 octets")]
    TooShort,
    /// The R bit is set on a datagram sent to the server (§8.2: drop), or a
    /// NAT-PMP opcode >= 128 (RFC 6886 §3.5: ignore).
    #[error("datagram is a response, not a request")]
    NotRequest,
    /// The R bit is clear where a response was expected.
    #[error("datagram is a request, not a response")]
    NotResponse,
    /// A version this codec does not speak (§8.2, §9: UNSUPP_VERSION).
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// Supported version but shorter than the 24-octet header (§8.2: drop).
    #[error("shorter than the 24-octet PCP header")]
    ShortHeader,
    /// Longer than 1100 octets (§7, §8.2: MALFORMED_REQUEST).
    #[error("longer than 1100 octets")]
    TooLong,
    /// Length not a multiple of 4 (§8.2: MALFORMED_REQUEST).
    #[error("length is not a multiple of 4")]
    NotAligned,
    /// Too short for the opcode's fixed data (§8.2: MALFORMED_REQUEST).
    #[error("too short for opcode {0}")]
    ShortForOpcode(u8),
    /// An opcode this codec does not know (§8.2: UNSUPP_OPCODE).
    #[error("unsupported opcode {0}")]
    UnsupportedOpcode(u8),
    /// An option failed validation (§7.3: MALFORMED_OPTION).
    #[error("malformed option {code}: {fault:?}")]
    MalformedOption {
        /// The offending option's code.
        code: u8,
        /// What is wrong with it.
        fault: OptionFault,
    },
    /// A NAT-PMP request whose length does not match its opcode (RFC 6886
    /// gives no error for it: drop).
    #[error("NAT-PMP request of the wrong length for opcode {0}")]
    NatPmpBadLength(u8),
    /// A NAT-PMP request with an opcode below 128 that is not defined
    /// (RFC 6886 §3.5: answer "unsupported opcode").
    #[error("unsupported NAT-PMP opcode {0}")]
    NatPmpUnsupportedOpcode(u8),
}

impl ParseError {
    /// What the server must do with the datagram.
    pub fn disposition(&self) -> Disposition {
        match self {
            ParseError::TooShort
            | ParseError::NotRequest
            | ParseError::NotResponse
            | ParseError::ShortHeader
            | ParseError::NatPmpBadLength(_) => Disposition::Drop,
            ParseError::UnsupportedVersion(_) => Disposition::PcpError(ResultCode::UnsuppVersion),
            ParseError::TooLong | ParseError::NotAligned | ParseError::ShortForOpcode(_) => {
                Disposition::PcpError(ResultCode::MalformedRequest)
            }
            ParseError::UnsupportedOpcode(_) => Disposition::PcpError(ResultCode::UnsuppOpcode),
            ParseError::MalformedOption { .. } => {
                Disposition::PcpError(ResultCode::MalformedOption)
            }
            ParseError::NatPmpUnsupportedOpcode(_) => {
                Disposition::NatPmpError(NatPmpResult::UnsupportedOpcode)
            }
        }
    }

    /// A short stable name, for metrics labels ("drops by reason").
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::TooShort => "too_short",
            ParseError::NotRequest => "not_request",
            ParseError::NotResponse => "not_response",
            ParseError::UnsupportedVersion(_) => "unsupported_version",
            ParseError::ShortHeader => "short_header",
            ParseError::TooLong => "too_long",
            ParseError::NotAligned => "not_aligned",
            ParseError::ShortForOpcode(_) => "short_for_opcode",
            ParseError::UnsupportedOpcode(_) => "unsupported_opcode",
            ParseError::MalformedOption { .. } => "malformed_option",
            ParseError::NatPmpBadLength(_) => "natpmp_bad_length",
            ParseError::NatPmpUnsupportedOpcode(_) => "natpmp_unsupported_opcode",
        }
    }
}

/// A message that cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EmitError {
    /// The output buffer is too small.
    #[error("output buffer too small: {needed} octets needed")]
    BufferTooSmall {
        /// Octets the message needs.
        needed: usize,
    },
    /// The message would exceed 1100 octets (§7; a server answers
    /// MALFORMED_REQUEST instead, §7.3) or a field would overflow.
    #[error("message would exceed the PCP size limit")]
    TooLong,
}
