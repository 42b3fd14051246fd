//! Firewall classes (RFC 6887 §3, the "IPv6 firewall" and "IPv4 firewall"
//! rows of §8.1's table): the mapping is the identity, so a MAP or PEER
//! "allocates" the internal address and port themselves, and the dataplane
//! opens a pinhole instead of translating. Everything else (nonces,
//! lifetimes, quotas, THIRD_PARTY, FILTER, PORT_SET, the journal) is the
//! same code as for NAT classes; the differences are here.

use std::net::{IpAddr, Ipv4Addr};

use pcp_wire::ResultCode;

use super::ports::{PortAsk, Suggestion};
use super::request::Refusal;
use super::Engine;

impl Engine {
    /// The external endpoint of a new pinhole: the internal one. A
    /// suggestion naming anything else is a hint that cannot be honoured
    /// (§11.3: the server answers what it assigned), or
    /// CANNOT_PROVIDE_EXTERNAL when it must be (PREFER_FAILURE, §13.2; a
    /// PEER's suggestion, §12.3). The stored NAT address stays unspecified:
    /// [`crate::Mapping::external_ip`] answers with the internal address.
    pub(super) fn pinhole(&self, ask: &PortAsk) -> Result<(Ipv4Addr, u16, u16), Refusal> {
        let (s_addr, s_port) = ask.suggested;
        let honoured = (s_addr.is_unspecified() || s_addr == ask.internal.addr)
            && (s_port == 0 || s_port == ask.internal.port);
        if ask.suggestion == Suggestion::Required && !honoured {
            return Err(ResultCode::CannotProvideExternal.into());
        }
        Ok((Ipv4Addr::UNSPECIFIED, ask.internal.port, ask.count))
    }

    /// The subscriber's external address as a client is told it: its own
    /// address in a firewall class, its pool address (once it has one) in a
    /// NAT class.
    pub(super) fn external_of(&self, subscriber: IpAddr) -> IpAddr {
        if self.compiled.is_firewall(subscriber) {
            subscriber
        } else {
            IpAddr::V4(self.subscriber_address(subscriber))
        }
    }

    /// Like [`Engine::external_of`], with a NAT subscriber's promised
    /// address before its first block.
    pub(super) fn promised_external(&self, subscriber: IpAddr) -> IpAddr {
        if self.compiled.is_firewall(subscriber) {
            subscriber
        } else {
            IpAddr::V4(self.promised_address(subscriber))
        }
    }
}
