//! One NAT log record: an engine event as RFC 8158 names its fields. Made
//! on a sink's thread, one per logged event; the file sink writes it
//! straight as a JSON line (no intermediate JSON tree: building one per
//! event was most of the log's cost under a flood of creates).

use std::net::{IpAddr, Ipv4Addr};

use pcp_engine::{DeleteReason, Event, Mapping, MappingKind, Millis};

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

/// The fields of one record; those a record lacks are left out of its
/// line. Their names are RFC 8158's, written in the order of the names
/// (the order the log has always had) by [`Record::write_json`].
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Record {
    /// What happened (`mapping_create`, `pinhole_open`, ...).
    pub(super) event: &'static str,
    pub(super) kind: Option<MappingKind>,
    /// RFC 8158's natEvent (none for a firewall pinhole).
    pub(super) nat_event: Option<u8>,
    pub(super) pool: Option<String>,
    pub(super) quota_exceeded: Option<u32>,
    pub(super) port_last: Option<u32>,
    pub(super) port_first: Option<u16>,
    pub(super) post_port: Option<u16>,
    pub(super) post_addr: Option<Ipv4Addr>,
    pub(super) previous_port: Option<u16>,
    pub(super) previous_addr: Option<Ipv4Addr>,
    pub(super) protocol: Option<u8>,
    pub(super) reason: Option<DeleteReason>,
    pub(super) source: Option<IpAddr>,
    pub(super) source_port: Option<u16>,
    pub(super) time: Millis,
}

fn bib(m: &Mapping, create: bool) -> u8 {
    match (m.internal_addr, create) {
        (IpAddr::V4(_), true) => nat_event::NAT44_BIB_CREATE,
        (IpAddr::V4(_), false) => nat_event::NAT44_BIB_DELETE,
        (IpAddr::V6(_), true) => nat_event::NAT64_BIB_CREATE,
        (IpAddr::V6(_), false) => nat_event::NAT64_BIB_DELETE,
    }
}

/// A mapping's fields: internal endpoint, external endpoint and range.
fn mapping(time: Millis, event: &'static str, m: &Mapping) -> Record {
    Record {
        event,
        time,
        source: Some(m.internal_addr),
        source_port: Some(m.internal_port),
        protocol: Some(m.protocol),
        post_addr: Some(m.external_addr),
        post_port: Some(m.external_port),
        port_first: Some(m.external_port),
        port_last: Some(u32::from(m.external_port) + u32::from(m.port_count) - 1),
        kind: Some(m.kind),
        ..Record::default()
    }
}

/// A firewall pinhole opened or closed: not a NAT event (RFC 8158 has
/// none for a firewall), logged with the same field names and no
/// `natEvent`, so "who could be reached on this address and port" is
/// answered from the same log.
fn pinhole(time: Millis, event: &Event) -> Option<Record> {
    let (m, name, reason) = match event {
        Event::MappingCreated(m) if m.firewall => (m, "pinhole_open", None),
        Event::MappingDeleted { mapping, reason } if mapping.firewall => {
            (mapping, "pinhole_close", Some(*reason))
        }
        _ => return None,
    };
    // A pinhole translates nothing: its range is the internal ports.
    Some(Record {
        post_addr: None,
        post_port: None,
        port_first: Some(m.internal_port),
        port_last: Some(u32::from(m.internal_port) + u32::from(m.port_count) - 1),
        reason,
        ..mapping(time, name, m)
    })
}

impl Record {
    /// The record of an event; `None` for events RFC 8158 does not log
    /// (renewals change lifetimes only).
    pub(super) fn of(time: Millis, event: &Event) -> Option<Record> {
        if let Some(r) = pinhole(time, event) {
            return Some(r);
        }
        let r = match event {
            Event::MappingCreated(m) => Record {
                nat_event: Some(bib(m, true)),
                ..mapping(time, "mapping_create", m)
            },
            Event::MappingDeleted { mapping: m, reason } => Record {
                nat_event: Some(bib(m, false)),
                reason: Some(*reason),
                ..mapping(time, "mapping_delete", m)
            },
            Event::MappingMoved { old, new } => Record {
                nat_event: Some(bib(new, true)),
                previous_addr: Some(old.external_addr),
                previous_port: Some(old.external_port),
                reason: Some(DeleteReason::Drained),
                ..mapping(time, "mapping_move", new)
            },
            Event::BlockAllocated { subscriber, block }
            | Event::BlockReleased {
                subscriber, block, ..
            } => {
                let (code, name) = if matches!(event, Event::BlockAllocated { .. }) {
                    (nat_event::PORT_BLOCK_ALLOCATION, "port_block_allocation")
                } else {
                    (
                        nat_event::PORT_BLOCK_DEALLOCATION,
                        "port_block_deallocation",
                    )
                };
                Record {
                    event: name,
                    time,
                    nat_event: Some(code),
                    source: Some(*subscriber),
                    post_addr: Some(block.addr),
                    port_first: Some(block.first),
                    port_last: Some(u32::from(block.last())),
                    ..Record::default()
                }
            }
            Event::QuotaExceeded { subscriber } => Record {
                event: "quota_exceeded",
                time,
                nat_event: Some(nat_event::QUOTA_EXCEEDED),
                source: Some(*subscriber),
                // natQuotaExceededEvent 3: maximum entries per user.
                quota_exceeded: Some(3),
                ..Record::default()
            },
            Event::PoolExhausted { pool } => Record {
                event: "addresses_exhausted",
                time,
                nat_event: Some(nat_event::ADDRESSES_EXHAUSTED),
                pool: Some(pool.clone()),
                ..Record::default()
            },
            Event::MappingRenewed(_) | Event::MappingRefreshed(_) => return None,
        };
        Some(r)
    }

    /// The record as one line of JSON, its fields in the order of their
    /// names. Written field by field: the names are plain ASCII, and
    /// escaping them byte by byte was a fifth of the log's time under a
    /// flood of creates; values go through serde_json.
    pub(super) fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        fn field<T: serde::Serialize + ?Sized>(
            out: &mut Vec<u8>,
            first: &mut bool,
            name: &str,
            value: Option<&T>,
        ) -> serde_json::Result<()> {
            let Some(value) = value else {
                return Ok(());
            };
            out.extend_from_slice(if *first { b"{\"" } else { b",\"" });
            *first = false;
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            serde_json::to_writer(&mut *out, value)
        }
        let first = &mut true;
        macro_rules! put {
            ($name:literal, $value:expr) => {
                field(out, first, $name, $value)?
            };
        }
        put!("event", Some(self.event));
        put!("kind", self.kind.as_ref());
        put!("natEvent", self.nat_event.as_ref());
        put!("natPoolName", self.pool.as_ref());
        put!("natQuotaExceededEvent", self.quota_exceeded.as_ref());
        put!("portRangeEnd", self.port_last.as_ref());
        put!("portRangeStart", self.port_first.as_ref());
        put!("postNAPTSourceTransportPort", self.post_port.as_ref());
        put!("postNATSourceIPv4Address", self.post_addr.as_ref());
        put!(
            "previousPostNAPTSourceTransportPort",
            self.previous_port.as_ref()
        );
        put!(
            "previousPostNATSourceIPv4Address",
            self.previous_addr.as_ref()
        );
        put!("protocolIdentifier", self.protocol.as_ref());
        put!("reason", self.reason.as_ref());
        put!("sourceAddress", self.source.as_ref());
        put!("sourceTransportPort", self.source_port.as_ref());
        put!("timeStamp", Some(&self.time));
        out.push(b'}');
        Ok(())
    }

    /// The record as a JSON object (the syslog sink writes its fields by
    /// name as structured data): its line, read back.
    pub(super) fn to_value(&self) -> serde_json::Value {
        let mut line = Vec::new();
        self.write_json(&mut line)
            .ok()
            .and_then(|()| serde_json::from_slice(&line).ok())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcp_engine::{Block, MappingId};

    fn map(firewall: bool) -> Mapping {
        Mapping {
            id: MappingId {
                shard: 0,
                slot: 1,
                generation: 2,
            },
            kind: MappingKind::Map,
            internal_addr: "100.64.0.2".parse().unwrap(),
            internal_port: 8080,
            protocol: 6,
            external_addr: Ipv4Addr::new(192, 0, 2, 1),
            external_port: 40000,
            firewall,
            port_count: 2,
            nonce: Default::default(),
            created_ms: 0,
            expires_ms: 1,
            durable_ms: 1,
            client_port: 5350,
            natpmp: false,
            extra: None,
        }
    }

    #[test]
    fn records_write_their_fields_in_name_order_with_rfc_8158_names() {
        let block = Block {
            addr: Ipv4Addr::new(192, 0, 2, 1),
            first: 1024,
            len: 512,
        };
        let sub: IpAddr = "100.64.0.2".parse().unwrap();
        let moved = Mapping {
            external_port: 40100,
            ..map(false)
        };
        let events = [
            Event::MappingCreated(map(false)),
            Event::MappingDeleted {
                mapping: map(false),
                reason: DeleteReason::Expired,
            },
            Event::MappingMoved {
                old: map(false),
                new: moved,
            },
            Event::MappingCreated(map(true)),
            Event::BlockAllocated {
                subscriber: sub,
                block,
            },
            Event::BlockReleased {
                subscriber: sub,
                block,
                since: 0,
            },
            Event::QuotaExceeded { subscriber: sub },
            Event::PoolExhausted {
                pool: "default".into(),
            },
        ];
        for e in &events {
            let r = Record::of(7, e).unwrap();
            // The JSON tree orders keys by name: the record's own line
            // must be the very same text.
            let mut line = Vec::new();
            r.write_json(&mut line).unwrap();
            let text = String::from_utf8(line).unwrap();
            assert_eq!(text, r.to_value().to_string(), "{e:?}");
            assert!(text.contains(r#""timeStamp":7"#), "{text}");
        }
        // The line, byte for byte, as the log has always written it.
        let mut line = Vec::new();
        let deleted = Record::of(7, &events[1]).unwrap();
        deleted.write_json(&mut line).unwrap();
        assert_eq!(
            String::from_utf8(line).unwrap(),
            r#"{"event":"mapping_delete","kind":{"type":"map"},"natEvent":9,"portRangeEnd":40001,"portRangeStart":40000,"postNAPTSourceTransportPort":40000,"postNATSourceIPv4Address":"192.0.2.1","protocolIdentifier":6,"reason":"expired","sourceAddress":"100.64.0.2","sourceTransportPort":8080,"timeStamp":7}"#
        );
        let created = Record::of(7, &events[0]).unwrap().to_value();
        assert_eq!(created["natEvent"], 8);
        assert_eq!(created["event"], "mapping_create");
        assert_eq!(created["postNAPTSourceTransportPort"], 40000);
        assert_eq!(created["portRangeEnd"], 40001);
        let moved = Record::of(7, &events[2]).unwrap().to_value();
        assert_eq!(moved["previousPostNAPTSourceTransportPort"], 40000);
        assert_eq!(moved["postNAPTSourceTransportPort"], 40100);
        assert_eq!(moved["reason"], "drained");
        let pinhole = Record::of(7, &events[3]).unwrap().to_value();
        assert_eq!(pinhole["event"], "pinhole_open");
        assert!(pinhole.get("natEvent").is_none());
        assert!(pinhole.get("postNATSourceIPv4Address").is_none());
        assert!(pinhole.get("postNAPTSourceTransportPort").is_none());
        let block = Record::of(7, &events[4]).unwrap().to_value();
        assert_eq!(block["natEvent"], 16);
        assert_eq!(block["portRangeEnd"], 1535);
        assert_eq!(
            Record::of(7, &events[6]).unwrap().to_value()["natQuotaExceededEvent"],
            3
        );
        assert!(Record::of(7, &Event::MappingRenewed(map(false))).is_none());
    }
}
