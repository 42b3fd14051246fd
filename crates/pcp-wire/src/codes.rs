//! Code points of RFC 6887 §19 (opcodes, result codes, options) and the
//! PCP extension options pcpd understands.

/// Declares a `u8`-backed enum that keeps values it does not know as
/// `Unknown(u8)`, so a server can answer UNSUPP_OPCODE / UNSUPP_OPTION
/// instead of dropping (smoltcp's `enum_with_unknown!`).
macro_rules! enum_with_unknown {
    (
        $(#[$enum_attr:meta])*
        pub enum $name:ident {
            $( $(#[$variant_attr:meta])* $variant:ident = $value:expr => $text:expr ),+ $(,)?
        }
    ) => {
        $(#[$enum_attr])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$variant_attr])* $variant ),+,
            /// A value this implementation does not know.
            Unknown(u8),
        }

        impl From<u8> for $name {
            fn from(value: u8) -> Self {
                match value {
                    $( $value => $name::$variant ),+,
                    other => $name::Unknown(other),
                }
            }
        }

        impl From<$name> for u8 {
            fn from(value: $name) -> u8 {
                match value {
                    $( $name::$variant => $value ),+,
                    $name::Unknown(other) => other,
                }
            }
        }

        impl $name {
            /// The name the RFC gives this code point.
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+,
                    $name::Unknown(_) => "UNKNOWN",
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self {
                    $name::Unknown(v) => write!(f, "UNKNOWN({v})"),
                    known => f.write_str(known.name()),
                }
            }
        }
    };
}

enum_with_unknown! {
    /// PCP opcodes (RFC 6887 §19.2).
    pub enum Opcode {
        /// ANNOUNCE (§14.1).
        Announce = 0 => "ANNOUNCE",
        /// MAP (§11).
        Map = 1 => "MAP",
        /// PEER (§12).
        Peer = 2 => "PEER",
    }
}

enum_with_unknown! {
    /// PCP result codes (RFC 6887 §7.4), all of 0–13.
    pub enum ResultCode {
        /// 0: success.
        Success = 0 => "SUCCESS",
        /// 1: the version is not recognized (long lifetime).
        UnsuppVersion = 1 => "UNSUPP_VERSION",
        /// 2: disabled for this client or refused by policy (long lifetime).
        NotAuthorized = 2 => "NOT_AUTHORIZED",
        /// 3: the request could not be parsed (long lifetime).
        MalformedRequest = 3 => "MALFORMED_REQUEST",
        /// 4: unsupported opcode (long lifetime).
        UnsuppOpcode = 4 => "UNSUPP_OPCODE",
        /// 5: unsupported mandatory option (long lifetime).
        UnsuppOption = 5 => "UNSUPP_OPTION",
        /// 6: malformed option (long lifetime).
        MalformedOption = 6 => "MALFORMED_OPTION",
        /// 7: network failure of some sort (short lifetime).
        NetworkFailure = 7 => "NETWORK_FAILURE",
        /// 8: the server is short of resources (short lifetime).
        NoResources = 8 => "NO_RESOURCES",
        /// 9: unsupported transport protocol (long lifetime).
        UnsuppProtocol = 9 => "UNSUPP_PROTOCOL",
        /// 10: the subscriber's quota would be exceeded (short lifetime).
        UserExQuota = 10 => "USER_EX_QUOTA",
        /// 11: the suggested external address/port cannot be provided.
        CannotProvideExternal = 11 => "CANNOT_PROVIDE_EXTERNAL",
        /// 12: the client address field differs from the source (long lifetime).
        AddressMismatch = 12 => "ADDRESS_MISMATCH",
        /// 13: the filters could not be created (long lifetime).
        ExcessiveRemotePeers = 13 => "EXCESSIVE_REMOTE_PEERS",
    }
}

impl ResultCode {
    /// Every result code RFC 6887 defines, in numeric order.
    pub const ALL: [ResultCode; 14] = [
        ResultCode::Success,
        ResultCode::UnsuppVersion,
        ResultCode::NotAuthorized,
        ResultCode::MalformedRequest,
        ResultCode::UnsuppOpcode,
        ResultCode::UnsuppOption,
        ResultCode::MalformedOption,
        ResultCode::NetworkFailure,
        ResultCode::NoResources,
        ResultCode::UnsuppProtocol,
        ResultCode::UserExQuota,
        ResultCode::CannotProvideExternal,
        ResultCode::AddressMismatch,
        ResultCode::ExcessiveRemotePeers,
    ];

    /// Whether §7.4 classifies this error as a "short lifetime" error
    /// (transient: retry soon). CANNOT_PROVIDE_EXTERNAL depends on its cause
    /// (§7.4) and is treated as short here; SUCCESS is not an error.
    pub fn is_short_lifetime(self) -> bool {
        matches!(
            self,
            ResultCode::NetworkFailure
                | ResultCode::NoResources
                | ResultCode::UserExQuota
                | ResultCode::CannotProvideExternal
        )
    }
}

enum_with_unknown! {
    /// PCP option codes (RFC 6887 §19.4, RFC 7220, RFC 7225, RFC 7753).
    pub enum OptionCode {
        /// THIRD_PARTY (RFC 6887 §13.1), mandatory.
        ThirdParty = 1 => "THIRD_PARTY",
        /// PREFER_FAILURE (RFC 6887 §13.2), mandatory.
        PreferFailure = 2 => "PREFER_FAILURE",
        /// FILTER (RFC 6887 §13.3), mandatory.
        Filter = 3 => "FILTER",
        /// DESCRIPTION (RFC 7220), optional.
        Description = 128 => "DESCRIPTION",
        /// PREFIX64 (RFC 7225), optional.
        Prefix64 = 129 => "PREFIX64",
        /// PORT_SET (RFC 7753), optional.
        PortSet = 130 => "PORT_SET",
    }
}

impl OptionCode {
    /// RFC 6887 §7.3: the most significant bit clear means the option is
    /// mandatory to process.
    pub fn is_mandatory(self) -> bool {
        u8::from(self) & 0x80 == 0
    }
}

/// NAT-PMP result codes (RFC 6886 §3.5). They are 16 bits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatPmpResult {
    /// 0: success.
    Success,
    /// 1: unsupported version.
    UnsupportedVersion,
    /// 2: not authorized / refused.
    NotAuthorized,
    /// 3: network failure.
    NetworkFailure,
    /// 4: out of resources.
    OutOfResources,
    /// 5: unsupported opcode.
    UnsupportedOpcode,
    /// Any other value (RFC 6886 §3.5: clients treat it as fatal).
    Unknown(u16),
}

impl From<u16> for NatPmpResult {
    fn from(v: u16) -> Self {
        match v {
            0 => Self::Success,
            1 => Self::UnsupportedVersion,
            2 => Self::NotAuthorized,
            3 => Self::NetworkFailure,
            4 => Self::OutOfResources,
            5 => Self::UnsupportedOpcode,
            other => Self::Unknown(other),
        }
    }
}

impl From<NatPmpResult> for u16 {
    fn from(v: NatPmpResult) -> u16 {
        match v {
            NatPmpResult::Success => 0,
            NatPmpResult::UnsupportedVersion => 1,
            NatPmpResult::NotAuthorized => 2,
            NatPmpResult::NetworkFailure => 3,
            NatPmpResult::OutOfResources => 4,
            NatPmpResult::UnsupportedOpcode => 5,
            NatPmpResult::Unknown(other) => other,
        }
    }
}

impl From<ResultCode> for NatPmpResult {
    /// The closest NAT-PMP answer for a PCP outcome (RFC 6887 Appendix A
    /// maps the two protocols' semantics).
    fn from(code: ResultCode) -> Self {
        match code {
            ResultCode::Success => Self::Success,
            ResultCode::UnsuppVersion => Self::UnsupportedVersion,
            ResultCode::UnsuppOpcode => Self::UnsupportedOpcode,
            ResultCode::NetworkFailure => Self::NetworkFailure,
            ResultCode::NoResources
            | ResultCode::UserExQuota
            | ResultCode::CannotProvideExternal => Self::OutOfResources,
            _ => Self::NotAuthorized,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_codes_match_rfc6887_section_7_4() {
        let names = [
            "SUCCESS",
            "UNSUPP_VERSION",
            "NOT_AUTHORIZED",
            "MALFORMED_REQUEST",
            "UNSUPP_OPCODE",
            "UNSUPP_OPTION",
            "MALFORMED_OPTION",
            "NETWORK_FAILURE",
            "NO_RESOURCES",
            "UNSUPP_PROTOCOL",
            "USER_EX_QUOTA",
            "CANNOT_PROVIDE_EXTERNAL",
            "ADDRESS_MISMATCH",
            "EXCESSIVE_REMOTE_PEERS",
        ];
        for (i, name) in names.iter().enumerate() {
            let code = ResultCode::from(i as u8);
            assert_eq!(code.name(), *name);
            assert_eq!(u8::from(code), i as u8);
            assert_eq!(ResultCode::ALL[i], code);
        }
        assert_eq!(ResultCode::from(14), ResultCode::Unknown(14));
        assert_eq!(ResultCode::Unknown(200).to_string(), "UNKNOWN(200)");
        // §7.4 short-lifetime errors.
        let short: Vec<_> = ResultCode::ALL
            .iter()
            .filter(|c| c.is_short_lifetime())
            .map(|c| u8::from(*c))
            .collect();
        assert_eq!(short, vec![7, 8, 10, 11]);
    }

    #[test]
    fn option_mandatory_bit_per_section_7_3() {
        assert!(OptionCode::ThirdParty.is_mandatory());
        assert!(OptionCode::Filter.is_mandatory());
        assert!(!OptionCode::Description.is_mandatory());
        assert!(!OptionCode::PortSet.is_mandatory());
        assert!(OptionCode::Unknown(127).is_mandatory());
        assert!(!OptionCode::Unknown(255).is_mandatory());
    }

    #[test]
    fn natpmp_result_round_trip() {
        for v in 0..8u16 {
            assert_eq!(u16::from(NatPmpResult::from(v)), v);
        }
        assert_eq!(
            NatPmpResult::from(ResultCode::UserExQuota),
            NatPmpResult::OutOfResources
        );
    }
}
