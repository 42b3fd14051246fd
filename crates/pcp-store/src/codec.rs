//! Binary encoding of state records: compact, fixed layout, no allocation
//! beyond the output buffer. Framing (length + CRC32) is in `lib.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pcp_engine::{
    Block, Holder, InternalEndpoint, Mapping, MappingExtra, MappingId, MappingKey, MappingKind,
    Millis, RemoteEndpoint,
};
use pcp_wire::{Filter, Nonce};

use crate::Record;

const TAG_BLOCK: u8 = 1;
const TAG_HISTORY: u8 = 2;
const TAG_MAPPING: u8 = 3;
const TAG_GONE: u8 = 4;
const TAG_BLOCK_GONE: u8 = 5;

struct W<'a>(&'a mut Vec<u8>);

impl W<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn ip(&mut self, a: IpAddr) {
        match a {
            IpAddr::V4(v4) => {
                self.u8(4);
                self.0.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                self.0.extend_from_slice(&v6.octets());
            }
        }
    }
    fn block(&mut self, b: &Block) {
        self.u32(u32::from(b.addr));
        self.u16(b.first);
        self.u16(b.len);
    }
    fn key(&mut self, k: &MappingKey) {
        self.ip(k.internal.addr);
        self.u8(k.internal.protocol);
        self.u16(k.internal.port);
        match k.remote {
            Some(r) => {
                self.u8(1);
                self.ip(r.addr);
                self.u16(r.port);
            }
            None => self.u8(0),
        }
    }
}

/// Appends the body of `rec` to `out`.
pub(crate) fn encode(rec: &Record, out: &mut Vec<u8>) {
    let mut w = W(out);
    match rec {
        Record::Block {
            subscriber,
            block,
            since,
        } => {
            w.u8(TAG_BLOCK);
            w.ip(*subscriber);
            w.block(block);
            w.u64(*since);
        }
        Record::BlockGone { subscriber, block } => {
            w.u8(TAG_BLOCK_GONE);
            w.ip(*subscriber);
            w.block(block);
        }
        Record::History(h) => {
            w.u8(TAG_HISTORY);
            w.ip(h.internal_addr);
            w.block(&h.block);
            w.u64(h.from_ms.unwrap_or(0));
            w.u64(h.to_ms.unwrap_or(0));
        }
        Record::Mapping(m) => {
            w.u8(TAG_MAPPING);
            match m.kind {
                MappingKind::Map => w.u8(0),
                MappingKind::Static => w.u8(2),
                MappingKind::Peer {
                    remote_addr,
                    remote_port,
                } => {
                    w.u8(1);
                    w.ip(remote_addr);
                    w.u16(remote_port);
                }
            }
            w.ip(m.internal_addr);
            w.u16(m.internal_port);
            w.u8(m.protocol);
            w.u32(u32::from(m.external_addr));
            w.u16(m.external_port);
            w.u16(m.port_count);
            w.0.extend_from_slice(&m.nonce.0);
            w.u64(m.created_ms);
            w.u64(m.expires_ms);
            w.u16(m.client_port);
            // Bit 0: made by NAT-PMP; bit 1: a firewall pinhole. Records
            // written before pinholes existed have bit 1 clear.
            w.u8(u8::from(m.natpmp) | (u8::from(m.firewall) << 1));
            match &m.extra {
                None => w.u8(0),
                Some(e) => {
                    w.u8(1);
                    match e.manager {
                        Some(a) => {
                            w.u8(1);
                            w.ip(a);
                        }
                        None => w.u8(0),
                    }
                    w.u8(u8::from(e.prefer_failure));
                    w.u8(e.filters.len().min(255) as u8);
                    for f in e.filters.iter().take(255) {
                        w.u8(f.prefix_len);
                        w.u16(f.remote_port);
                        w.ip(f.remote_addr);
                    }
                    let d = e.description.as_deref().unwrap_or("");
                    let d = &d.as_bytes()[..d.len().min(u16::MAX as usize)];
                    w.u16(d.len() as u16);
                    w.0.extend_from_slice(d);
                }
            }
        }
        Record::Gone(k) => {
            w.u8(TAG_GONE);
            w.key(k);
        }
    }
}

struct R<'a> {
    b: &'a [u8],
}

impl R<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    }
    fn ip(&mut self) -> Option<IpAddr> {
        match self.u8()? {
            4 => {
                let b = self.take(4)?;
                Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
            }
            6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(self.take(16)?);
                Some(IpAddr::V6(Ipv6Addr::from(a)))
            }
            _ => None,
        }
    }
    fn block(&mut self) -> Option<Block> {
        Some(Block {
            addr: Ipv4Addr::from(self.u32()?),
            first: self.u16()?,
            len: self.u16()?,
        })
    }
}

/// Decodes a record body; `None` if it is malformed.
pub(crate) fn decode(body: &[u8]) -> Option<Record> {
    let mut r = R { b: body };
    let rec = match r.u8()? {
        TAG_BLOCK => Record::Block {
            subscriber: r.ip()?,
            block: r.block()?,
            since: r.u64()?,
        },
        TAG_BLOCK_GONE => Record::BlockGone {
            subscriber: r.ip()?,
            block: r.block()?,
        },
        TAG_HISTORY => {
            let internal_addr = r.ip()?;
            let block = r.block()?;
            let from: Millis = r.u64()?;
            let to: Millis = r.u64()?;
            Record::History(Holder {
                internal_addr,
                block,
                from_ms: Some(from),
                to_ms: Some(to),
            })
        }
        TAG_MAPPING => {
            let kind = match r.u8()? {
                0 => MappingKind::Map,
                2 => MappingKind::Static,
                1 => MappingKind::Peer {
                    remote_addr: r.ip()?,
                    remote_port: r.u16()?,
                },
                _ => return None,
            };
            let internal_addr = r.ip()?;
            let internal_port = r.u16()?;
            let protocol = r.u8()?;
            let external_addr = Ipv4Addr::from(r.u32()?);
            let external_port = r.u16()?;
            let port_count = r.u16()?;
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(r.take(12)?);
            let created_ms = r.u64()?;
            let expires_ms = r.u64()?;
            let client_port = r.u16()?;
            let flags = r.u8()?;
            let (natpmp, firewall) = (flags & 1 != 0, flags & 2 != 0);
            let extra = match r.u8()? {
                0 => None,
                _ => {
                    let manager = match r.u8()? {
                        0 => None,
                        _ => Some(r.ip()?),
                    };
                    let prefer_failure = r.u8()? != 0;
                    let n = r.u8()?;
                    let mut filters = Vec::with_capacity(usize::from(n));
                    for _ in 0..n {
                        filters.push(Filter {
                            prefix_len: r.u8()?,
                            remote_port: r.u16()?,
                            remote_addr: r.ip()?,
                        });
                    }
                    let dlen = usize::from(r.u16()?);
                    let d = r.take(dlen)?;
                    let description = if dlen == 0 {
                        None
                    } else {
                        Some(String::from_utf8(d.to_vec()).ok()?)
                    };
                    Some(Box::new(MappingExtra {
                        filters,
                        description,
                        manager,
                        prefer_failure,
                    }))
                }
            };
            Record::Mapping(Mapping {
                id: MappingId {
                    shard: 0,
                    slot: 0,
                    generation: 0,
                },
                kind,
                internal_addr,
                internal_port,
                protocol,
                external_addr,
                external_port,
                firewall,
                port_count,
                nonce: Nonce(nonce),
                created_ms,
                expires_ms,
                durable_ms: expires_ms,
                client_port,
                natpmp,
                extra,
            })
        }
        TAG_GONE => {
            let internal = InternalEndpoint {
                addr: r.ip()?,
                protocol: r.u8()?,
                port: r.u16()?,
            };
            let remote = match r.u8()? {
                0 => None,
                _ => Some(RemoteEndpoint {
                    addr: r.ip()?,
                    port: r.u16()?,
                }),
            };
            Record::Gone(MappingKey { internal, remote })
        }
        _ => return None,
    };
    // Trailing bytes mean a record we do not understand.
    r.b.is_empty().then_some(rec)
}
