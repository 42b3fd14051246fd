//! NAT event log: one JSON line per event, with RFC 8158 (IPFIX NAT
//! logging) event numbers and field names. Lines are buffered per shard
//! and written once per batch. A write the disk refuses (full) is cut off
//! again, so the file never holds a torn line; the lost lines are counted
//! in the log once per interval.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcp_engine::{DeleteReason, Event, Mapping, Millis};
use serde_json::{json, Value};

/// RFC 8158 natEvent values used here.
mod nat_event {
    pub(super) const ADDRESSES_EXHAUSTED: u8 = 3;
    pub(super) const NAT44_BIB_CREATE: u8 = 8;
    pub(super) const NAT44_BIB_DELETE: u8 = 9;
    pub(super) const NAT64_BIB_CREATE: u8 = 10;
    pub(super) const NAT64_BIB_DELETE: u8 = 11;
    pub(super) const QUOTA_EXCEEDED: u8 = 13;
    pub(super) const PORT_BLOCK_ALLOCATION: u8 = 16;
    pub(super) const PORT_BLOCK_DEALLOCATION: u8 = 17;
}

/// Where the lines go.
enum Sink {
    Stdout,
    /// An append-only file and its length in whole lines.
    File {
        file: File,
        len: u64,
        lost: u64,
        last_complaint: Option<Instant>,
    },
}

impl Sink {
    fn write(&mut self, buf: &[u8]) {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                if let Err(e) = out.write_all(buf).and_then(|_| out.flush()) {
                    tracing::error!("NAT event log: {e}");
                }
            }
            Sink::File {
                file,
                len,
                lost,
                last_complaint,
            } => match file.write_all(buf) {
                Ok(()) => *len += buf.len() as u64,
                Err(e) => {
                    // Cut a partial write off: no torn line.
                    let _ = file.set_len(*len);
                    *lost += buf.iter().filter(|b| **b == b'\n').count() as u64;
                    if last_complaint.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        *last_complaint = Some(Instant::now());
                        tracing::error!("NAT event log: {e}; {lost} lines lost so far");
                    }
                }
            },
        }
    }
}

/// A shard's handle on the shared log sink.
pub struct NatLog {
    sink: Arc<Mutex<Sink>>,
    buf: Vec<u8>,
}

impl Clone for NatLog {
    fn clone(&self) -> Self {
        NatLog {
            sink: self.sink.clone(),
            buf: Vec::new(),
        }
    }
}

impl NatLog {
    fn new(sink: Sink) -> Self {
        NatLog {
            sink: Arc::new(Mutex::new(sink)),
            buf: Vec::new(),
        }
    }

    /// A log on standard output.
    pub fn stdout() -> Self {
        Self::new(Sink::Stdout)
    }

    /// A log appended to the file at `path`.
    pub fn file(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(Self::new(Sink::File {
            file,
            len,
            lost: 0,
            last_complaint: None,
        }))
    }

    /// Buffers the line for one engine event.
    pub fn record(&mut self, now: Millis, event: &Event) {
        let Some(line) = to_json(now, event) else {
            return;
        };
        if serde_json::to_writer(&mut self.buf, &line).is_ok() {
            self.buf.push(b'\n');
        }
    }

    /// Writes buffered lines.
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        self.sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(&self.buf);
        self.buf.clear();
    }
}

fn bib(m: &Mapping, create: bool) -> u8 {
    match (m.internal_addr, create) {
        (IpAddr::V4(_), true) => nat_event::NAT44_BIB_CREATE,
        (IpAddr::V4(_), false) => nat_event::NAT44_BIB_DELETE,
        (IpAddr::V6(_), true) => nat_event::NAT64_BIB_CREATE,
        (IpAddr::V6(_), false) => nat_event::NAT64_BIB_DELETE,
    }
}

fn mapping_fields(m: &Mapping) -> Value {
    json!({
        "sourceAddress": m.internal_addr,
        "sourceTransportPort": m.internal_port,
        "protocolIdentifier": m.protocol,
        "postNATSourceIPv4Address": m.external_addr,
        "postNAPTSourceTransportPort": m.external_port,
        "portRangeStart": m.external_port,
        "portRangeEnd": u32::from(m.external_port) + u32::from(m.port_count) - 1,
        "kind": m.kind,
    })
}

/// A firewall pinhole opened or closed: not a NAT event (RFC 8158 has
/// none for a firewall), logged with the same field names and no
/// `natEvent`, so "who could be reached on this address and port" is
/// answered from the same log.
fn pinhole_json(now: Millis, event: &Event) -> Option<Value> {
    let (m, name, reason) = match event {
        Event::MappingCreated(m) if m.firewall => (m, "pinhole_open", None),
        Event::MappingDeleted { mapping, reason } if mapping.firewall => {
            (mapping, "pinhole_close", Some(reason))
        }
        _ => return None,
    };
    let mut f = json!({
        "sourceAddress": m.internal_addr,
        "sourceTransportPort": m.internal_port,
        "protocolIdentifier": m.protocol,
        "portRangeStart": m.internal_port,
        "portRangeEnd": u32::from(m.internal_port) + u32::from(m.port_count) - 1,
        "kind": m.kind,
        "timeStamp": now,
        "event": name,
    });
    if let Some(r) = reason {
        f["reason"] = json!(r);
    }
    Some(f)
}

fn to_json(now: Millis, event: &Event) -> Option<Value> {
    if let Some(v) = pinhole_json(now, event) {
        return Some(v);
    }
    let (code, name, mut fields) = match event {
        Event::MappingCreated(m) => (bib(m, true), "mapping_create", mapping_fields(m)),
        Event::MappingDeleted { mapping, reason } => {
            let mut f = mapping_fields(mapping);
            f["reason"] = json!(reason);
            (bib(mapping, false), "mapping_delete", f)
        }
        Event::MappingMoved { old, new } => {
            let mut f = mapping_fields(new);
            f["previousPostNATSourceIPv4Address"] = json!(old.external_addr);
            f["previousPostNAPTSourceTransportPort"] = json!(old.external_port);
            f["reason"] = json!(DeleteReason::Drained);
            (bib(new, true), "mapping_move", f)
        }
        Event::BlockAllocated { subscriber, block }
        | Event::BlockReleased {
            subscriber, block, ..
        } => {
            let alloc = matches!(event, Event::BlockAllocated { .. });
            (
                if alloc {
                    nat_event::PORT_BLOCK_ALLOCATION
                } else {
                    nat_event::PORT_BLOCK_DEALLOCATION
                },
                if alloc {
                    "port_block_allocation"
                } else {
                    "port_block_deallocation"
                },
                json!({
                    "sourceAddress": subscriber,
                    "postNATSourceIPv4Address": block.addr,
                    "portRangeStart": block.first,
                    "portRangeEnd": block.last(),
                }),
            )
        }
        Event::QuotaExceeded { subscriber } => (
            nat_event::QUOTA_EXCEEDED,
            "quota_exceeded",
            // natQuotaExceededEvent 3: maximum entries per user.
            json!({ "sourceAddress": subscriber, "natQuotaExceededEvent": 3 }),
        ),
        Event::PoolExhausted { pool } => (
            nat_event::ADDRESSES_EXHAUSTED,
            "addresses_exhausted",
            json!({ "natPoolName": pool }),
        ),
        // Renewals change lifetimes only; RFC 8158 has no event for them.
        Event::MappingRenewed(_) => return None,
    };
    fields["timeStamp"] = json!(now);
    fields["natEvent"] = json!(code);
    fields["event"] = json!(name);
    Some(fields)
}
