//! Set-element changes sent to the kernel's nf_tables over netlink, from
//! inside pcpd: no `nft` process per batch. One batch is one nf_tables
//! transaction (`NFNL_MSG_BATCH_BEGIN` .. `NFNL_MSG_BATCH_END`, atomic in
//! the kernel), made of `NEWSETELEM` / `DELSETELEM` messages of up to
//! [`ELEMS_PER_MESSAGE`] elements each; every message asks for an ack, so
//! the answer says whether the whole transaction held.
//!
//! Keys and values are nf_tables' register layout for concatenations:
//! each part padded to 4 bytes (an IPv4 address 4, an IPv6 address 16,
//! `inet_proto` 1 + 3, `inet_service` 2 big-endian + 2), the layout
//! `nft --debug=netlink` shows. An interval set's element (FILTER's
//! remote prefix and port range) carries its first and last key
//! (`NFTA_SET_ELEM_KEY_END`); a map with `interval` values (the port-block
//! SNAT map) holds first and last value one after the other.
//!
//! The messages are built with `netlink-packet-netfilter` (MIT) and sent
//! with `netlink-sys`; nothing links libnftnl or libnftables.

use std::io;

use netlink_packet_core::{
    DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLA_F_NESTED, NLA_HEADER_SIZE,
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{NfTablesMessage, SetElementList, SetElementMessage};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// How long the kernel may take to answer a transaction.
pub(crate) const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// `NFTA_DATA_VALUE`: a key end's one attribute.
const NFTA_DATA_VALUE: u16 = 1;
/// `NFNL_SUBSYS_NFTABLES`: the batch messages' resource id.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Elements per NEWSETELEM/DELSETELEM message.
pub(crate) const ELEMS_PER_MESSAGE: usize = 256;
/// Element operations per transaction: one transaction never holds the
/// nf_tables mutex for long (kube-proxy's cap is about a thousand).
pub(crate) const OPS_PER_TRANSACTION: usize = 1000;

/// One element added to or removed from a set of pcpd's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ElemOp {
    /// `ip` or `ip6` table.
    pub(crate) ipv6: bool,
    /// The set or map.
    pub(crate) set: &'static str,
    /// Add (without NLM_F_EXCL: an identical element is not an error) or
    /// delete.
    pub(crate) add: bool,
    /// The key, in register layout.
    pub(crate) key: Reg,
    /// The last key of an interval set's element.
    pub(crate) key_end: Option<Reg>,
    /// A map element's value, in register layout.
    pub(crate) data: Option<Reg>,
    /// The element's kernel timeout (adds only).
    pub(crate) timeout_ms: Option<u64>,
    /// The element's expiration, when an add only moves it (an element
    /// that goes away: see `nftables/script.rs`).
    pub(crate) expiration_ms: Option<u64>,
}

/// A key or value in register layout, kept inline: nf_tables' data is at
/// most 64 bytes (`NFT_DATA_VALUE_MAXLEN`), and a batch of a thousand
/// changes would otherwise allocate a few thousand small vectors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reg {
    len: u8,
    bytes: [u8; REG_MAX],
}

/// `NFT_DATA_VALUE_MAXLEN`.
const REG_MAX: usize = 64;

impl Reg {
    /// Appends `part`; `None` when the register would overflow.
    fn push(&mut self, part: &[u8]) -> Option<()> {
        let at = usize::from(self.len);
        self.bytes
            .get_mut(at..at + part.len())?
            .copy_from_slice(part);
        self.len += part.len() as u8;
        Some(())
    }

    /// `self` followed by `more` (a range map's first and last value).
    pub(crate) fn concat(mut self, more: &Reg) -> Option<Reg> {
        self.push(more)?;
        Some(self)
    }
}

impl Default for Reg {
    fn default() -> Self {
        Reg {
            len: 0,
            bytes: [0; REG_MAX],
        }
    }
}

impl std::ops::Deref for Reg {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Reg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x?}", &**self)
    }
}

/// Test values only: anything past 64 bytes would be cut off silently,
/// so nothing else builds a register this way.
#[cfg(test)]
impl From<&[u8]> for Reg {
    fn from(b: &[u8]) -> Self {
        let mut r = Reg::default();
        r.push(&b[..b.len().min(REG_MAX)]);
        r
    }
}

/// The register layout of a key or value as nft's text writes it
/// (`192.0.2.1 . tcp . 80`); `None` for anything else (a prefix, a range).
pub(crate) fn encode(text: &str) -> Option<Reg> {
    match encode_range(text)? {
        (start, end) if start == end => Some(start),
        _ => None,
    }
}

/// The first and last value of a concatenation whose parts may be
/// prefixes (`203.0.113.0/24`) or port ranges (`1024-1535`), in register
/// layout: what an interval set's element holds as its key and key end,
/// and what a map with `interval` values holds as its data (both, one
/// after the other).
pub(crate) fn encode_range(text: &str) -> Option<(Reg, Reg)> {
    let (mut lo, mut hi) = (Reg::default(), Reg::default());
    // Parts are joined by " . " and hold no space themselves.
    for part in crate::nftables::parts(text) {
        let mut both = |l: &[u8], h: &[u8]| {
            lo.push(l)?;
            hi.push(h)
        };
        match part {
            "tcp" => both(&[6, 0, 0, 0], &[6, 0, 0, 0])?,
            "udp" => both(&[17, 0, 0, 0], &[17, 0, 0, 0])?,
            _ if part.contains('/') => match part.parse::<ipnet::IpNet>().ok()? {
                ipnet::IpNet::V4(n) => both(&n.network().octets(), &n.broadcast().octets())?,
                ipnet::IpNet::V6(n) => both(&n.network().octets(), &n.broadcast().octets())?,
            },
            _ if part.contains(':') => {
                let a = part.parse::<std::net::Ipv6Addr>().ok()?.octets();
                both(&a, &a)?;
            }
            _ if part.contains('.') => {
                let a = part.parse::<std::net::Ipv4Addr>().ok()?.octets();
                both(&a, &a)?;
            }
            _ => {
                let (a, b) = part.split_once('-').unwrap_or((part, part));
                let (a, b) = (a.parse::<u16>().ok()?, b.parse::<u16>().ok()?);
                let (a, b) = (a.to_be_bytes(), b.to_be_bytes());
                both(&[a[0], a[1], 0, 0], &[b[0], b[1], 0, 0])?;
            }
        }
    }
    Some((lo, hi))
}

const NLA_HEADER: usize = NLA_HEADER_SIZE;

/// A netlink socket to nf_tables.
pub(crate) struct NftLink {
    socket: Socket,
    seq: u32,
    /// Answers read from the kernel.
    buf: Vec<u8>,
    /// The transaction being sent (kept: a thousand elements make ~100 kB,
    /// which a fresh allocation would map and fault in every time).
    out: Vec<u8>,
}

impl NftLink {
    pub(crate) fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Error acks carry only the header, not the whole batch echoed
        // back; room for a transaction's acks; and a kernel that never
        // answers fails the batch instead of hanging the shard.
        socket.set_cap_ack(true)?;
        socket.set_rx_buf_sz(1 << 20)?;
        socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(NftLink {
            socket,
            seq: 0,
            buf: vec![0u8; 1 << 16],
            out: Vec::with_capacity(128 * 1024),
        })
    }

    /// Applies `ops` to table `table`: one transaction per
    /// [`OPS_PER_TRANSACTION`] operations, in order. `Err` when the kernel
    /// refused one (that transaction changed nothing; earlier ones hold).
    pub(crate) fn apply(&mut self, table: &str, ops: &[ElemOp]) -> io::Result<()> {
        for chunk in ops.chunks(OPS_PER_TRANSACTION) {
            self.transaction(table, chunk)?;
        }
        Ok(())
    }

    fn transaction(&mut self, table: &str, ops: &[ElemOp]) -> io::Result<()> {
        let mut ops = ops.iter().peekable();
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        self.push(&mut out, 0, batch(ControlMessage::BatchBegin));
        let first = self.seq.wrapping_add(1);
        let mut acks = 0usize;
        let mut elements = Vec::with_capacity(ELEMS_PER_MESSAGE * 64);
        while let Some(head) = ops.next() {
            let (ipv6, set, add) = (head.ipv6, head.set, head.add);
            elements.clear();
            put_element(&mut elements, head);
            let mut n = 1;
            while n < ELEMS_PER_MESSAGE {
                match ops.next_if(|o| o.ipv6 == ipv6 && o.set == set && o.add == add) {
                    Some(o) => put_element(&mut elements, o),
                    None => break,
                }
                n += 1;
            }
            let body = SetElementMessage {
                attributes: vec![
                    SetElementList::Table(table.to_string()),
                    SetElementList::Set(set.to_string()),
                    SetElementList::Other(DefaultNla::new(
                        NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
                        std::mem::take(&mut elements),
                    )),
                ],
            };
            let (msg, flags) = if add {
                (
                    NfTablesMessage::NewSetElement(body),
                    NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                )
            } else {
                (
                    NfTablesMessage::DeleteSetElement(body),
                    NLM_F_REQUEST | NLM_F_ACK,
                )
            };
            let family = if ipv6 {
                NetfilterProtoFamily::IPv6
            } else {
                NetfilterProtoFamily::IPv4
            };
            self.push(
                &mut out,
                flags,
                NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), msg),
            );
            acks += 1;
        }
        self.push(&mut out, 0, batch(ControlMessage::BatchEnd));
        let sent = self.socket.send(&out, 0);
        self.out = out;
        sent?;
        self.acks(first, acks)
    }

    /// Appends one message (flags besides NLM_F_REQUEST as given).
    fn push(&mut self, out: &mut Vec<u8>, flags: u16, msg: NetfilterMessage) {
        self.seq = self.seq.wrapping_add(1);
        let mut hdr = NetlinkHeader::default();
        hdr.flags = flags | NLM_F_REQUEST;
        hdr.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
        packet.finalize();
        let at = out.len();
        out.resize(at + packet.buffer_len(), 0);
        packet.serialize(&mut out[at..]);
    }

    /// Reads the answers to `acks` messages numbered from `first`; the
    /// first error is the transaction's (the kernel aborted all of it).
    fn acks(&mut self, first: u32, mut acks: usize) -> io::Result<()> {
        // The batch header takes a number before the first element message.
        let span = acks as u32 + 1;
        let mut failed: Option<io::Error> = None;
        while acks > 0 {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = <NetlinkMessage<NetfilterMessage>>::deserialize(&self.buf[off..n])
                    .map_err(|e| io::Error::other(format!("nf_tables netlink: {e}")))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number.wrapping_sub(first) < span {
                    if let NetlinkPayload::Error(e) = msg.payload {
                        acks = acks.saturating_sub(1);
                        if let Some(code) = e.code {
                            failed.get_or_insert(io::Error::from_raw_os_error(-code.get()));
                        }
                    }
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

fn batch(msg: ControlMessage) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        msg,
    )
}

/// Netlink attribute numbers of an element (`linux/netfilter/nf_tables.h`).
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
/// `NFTA_SET_ELEM_LIST_ELEMENTS`: the element list of a NEWSETELEM/DELSETELEM.
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;

/// Appends one netlink attribute (header, value, padding to 4 bytes).
fn put_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = (NLA_HEADER + value.len()) as u16;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Appends a nested attribute whose contents `fill` appends.
fn put_nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; NLA_HEADER]);
    fill(out);
    let len = (out.len() - at) as u16;
    out[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    out[at + 2..at + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// Appends one element of a NEWSETELEM/DELSETELEM's element list. Written
/// directly rather than through `netlink-packet-netfilter`'s attribute
/// types: those compute a nested attribute's length anew at every level
/// of every emit, which at a thousand elements per transaction was the
/// writer's largest cost (the test checks the bytes are the same).
fn put_element(out: &mut Vec<u8>, op: &ElemOp) {
    put_nested(out, NFTA_LIST_ELEM, |out| {
        put_nested(out, NFTA_SET_ELEM_KEY, |out| {
            put_attr(out, NFTA_DATA_VALUE, &op.key)
        });
        if let Some(end) = &op.key_end {
            put_nested(out, NFTA_SET_ELEM_KEY_END, |out| {
                put_attr(out, NFTA_DATA_VALUE, end)
            });
        }
        if let Some(d) = &op.data {
            put_nested(out, NFTA_SET_ELEM_DATA, |out| {
                put_attr(out, NFTA_DATA_VALUE, d)
            });
        }
        if let Some(t) = op.timeout_ms {
            put_attr(out, NFTA_SET_ELEM_TIMEOUT, &t.to_be_bytes());
        }
        if let Some(e) = op.expiration_ms {
            put_attr(out, NFTA_SET_ELEM_EXPIRATION, &e.to_be_bytes());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;
    use netlink_packet_netfilter::nftables::{DataAttribute, ListAttribute, SetElementAttribute};

    /// The element as `netlink-packet-netfilter` writes it.
    fn crate_element(op: &ElemOp) -> Vec<u8> {
        let mut attrs = vec![SetElementAttribute::Key(DataAttribute::Value(
            op.key.to_vec(),
        ))];
        if let Some(end) = &op.key_end {
            attrs.push(SetElementAttribute::KeyEnd(vec![DefaultNla::new(
                NFTA_DATA_VALUE,
                end.to_vec(),
            )]));
        }
        if let Some(d) = &op.data {
            attrs.push(SetElementAttribute::Data(DataAttribute::Value(d.to_vec())));
        }
        if let Some(t) = op.timeout_ms {
            attrs.push(SetElementAttribute::Timeout(t));
        }
        if let Some(e) = op.expiration_ms {
            attrs.push(SetElementAttribute::Expiration(e));
        }
        let el = ListAttribute::Element(attrs);
        let mut buf = vec![0u8; el.buffer_len()];
        el.emit(&mut buf);
        buf
    }

    #[test]
    fn elements_are_written_as_the_netfilter_crate_writes_them() {
        let (lo, hi) = encode_range("192.0.2.1 . tcp . 80 . 203.0.113.0/24 . 0-65535").unwrap();
        let ops = [
            ElemOp {
                ipv6: false,
                set: "dnat4",
                add: true,
                key: encode("192.0.2.1 . udp . 4000").unwrap(),
                key_end: None,
                data: encode("10.0.0.1 . 8080"),
                timeout_ms: Some(21_600_000),
                expiration_ms: None,
            },
            ElemOp {
                ipv6: false,
                set: "filter4",
                add: false,
                key: lo,
                key_end: Some(hi),
                data: None,
                timeout_ms: Some(1000),
                expiration_ms: Some(1),
            },
            ElemOp {
                ipv6: true,
                set: "pinhole6",
                add: true,
                // 25 bytes: the value needs padding.
                key: Reg::from(&[7u8; 25][..]),
                key_end: None,
                data: Some(Reg::from(&[1u8, 2, 3][..])),
                timeout_ms: None,
                expiration_ms: None,
            },
        ];
        for op in &ops {
            let mut ours = Vec::new();
            put_element(&mut ours, op);
            assert_eq!(ours, crate_element(op), "{op:?}");
        }
    }

    #[test]
    fn keys_and_values_take_the_register_layout_nft_shows() {
        // `nft --debug=netlink add element ip t dnat4 { 1.2.3.4 . tcp . 80
        // : 10.0.0.1 . 8080 }` prints: 04030201 00000006 00005000 :
        // 0100000a 0000901f (little-endian words).
        assert_eq!(
            *encode("1.2.3.4 . tcp . 80").unwrap(),
            [1, 2, 3, 4, 6, 0, 0, 0, 0, 80, 0, 0]
        );
        assert_eq!(
            *encode("10.0.0.1 . 8080").unwrap(),
            [10, 0, 0, 1, 0x1f, 0x90, 0, 0]
        );
        let v6 = encode("2001:db8::1 . udp . 443").unwrap();
        assert_eq!(v6.len(), 16 + 4 + 4);
        assert_eq!(&v6[16..], [17, 0, 0, 0, 1, 187, 0, 0]);
        // Prefixes and ranges are not plain concatenations: they are
        // intervals. `nft --debug=netlink add element ip t filter4 {
        // 192.0.2.1 . tcp . 80 . 203.0.113.0/24 . 0-65535 }` prints
        // 010200c0 00000006 00005000 007100cb 00000000 - 010200c0 00000006
        // 00005000 ff7100cb 0000ffff.
        assert_eq!(encode("192.0.2.0/24 . tcp . 80"), None);
        let (lo, hi) = encode_range("192.0.2.1 . tcp . 80 . 203.0.113.0/24 . 0-65535").unwrap();
        assert_eq!(
            *lo,
            [192, 0, 2, 1, 6, 0, 0, 0, 0, 80, 0, 0, 203, 0, 113, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            *hi,
            [192, 0, 2, 1, 6, 0, 0, 0, 0, 80, 0, 0, 203, 0, 113, 255, 255, 255, 0, 0]
        );
        // The port-block SNAT map's value `192.0.2.1 . 1024-1535`: 010200c0
        // 00000004 010200c0 0000ff05.
        let (lo, hi) = encode_range("192.0.2.1 . 1024-1535").unwrap();
        assert_eq!(
            *lo.concat(&hi).unwrap(),
            [192, 0, 2, 1, 4, 0, 0, 0, 192, 0, 2, 1, 5, 255, 0, 0]
        );
        // Nothing past nf_tables' 64 bytes.
        let long = ["2001:db8::1"; 5].join(" . ");
        assert_eq!(encode(&long), None);
    }
}
