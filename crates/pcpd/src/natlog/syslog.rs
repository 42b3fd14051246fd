//! The syslog sink: RFC 5424 messages whose structured data carries the
//! RFC 8158 fields, over UDP (RFC 5426), TCP with octet counting (RFC
//! 6587 §3.4.1) or TLS (RFC 5425, through rustls).
//!
//! ```text
//! <134>1 2026-12-02T04:05:18.044Z cgn1 pcpd - mapping_create [nat@32473 natEvent="8" sourceAddress="100.64.0.2" ...] {JSON}
//! ```

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Writer;

/// Transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// RFC 5426: one message per datagram.
    Udp,
    /// RFC 6587 octet counting.
    Tcp,
    /// RFC 5425: TLS, octet counting.
    Tls,
}

/// `type: syslog` in `log.nat_sinks`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogSinkConfig {
    /// udp, tcp or tls.
    pub transport: Transport,
    /// The collector, `host:port`.
    pub address: String,
    /// TLS: the collector's name in its certificate (default: the host of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// TLS: PEM CA certificate(s) to trust.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Facility number (RFC 5424 §6.2.1; default 16, local0).
    #[serde(default = "default_facility")]
    pub facility: u8,
    /// APP-NAME.
    #[serde(default = "default_app")]
    pub app_name: String,
    /// HOSTNAME (default: the machine's).
    #[serde(default)]
    pub hostname: Option<String>,
    /// SD-ID of the structured data element (an IANA private enterprise
    /// number should follow the `@`; 32473 is the documentation one).
    #[serde(default = "default_sd_id")]
    pub sd_id: String,
    /// Events queued for this sink before new ones are dropped.
    #[serde(default = "super::default_queue")]
    pub queue: usize,
}

fn default_facility() -> u8 {
    16
}
fn default_app() -> String {
    "pcpd".into()
}
fn default_sd_id() -> String {
    "nat@32473".into()
}

enum Conn {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

pub(super) struct SyslogWriter {
    cfg: SyslogSinkConfig,
    hostname: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    conn: Option<Conn>,
    next_try: Instant,
    complained: std::sync::Mutex<Option<Instant>>,
}

fn tls_config(cfg: &SyslogSinkConfig) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let ca = cfg
        .ca
        .clone()
        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
    let certs = CertificateDer::pem_file_iter(&ca)
        .map_err(|e| io::Error::other(format!("{}: {e}", ca.display())))?;
    for c in certs.flatten() {
        let _ = roots.add(c);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl SyslogWriter {
    pub(super) fn new(cfg: &SyslogSinkConfig) -> io::Result<Self> {
        let hostname = match &cfg.hostname {
            Some(h) => h.clone(),
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "-".into()),
        };
        let tls = match cfg.transport {
            Transport::Tls => Some(tls_config(cfg)?),
            _ => None,
        };
        Ok(SyslogWriter {
            cfg: cfg.clone(),
            hostname,
            tls,
            conn: None,
            next_try: Instant::now(),
            complained: std::sync::Mutex::new(None),
        })
    }

    fn connect(&self) -> io::Result<Conn> {
        let addr = super::resolve(&self.cfg.address)?;
        match self.cfg.transport {
            Transport::Udp => Ok(Conn::Udp(super::udp_for(addr)?, addr)),
            Transport::Tcp => Ok(Conn::Tcp(super::tcp_to(addr)?)),
            Transport::Tls => {
                let host = self.cfg.server_name.clone().unwrap_or_else(|| {
                    self.cfg
                        .address
                        .rsplit_once(':')
                        .map_or(self.cfg.address.clone(), |(h, _)| {
                            h.trim_matches(['[', ']']).to_string()
                        })
                });
                let name =
                    rustls::pki_types::ServerName::try_from(host).map_err(io::Error::other)?;
                let config = self
                    .tls
                    .clone()
                    .ok_or_else(|| io::Error::other("no TLS config"))?;
                let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
                let mut tls = rustls::StreamOwned::new(conn, super::tcp_to(addr)?);
                while tls.conn.is_handshaking() {
                    tls.conn.complete_io(&mut tls.sock)?;
                }
                Ok(Conn::Tls(Box::new(tls)))
            }
        }
    }

    fn send(conn: &mut Conn, msg: &[u8]) -> io::Result<()> {
        match conn {
            Conn::Udp(s, to) => s.send_to(msg, *to).map(|_| ()),
            Conn::Tcp(s) => {
                s.write_all(format!("{} ", msg.len()).as_bytes())?;
                s.write_all(msg)
            }
            Conn::Tls(s) => {
                s.write_all(format!("{} ", msg.len()).as_bytes())?;
                s.write_all(msg)?;
                s.flush()
            }
        }
    }
}

/// RFC 5424 §6.3.3: `"`, `\` and `]` are escaped in PARAM-VALUE.
fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The RFC 5424 message of one event.
pub(super) fn message(event: &Value, facility: u8, host: &str, app: &str, sd_id: &str) -> String {
    const INFO: u8 = 6;
    let pri = u16::from(facility.min(23)) * 8 + u16::from(INFO);
    let ms = event["timeStamp"].as_u64().unwrap_or(0);
    let ts = crate::rfc3339::format_ms(ms).unwrap_or_else(|| "-".into());
    let msgid = event["event"].as_str().unwrap_or("-");
    let mut sd = format!("[{sd_id}");
    if let Some(fields) = event.as_object() {
        for (k, v) in fields {
            if k == "event" {
                continue;
            }
            // PARAM-NAME is at most 32 characters (§6.3.3).
            let name = if k.len() > 32 {
                k.replacen("previous", "prev", 1)
            } else {
                k.clone()
            };
            sd.push(' ');
            sd.push_str(&name);
            sd.push_str("=\"");
            match v {
                Value::String(s) => escape(s, &mut sd),
                other => escape(&other.to_string(), &mut sd),
            }
            sd.push('"');
        }
    }
    sd.push(']');
    format!("<{pri}>1 {ts} {host} {app} - {msgid} {sd} {event}")
}

impl Writer for SyslogWriter {
    fn write(&mut self, events: &[super::Record]) -> u64 {
        let mut lost = 0;
        for e in events.iter().map(super::Record::to_value) {
            if self.conn.is_none() && Instant::now() >= self.next_try {
                match self.connect() {
                    Ok(c) => self.conn = Some(c),
                    Err(err) => {
                        self.next_try = Instant::now() + Duration::from_secs(1);
                        let addr = self.cfg.address.clone();
                        super::complain(&self.complained, || {
                            tracing::error!("NAT log syslog {addr}: {err}");
                        });
                    }
                }
            }
            let msg = message(
                &e,
                self.cfg.facility,
                &self.hostname,
                &self.cfg.app_name,
                &self.cfg.sd_id,
            );
            let sent = match self.conn.as_mut() {
                Some(c) => Self::send(c, msg.as_bytes()),
                None => Err(io::Error::other("not connected")),
            };
            if let Err(err) = sent {
                if self.conn.take().is_some() {
                    let addr = self.cfg.address.clone();
                    super::complain(&self.complained, || {
                        tracing::error!("NAT log syslog {addr}: {err}; reconnecting");
                    });
                }
                lost += 1;
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_message_is_rfc5424_with_escaped_structured_data() {
        let e = json!({"timeStamp": 1_796_184_318_044u64, "natEvent": 8, "event": "mapping_create",
                       "sourceAddress": "100.64.0.2", "kind": {"type": "map"},
                       "previousPostNAPTSourceTransportPort": 5, "natPoolName": "a\"b]"});
        let m = message(&e, 16, "cgn1", "pcpd", "nat@32473");
        assert!(
            m.starts_with("<134>1 2026-12-02T04:05:18.044Z cgn1 pcpd - mapping_create [nat@32473 "),
            "{m}"
        );
        assert!(m.contains(r#"natEvent="8""#), "{m}");
        assert!(m.contains(r#"kind="{\"type\":\"map\"}""#), "{m}");
        assert!(m.contains(r#"natPoolName="a\"b\]""#), "{m}");
        assert!(m.contains(r#" prevPostNAPTSourceTransportPort="5""#), "{m}");
        assert!(m.ends_with(&e.to_string()), "{m}");
    }
}
