//! Conntrack follows the mapping: when a NAT mapping is removed (deleted,
//! expired, revoked, moved by a drain), the kernel's conntrack entries of
//! its flows go too, in-process over ctnetlink. Without this an
//! established flow keeps its DNAT/SNAT until the entry times out (days
//! for TCP), and the external port may by then be another subscriber's.
//!
//! Which entries to delete comes from an index of the flows of installed
//! mappings, learnt from conntrack's own events (NEW and DESTROY, the
//! ctnetlink multicast groups): a removal costs one delete per flow of
//! its mappings, by original tuple, whatever the size of the table (a
//! carrier's holds millions of flows, almost all of them port-block SNAT
//! that no mapping owns). The index is built by one dump of the table
//! (IPv4, the NAT44 table) at the dataplane's first batch, and again
//! whenever it cannot be trusted (the kernel dropped events because pcpd
//! read them too late: ENOBUFS); events are read before every removal,
//! at most every 10 ms between, and every `IDLE_TICK` (100 ms) when no
//! batch comes. Without events (no permission) every removal dumps and
//! matches in pcpd. A delete of an entry that is already gone is not an
//! error. How often each way ran is counted ([`flow_stats`],
//! `pcpd_conntrack_*` metrics).
//!
//! What is a mapping's flow:
//! * inbound (MAP, static): the original destination is the external endpoint;
//! * outbound from the mapped port (§11.1 SNAT): the reply destination is
//!   the external endpoint;
//! * PEER: the original tuple is the internal endpoint to the remote peer.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

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
/// errno ENOBUFS (Linux): the kernel dropped events for this socket.
const ENOBUFS: i32 = 105;
/// `NFNLGRP_CONNTRACK_NEW` and `NFNLGRP_CONNTRACK_DESTROY`.
const GROUPS: [u32; 2] = [1, 3];
/// Receive buffer of the event socket: room for ~40 k events between two
/// reads (as root; otherwise the system's `rmem_max`).
const EVENT_BUFFER: usize = 8 << 20;
/// Reads of the event socket per batch at most: a flood of events waits
/// for the next batch rather than holding this one (the kernel drops what
/// overflows, and the index is rebuilt).
const EVENT_READS: usize = 1024;

/// Process-wide counts of conntrack work (all shards).
static DUMPS: AtomicU64 = AtomicU64::new(0);
static REMOVED_BY_INDEX: AtomicU64 = AtomicU64::new(0);
static REMOVED_BY_DUMP: AtomicU64 = AtomicU64::new(0);

/// How removed mappings' flows were found, since the process started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowStats {
    /// Dumps of the whole table (the index was not trusted).
    pub dumps: u64,
    /// Entries deleted as the index listed them.
    pub removed_by_index: u64,
    /// Entries deleted as a dump found them.
    pub removed_by_dump: u64,
}

/// The counts so far.
pub fn flow_stats() -> FlowStats {
    FlowStats {
        dumps: DUMPS.load(Ordering::Relaxed),
        removed_by_index: REMOVED_BY_INDEX.load(Ordering::Relaxed),
        removed_by_dump: REMOVED_BY_DUMP.load(Ordering::Relaxed),
    }
}

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

/// A ctnetlink socket, and the flows of installed mappings learnt from
/// conntrack's events.
pub(crate) struct Conntrack {
    socket: Socket,
    seq: u32,
    /// Subscribed to NEW and DESTROY events (`None`: events could not be
    /// had, every removal dumps).
    events: Option<Socket>,
    index: FlowIndex,
    buf: Vec<u8>,
}

/// The flows of mapped external endpoints, by endpoint.
#[derive(Debug, Default)]
struct FlowIndex {
    /// Original tuples of the flows through each mapped external endpoint
    /// (inbound to it, or outbound from its mapped port).
    flows: HashMap<Endpoint, Vec<Half>>,
    /// Whether `flows` holds every such flow: not at start, nor after the
    /// kernel dropped events.
    trusted: bool,
}

impl FlowIndex {
    /// Files a flow under the mapped external endpoint it goes through, if
    /// any (`mapped`).
    fn file(&mut self, orig: Half, reply: &Half, mapped: &dyn Fn(&Endpoint) -> bool) {
        let at = if mapped(&orig.1) {
            orig.1
        } else if mapped(&reply.1) {
            reply.1
        } else {
            return;
        };
        let flows = self.flows.entry(at).or_default();
        if !flows.contains(&orig) {
            flows.push(orig);
        }
    }

    /// Takes a flow that ended out.
    fn unfile(&mut self, orig: &Half, reply: &Half) {
        for at in [orig.1, reply.1] {
            if let Some(flows) = self.flows.get_mut(&at) {
                flows.retain(|h| h != orig);
                if flows.is_empty() {
                    self.flows.remove(&at);
                }
            }
        }
    }

    /// Follows one conntrack event: NEW files the flow, DESTROY takes it
    /// out.
    fn event(
        &mut self,
        payload: NetlinkPayload<NetfilterMessage>,
        mapped: &dyn Fn(&Endpoint) -> bool,
    ) {
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(m),
            ..
        }) = payload
        else {
            return;
        };
        match m {
            ConntrackMessage::New(attrs) => {
                if let Some((orig, reply)) = halves(&attrs) {
                    self.file(orig, &reply, mapped);
                }
            }
            ConntrackMessage::Delete(attrs) => {
                if let Some((orig, reply)) = halves(&attrs) {
                    self.unfile(&orig, &reply);
                }
            }
            _ => {}
        }
    }

    /// Takes the flows of an endpoint out.
    fn take(&mut self, at: &Endpoint) -> Vec<Half> {
        self.flows.remove(at).unwrap_or_default()
    }
}

/// Opens a socket subscribed to conntrack's NEW and DESTROY events,
/// non-blocking, with a large receive buffer.
fn event_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    for g in GROUPS {
        socket.add_membership(g)?;
    }
    socket.set_non_blocking(true)?;
    let fd = socket2::SockRef::from(&socket);
    // SO_RCVBUFFORCE (root) may exceed rmem_max; else what is allowed.
    if nix::sys::socket::setsockopt(&*fd, nix::sys::socket::sockopt::RcvBufForce, &EVENT_BUFFER)
        .is_err()
    {
        socket.set_rx_buf_sz(EVENT_BUFFER)?;
    }
    Ok(socket)
}

/// The (original, reply) halves of an entry's attributes.
fn halves(attrs: &[ConntrackAttribute]) -> Option<(Half, Half)> {
    let (mut orig, mut reply) = (None, None);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = half(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = half(t),
            _ => {}
        }
    }
    Some((orig?, reply?))
}

impl Conntrack {
    pub(crate) fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // A kernel that stops answering fails the flush, never hangs the shard.
        socket2::SockRef::from(&socket).set_read_timeout(Some(crate::nfnetlink::REPLY_TIMEOUT))?;
        let events = event_socket()
            .inspect_err(|e| {
                tracing::warn!("conntrack events: {e}; every removal dumps the conntrack table")
            })
            .ok();
        Ok(Conntrack {
            socket,
            seq: 0,
            events,
            index: FlowIndex::default(),
            buf: vec![0u8; 1 << 16],
        })
    }

    /// Reads the events queued so far into the index: NEW files a flow of
    /// a mapped endpoint (`mapped`), DESTROY takes it out.
    pub(crate) fn learn(&mut self, mapped: &dyn Fn(&Endpoint) -> bool) {
        let Conntrack {
            events: Some(events),
            index,
            buf,
            ..
        } = self
        else {
            return;
        };
        for _ in 0..EVENT_READS {
            let n = match events.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(ENOBUFS) => {
                    // Events were lost: the index is a guess until a dump.
                    index.trusted = false;
                    continue;
                }
                Err(_) => break, // EAGAIN: all read
            };
            let mut off = 0;
            while off < n {
                let Ok(msg) = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[off..n]) else {
                    index.trusted = false;
                    break;
                };
                let len = msg.header.length as usize;
                index.event(msg.payload, mapped);
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
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

    /// Brings the index up to date: the events queued so far, and a dump
    /// of the table when the index is not trusted (at the first batch, or
    /// after the kernel dropped events), so removals need none. Nothing
    /// without events: removals then dump.
    pub(crate) fn resync(&mut self, mapped: &dyn Fn(&Endpoint) -> bool) -> io::Result<()> {
        if self.events.is_none() {
            return Ok(());
        }
        self.learn(mapped);
        if !self.index.trusted {
            self.dump(&Forget::default(), mapped)?;
        }
        Ok(())
    }

    /// Deletes every IPv4 conntrack entry that belongs to `f`; returns how
    /// many. `mapped`: whether an external endpoint is an installed
    /// mapping's (the flows the index keeps).
    pub(crate) fn forget(
        &mut self,
        f: &Forget,
        mapped: &dyn Fn(&Endpoint) -> bool,
    ) -> io::Result<usize> {
        if f.is_empty() {
            return Ok(0);
        }
        // Flows that began up to now, the removed mappings' included.
        self.learn(&|e| f.external.contains(e) || mapped(e));
        let doomed = if self.index.trusted {
            let mut doomed: Vec<Half> = f.peers.iter().copied().collect();
            for e in &f.external {
                doomed.extend(self.index.take(e));
            }
            REMOVED_BY_INDEX.fetch_add(doomed.len() as u64, Ordering::Relaxed);
            doomed
        } else {
            let doomed = self.dump(f, mapped)?;
            REMOVED_BY_DUMP.fetch_add(doomed.len() as u64, Ordering::Relaxed);
            doomed
        };
        self.delete(&doomed)?;
        Ok(doomed.len())
    }

    /// Walks the whole table: returns the entries that belong to `f`, and
    /// rebuilds the index from the others (trusted from now on, if events
    /// come: those of entries made during the dump are read next).
    fn dump(&mut self, f: &Forget, mapped: &dyn Fn(&Endpoint) -> bool) -> io::Result<Vec<Half>> {
        self.index = FlowIndex {
            flows: HashMap::new(),
            trusted: self.events.is_some(),
        };
        if tracks_nothing() {
            return Ok(Vec::new());
        }
        DUMPS.fetch_add(1, Ordering::Relaxed);
        let seq = self.send(
            NLM_F_REQUEST | NLM_F_DUMP,
            ConntrackMessage::Get(Vec::new()),
        )?;
        let mut doomed: Vec<Half> = Vec::new();
        let mut entries: Vec<(Half, Half)> = Vec::new();
        self.read(seq, 0, |attrs| {
            if let Some((o, r)) = halves(attrs) {
                if belongs(f, &o, &r) {
                    doomed.push(o);
                } else {
                    entries.push((o, r));
                }
            }
        })?;
        for (o, r) in entries {
            self.index.file(o, &r, mapped);
        }
        Ok(doomed)
    }

    /// Deletes entries by original tuple, in chunks, each answered by an
    /// ack or an error.
    fn delete(&mut self, doomed: &[Half]) -> io::Result<()> {
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
        Ok(())
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

    #[test]
    fn the_index_files_flows_under_the_mapped_endpoint_they_go_through() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let ext = (ip("192.0.2.1"), 17, 40000);
        let other_ext = (ip("192.0.2.1"), 17, 1500);
        let internal = (ip("100.64.0.2"), 17, 9100);
        let remote = (ip("198.51.100.2"), 17, 5555);
        let dns = (ip("198.51.100.3"), 17, 53);
        let mapped = |e: &Endpoint| *e == ext;
        let mut i = FlowIndex::default();
        // Inbound through the DNAT, and outbound from the mapped port.
        let inbound = (remote, ext);
        i.file(inbound, &(internal, remote), &mapped);
        let outbound = (internal, dns);
        i.file(outbound, &(dns, ext), &mapped);
        // A port-block SNAT flow of no mapping is not kept.
        i.file((internal, remote), &(remote, other_ext), &mapped);
        // The same flow told twice is kept once.
        i.file(inbound, &(internal, remote), &mapped);
        assert_eq!(i.flows.len(), 1);
        assert_eq!(i.flows[&ext], [inbound, outbound]);
        // DESTROY takes one out; the rest goes with the mapping.
        i.unfile(&inbound, &(internal, remote));
        assert_eq!(i.take(&ext), [outbound]);
        assert!(i.take(&ext).is_empty() && i.flows.is_empty());
    }
}
