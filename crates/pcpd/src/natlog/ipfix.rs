//! The IPFIX sink (RFC 7011) with RFC 8158 templates: NAT44/NAT64 mapping
//! create and delete, port-block allocation and release, quota exceeded,
//! addresses exhausted. Over UDP the templates are re-sent every
//! `template_refresh_secs` (RFC 7011 §10.3.6); over TCP once per
//! connection. Pinhole events (firewall classes) have no RFC 8158 event and
//! are not exported here (the file and syslog sinks carry them).

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::Record;

use super::Writer;

/// Transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// RFC 7011 §10.3.
    Udp,
    /// RFC 7011 §10.4.
    Tcp,
}

/// `type: ipfix` in `log.nat_sinks`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IpfixSinkConfig {
    /// udp or tcp.
    pub transport: Transport,
    /// The collector, `host:port` (IANA: 4739).
    pub collector: String,
    /// Observation Domain ID.
    #[serde(default = "default_domain")]
    pub observation_domain: u32,
    /// UDP: seconds between template re-sends.
    #[serde(default = "default_refresh")]
    pub template_refresh_secs: u64,
    /// Events queued for this sink before new ones are dropped.
    #[serde(default = "super::default_queue")]
    pub queue: usize,
}

fn default_domain() -> u32 {
    1
}
fn default_refresh() -> u64 {
    60
}

/// Information elements (IANA IPFIX registry) and their lengths.
mod ie {
    pub(super) const PROTOCOL: (u16, u16) = (4, 1);
    pub(super) const SRC_PORT: (u16, u16) = (7, 2);
    pub(super) const SRC_V4: (u16, u16) = (8, 4);
    pub(super) const SRC_V6: (u16, u16) = (27, 16);
    pub(super) const POST_NAT_SRC_V4: (u16, u16) = (225, 4);
    pub(super) const POST_NAPT_SRC_PORT: (u16, u16) = (227, 2);
    pub(super) const NAT_EVENT: (u16, u16) = (230, 1);
    pub(super) const OBSERVATION_TIME_MS: (u16, u16) = (323, 8);
    pub(super) const PORT_RANGE_START: (u16, u16) = (361, 2);
    pub(super) const PORT_RANGE_END: (u16, u16) = (362, 2);
    pub(super) const PORT_RANGE_STEP: (u16, u16) = (363, 2);
    pub(super) const PORT_RANGE_PORTS: (u16, u16) = (364, 2);
    pub(super) const QUOTA_EVENT: (u16, u16) = (466, 4);
}

/// The templates, by id: (id, fields).
fn templates() -> Vec<(u16, Vec<(u16, u16)>)> {
    use ie::*;
    let mapping = |src| {
        vec![
            OBSERVATION_TIME_MS,
            NAT_EVENT,
            src,
            POST_NAT_SRC_V4,
            PROTOCOL,
            SRC_PORT,
            POST_NAPT_SRC_PORT,
        ]
    };
    let block = |src| {
        vec![
            OBSERVATION_TIME_MS,
            NAT_EVENT,
            src,
            POST_NAT_SRC_V4,
            PORT_RANGE_START,
            PORT_RANGE_END,
            PORT_RANGE_STEP,
            PORT_RANGE_PORTS,
        ]
    };
    vec![
        (256, mapping(SRC_V4)),
        (257, mapping(SRC_V6)),
        (258, block(SRC_V4)),
        (259, block(SRC_V6)),
        (
            260,
            vec![OBSERVATION_TIME_MS, NAT_EVENT, QUOTA_EVENT, SRC_V4],
        ),
        (
            261,
            vec![OBSERVATION_TIME_MS, NAT_EVENT, QUOTA_EVENT, SRC_V6],
        ),
        (262, vec![OBSERVATION_TIME_MS, NAT_EVENT]),
    ]
}

/// The template id and data record of one event, if RFC 8158 has it.
pub(super) fn record(e: &Record) -> Option<(u16, Vec<u8>)> {
    let event = e.nat_event?;
    let mut r = Vec::with_capacity(40);
    r.extend_from_slice(&e.time.to_be_bytes());
    r.push(event);
    let src = e.source.map(|a| a.to_canonical());
    let v6 = matches!(src, Some(IpAddr::V6(_)));
    let push_src = |r: &mut Vec<u8>| match src {
        Some(IpAddr::V4(a)) => r.extend_from_slice(&a.octets()),
        Some(IpAddr::V6(a)) => r.extend_from_slice(&a.octets()),
        None => r.extend_from_slice(&[0; 4]),
    };
    let post = e
        .post_addr
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)
        .octets();
    let id = match event {
        8..=11 => {
            push_src(&mut r);
            r.extend_from_slice(&post);
            r.push(e.protocol.unwrap_or(0));
            r.extend_from_slice(&e.source_port.unwrap_or(0).to_be_bytes());
            r.extend_from_slice(&e.post_port.unwrap_or(0).to_be_bytes());
            if v6 {
                257
            } else {
                256
            }
        }
        16 | 17 => {
            push_src(&mut r);
            r.extend_from_slice(&post);
            let start = e.port_first.unwrap_or(0);
            let end = e.port_last.and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
            r.extend_from_slice(&start.to_be_bytes());
            r.extend_from_slice(&end.to_be_bytes());
            r.extend_from_slice(&1u16.to_be_bytes());
            r.extend_from_slice(&(end.wrapping_sub(start).wrapping_add(1)).to_be_bytes());
            if v6 {
                259
            } else {
                258
            }
        }
        13 => {
            r.extend_from_slice(&e.quota_exceeded.unwrap_or(0).to_be_bytes());
            push_src(&mut r);
            if v6 {
                261
            } else {
                260
            }
        }
        3 => 262,
        _ => return None,
    };
    Some((id, r))
}

/// An IPFIX message: header (RFC 7011 §3.1) and sets.
fn message(domain: u32, sequence: u32, export_secs: u32, sets: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + sets.len());
    m.extend_from_slice(&10u16.to_be_bytes());
    m.extend_from_slice(&((16 + sets.len()) as u16).to_be_bytes());
    m.extend_from_slice(&export_secs.to_be_bytes());
    m.extend_from_slice(&sequence.to_be_bytes());
    m.extend_from_slice(&domain.to_be_bytes());
    m.extend_from_slice(sets);
    m
}

/// The template set (set id 2) with every template.
fn template_set() -> Vec<u8> {
    let mut body = Vec::new();
    for (id, fields) in templates() {
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        for (ie, len) in fields {
            body.extend_from_slice(&ie.to_be_bytes());
            body.extend_from_slice(&len.to_be_bytes());
        }
    }
    let mut set = Vec::with_capacity(4 + body.len());
    set.extend_from_slice(&2u16.to_be_bytes());
    set.extend_from_slice(&((4 + body.len()) as u16).to_be_bytes());
    set.extend_from_slice(&body);
    set
}

enum Conn {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream),
}

pub(super) struct IpfixWriter {
    cfg: IpfixSinkConfig,
    conn: Option<Conn>,
    /// Data records sent (RFC 7011 §3.1 Sequence Number).
    sequence: u32,
    templates_sent: Option<Instant>,
    next_try: Instant,
    complained: std::sync::Mutex<Option<Instant>>,
}

fn export_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

impl IpfixWriter {
    pub(super) fn new(cfg: &IpfixSinkConfig) -> io::Result<Self> {
        Ok(IpfixWriter {
            cfg: cfg.clone(),
            conn: None,
            sequence: 0,
            templates_sent: None,
            next_try: Instant::now(),
            complained: std::sync::Mutex::new(None),
        })
    }

    fn connect(&self) -> io::Result<Conn> {
        let addr = super::resolve(&self.cfg.collector)?;
        match self.cfg.transport {
            Transport::Udp => Ok(Conn::Udp(super::udp_for(addr)?, addr)),
            Transport::Tcp => Ok(Conn::Tcp(super::tcp_to(addr)?)),
        }
    }

    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        match self.conn.as_mut() {
            Some(Conn::Udp(s, to)) => s.send_to(msg, *to).map(|_| ()),
            Some(Conn::Tcp(s)) => s.write_all(msg),
            None => Err(io::Error::other("not connected")),
        }
    }

    /// Connects if needed and (re-)sends the templates when due.
    fn ready(&mut self) -> io::Result<()> {
        if self.conn.is_none() {
            if Instant::now() < self.next_try {
                return Err(io::Error::other("waiting to reconnect"));
            }
            match self.connect() {
                Ok(c) => {
                    self.conn = Some(c);
                    self.templates_sent = None;
                }
                Err(e) => {
                    self.next_try = Instant::now() + Duration::from_secs(1);
                    return Err(e);
                }
            }
        }
        let refresh = Duration::from_secs(self.cfg.template_refresh_secs.max(1));
        let due = match (&self.conn, self.templates_sent) {
            (_, None) => true,
            (Some(Conn::Udp(..)), Some(t)) => t.elapsed() >= refresh,
            _ => false,
        };
        if due {
            let m = message(
                self.cfg.observation_domain,
                self.sequence,
                export_secs(),
                &template_set(),
            );
            self.send(&m)?;
            self.templates_sent = Some(Instant::now());
        }
        Ok(())
    }

    fn fail(&mut self, e: &io::Error) {
        self.conn = None;
        let c = self.cfg.collector.clone();
        super::complain(&self.complained, || {
            tracing::error!("NAT log IPFIX {c}: {e}")
        });
    }
}

impl Writer for IpfixWriter {
    fn write(&mut self, events: &[Record]) -> u64 {
        if let Err(e) = self.ready() {
            self.fail(&e);
            return events.iter().filter(|e| record(e).is_some()).count() as u64;
        }
        let mut lost = 0;
        // One data set per record, as many per message as fit a datagram.
        let mut sets = Vec::new();
        let mut in_msg = 0u32;
        let flush = |w: &mut Self, sets: &mut Vec<u8>, n: &mut u32| -> u64 {
            if sets.is_empty() {
                return 0;
            }
            let m = message(w.cfg.observation_domain, w.sequence, export_secs(), sets);
            let r = match w.send(&m) {
                Ok(()) => {
                    w.sequence = w.sequence.wrapping_add(*n);
                    0
                }
                Err(e) => {
                    w.fail(&e);
                    u64::from(*n)
                }
            };
            sets.clear();
            *n = 0;
            r
        };
        for e in events {
            let Some((id, rec)) = record(e) else { continue };
            if sets.len() + rec.len() + 4 > 1200 {
                lost += flush(self, &mut sets, &mut in_msg);
            }
            sets.extend_from_slice(&id.to_be_bytes());
            sets.extend_from_slice(&((4 + rec.len()) as u16).to_be_bytes());
            sets.extend_from_slice(&rec);
            in_msg += 1;
        }
        lost += flush(self, &mut sets, &mut in_msg);
        lost
    }

    fn tick(&mut self) {
        if let Err(e) = self.ready() {
            if self.conn.is_some() {
                self.fail(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_follow_their_templates() {
        let lens: std::collections::HashMap<u16, usize> = templates()
            .into_iter()
            .map(|(id, f)| (id, f.iter().map(|(_, l)| usize::from(*l)).sum()))
            .collect();
        let ip = |s: &str| Some(s.parse().unwrap());
        let mapping = |event, source, protocol, port, post_port| Record {
            time: 1,
            nat_event: Some(event),
            source: ip(source),
            post_addr: Some(std::net::Ipv4Addr::new(192, 0, 2, 1)),
            protocol: Some(protocol),
            source_port: Some(port),
            post_port: Some(post_port),
            ..Record::default()
        };
        let events = [
            mapping(8, "100.64.0.2", 6, 8080, 40000),
            mapping(10, "2001:db8::1", 17, 53, 1053),
            Record {
                time: 1,
                nat_event: Some(16),
                source: ip("100.64.0.2"),
                post_addr: Some(std::net::Ipv4Addr::new(192, 0, 2, 1)),
                port_first: Some(1024),
                port_last: Some(1535),
                ..Record::default()
            },
            Record {
                time: 1,
                nat_event: Some(13),
                source: ip("100.64.0.2"),
                quota_exceeded: Some(3),
                ..Record::default()
            },
            Record {
                time: 1,
                nat_event: Some(3),
                pool: Some("default".into()),
                ..Record::default()
            },
        ];
        for e in &events {
            let (id, r) = record(e).unwrap();
            assert_eq!(r.len(), lens[&id], "template {id}: {e:?}");
        }
        let (_, block) = record(&events[2]).unwrap();
        assert_eq!(
            &block[block.len() - 2..],
            &512u16.to_be_bytes(),
            "ports in the block"
        );
        let pinhole = Record {
            event: "pinhole_open",
            ..Record::default()
        };
        assert!(record(&pinhole).is_none());
        let set = template_set();
        assert_eq!(u16::from_be_bytes([set[2], set[3]]) as usize, set.len());
    }

    /// Over UDP the templates go first, then again once
    /// `template_refresh_secs` have passed (RFC 7011 §10.3.6); the
    /// sequence number counts data records only (§3.1).
    #[test]
    fn udp_templates_are_sent_first_and_again_when_due() {
        let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
        collector
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut w = IpfixWriter::new(&IpfixSinkConfig {
            transport: Transport::Udp,
            collector: collector.local_addr().unwrap().to_string(),
            observation_domain: 7,
            template_refresh_secs: 1,
            queue: 16,
        })
        .unwrap();
        let e = Record {
            event: "port_block_allocation",
            time: 1,
            nat_event: Some(16),
            source: Some("100.64.0.2".parse().unwrap()),
            post_addr: Some("192.0.2.1".parse().unwrap()),
            port_first: Some(1024),
            port_last: Some(1535),
            ..Default::default()
        };
        assert_eq!(w.write(&[e.clone(), e.clone()]), 0);
        let mut buf = [0u8; 2048];
        let set_id = |b: &[u8]| u16::from_be_bytes([b[16], b[17]]);
        let seq = |b: &[u8]| u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        let n = collector.recv(&mut buf).unwrap();
        assert_eq!(
            (
                set_id(&buf[..n]),
                u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]])
            ),
            (2, 7)
        );
        let n = collector.recv(&mut buf).unwrap();
        assert_eq!(
            (set_id(&buf[..n]), seq(&buf[..n])),
            (258, 0),
            "data, sequence 0"
        );
        std::thread::sleep(Duration::from_millis(1100));
        w.tick();
        let n = collector.recv(&mut buf).unwrap();
        assert_eq!(
            (set_id(&buf[..n]), seq(&buf[..n])),
            (2, 2),
            "templates again; two records sent"
        );
    }
}
