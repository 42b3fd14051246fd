//! Conntrack follows the mapping: when a NAT mapping is removed (deleted,
//! expired, revoked, moved by a drain), the kernel's conntrack entries of
//! its flows go too, in-process over ctnetlink. Without this an
//! established flow keeps its DNAT/SNAT until the entry times out (days
//! for TCP), and the external port may by then be another subscriber's.
//!
//! One dump per batch of removals (IPv4, the NAT44 table), matched in
//! pcpd, then one delete per matching entry by its original tuple; a delete
//! of an entry that is already gone is not an error.
//!
//! What is a mapping's flow:
//! * inbound (MAP, static): the original destination is the external endpoint;
//! * outbound from the mapped port (§11.1 SNAT): the reply destination is
//!   the external endpoint;
//! * PEER: the original tuple is the internal endpoint to the remote peer.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// errno ENOENT (Linux).
const ENOENT: i32 = 2;

/// An address, protocol and port, as a conntrack tuple half holds them.
pub(crate) type Endpoint = (IpAddr, u8, u16);

/// What to forget: external endpoints of removed MAP/static mappings, and
/// (internal, remote) pairs of removed PEER mappings.
#[derive(Debug, Default)]
pub(crate) struct Forget {
    pub(crate) external: HashSet<Endpoint>,
    pub(crate) peers: HashSet<(Endpoint, Endpoint)>,
}

impl Forget {
    pub(crate) fn is_empty(&self) -> bool {
        self.external.is_empty() && self.peers.is_empty()
    }

    /// Adds what `other` forgets.
    pub(crate) fn absorb(&mut self, other: Forget) {
        self.external.extend(other.external);
        self.peers.extend(other.peers);
    }
}

/// One direction of a conntrack entry: (source, destination).
type Half = (Endpoint, Endpoint);

fn half(tuple: &[Tuple]) -> Option<Half> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for t in tuple {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(x) => proto = Some(u8::from(*x)),
                        ProtoTuple::SourcePort(x) => sport = Some(*x),
                        ProtoTuple::DestinationPort(x) => dport = Some(*x),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let proto = proto?;
    Some(((src?, proto, sport?), (dst?, proto, dport?)))
}

/// Whether an entry (original, reply) belongs to something in `f`.
fn belongs(f: &Forget, orig: &Half, reply: &Half) -> bool {
    f.external.contains(&orig.1) || f.external.contains(&reply.1) || f.peers.contains(orig)
}

fn tuple_of(h: &Half) -> Vec<Tuple> {
    let ((src, proto, sport), (dst, _, dport)) = *h;
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(src),
            IPTuple::DestinationAddress(dst),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::from(proto)),
            ProtoTuple::SourcePort(sport),
            ProtoTuple::DestinationPort(dport),
        ]),
    ]
}

/// A ctnetlink socket.
pub(crate) struct Conntrack {
    socket: Socket,
    seq: u32,
}

impl Conntrack {
    pub(crate) fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // A kernel that stops answering fails the flush, never hangs the shard.
        socket2::SockRef::from(&socket).set_read_timeout(Some(crate::nfnetlink::REPLY_TIMEOUT))?;
        Ok(Conntrack { socket, seq: 0 })
    }

    fn send(&mut self, flags: u16, msg: ConntrackMessage) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut hdr = NetlinkHeader::default();
        hdr.flags = flags;
        hdr.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            hdr,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                msg,
            )),
        );
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(self.seq)
    }

    /// Reads the answers to the requests numbered `first` .. `first +
    /// acks` (just `first` for a dump) until DONE (a dump) or `acks` acks or
    /// errors; calls `each` with every entry of a dump. Answers to other
    /// requests are skipped.
    fn read(
        &mut self,
        first: u32,
        mut acks: usize,
        mut each: impl FnMut(&[ConntrackAttribute]),
    ) -> io::Result<()> {
        let span = acks.max(1) as u32;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self.socket.recv(&mut &mut buf[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[off..n])
                    .map_err(|e| io::Error::other(format!("ctnetlink: {e}")))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number.wrapping_sub(first) < span {
                    match msg.payload {
                        NetlinkPayload::Done(_) => return Ok(()),
                        NetlinkPayload::Error(e) => {
                            // ENOENT: the entry went by itself meanwhile.
                            if let Some(code) = e.code {
                                if code.get() != -ENOENT {
                                    return Err(io::Error::from_raw_os_error(-code.get()));
                                }
                            }
                            acks = acks.saturating_sub(1);
                            if acks == 0 {
                                return Ok(());
                            }
                        }
                        NetlinkPayload::InnerMessage(NetfilterMessage {
                            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                            ..
                        }) => each(&attrs),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    /// Deletes every IPv4 conntrack entry that belongs to `f`; returns how many.
    pub(crate) fn forget(&mut self, f: &Forget) -> io::Result<usize> {
        if f.is_empty() || tracks_nothing() {
            return Ok(0);
        }
        let seq = self.send(
            NLM_F_REQUEST | NLM_F_DUMP,
            ConntrackMessage::Get(Vec::new()),
        )?;
        let mut doomed: Vec<Half> = Vec::new();
        self.read(seq, 0, |attrs| {
            let (mut orig, mut reply) = (None, None);
            for a in attrs {
                match a {
                    ConntrackAttribute::CtaTupleOrig(t) => orig = half(t),
                    ConntrackAttribute::CtaTupleReply(t) => reply = half(t),
                    _ => {}
                }
            }
            if let (Some(o), Some(r)) = (orig, reply) {
                if belongs(f, &o, &r) {
                    doomed.push(o);
                }
            }
        })?;
        // Deletes in chunks, each answered by an ack or an error.
        for chunk in doomed.chunks(256) {
            let mut first = None;
            for o in chunk {
                let seq = self.send(
                    NLM_F_REQUEST | NLM_F_ACK,
                    ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple_of(o))]),
                )?;
                first.get_or_insert(seq);
            }
            if let Some(first) = first {
                self.read(first, chunk.len(), |_| {})?;
            }
        }
        Ok(doomed.len())
    }
}

/// Whether this network namespace's conntrack table is empty (then no
/// dump is needed: a dump walks every bucket of the kernel's table, which
/// costs about the same empty or not). Unknown counts as not empty.
pub(crate) fn tracks_nothing() -> bool {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_of_a_mapping_are_told_apart() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let ext = (ip("192.0.2.1"), 6, 40000);
        let mut f = Forget::default();
        f.external.insert(ext);
        let remote = (ip("198.51.100.2"), 6, 5555);
        let internal = (ip("100.64.0.2"), 6, 8080);
        // Inbound through the DNAT: original destination is the external endpoint.
        assert!(belongs(&f, &(remote, ext), &(internal, remote)));
        // Outbound from the mapped port: the reply comes back to it.
        assert!(belongs(&f, &(internal, remote), &(remote, ext)));
        // Another port of the same address: not this mapping's.
        let other = (ip("192.0.2.1"), 6, 40001);
        assert!(!belongs(&f, &(remote, other), &(internal, remote)));
        // A PEER's five-tuple.
        f.peers.insert((internal, remote));
        assert!(belongs(&f, &(internal, remote), &(remote, other)));
        let t = tuple_of(&(remote, ext));
        assert_eq!(half(&t), Some((remote, ext)));
    }
}
