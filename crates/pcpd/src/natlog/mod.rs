//! NAT event log: RFC 8158 (IPFIX NAT logging) events, with its event
//! numbers and field names, sent to every configured sink (`log.nat_sinks`):
//! JSON lines in a file (rotated by size or age, reopened on SIGHUP),
//! syslog (RFC 5424 over UDP, TCP with RFC 6587 octet counting, or TLS per
//! RFC 5425) and IPFIX (RFC 7011, UDP or TCP).
//!
//! ```text
//!  shard ──record()──▶ buffer ──flush()──▶ try_send ─▶ [queue] ─▶ sink thread ─▶ file / syslog / IPFIX
//!                                              └ full: dropped, pcpd_natlog_dropped_total{sink}
//! ```
//!
//! Each sink has its own bounded queue and thread: a slow or absent
//! collector never blocks a shard; what a full queue cannot take is
//! dropped and counted, and logged once per interval. The shard only
//! copies the events: a batch's events go to each queue as one message,
//! and the sink's thread makes the JSON (off the request path).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcp_engine::{Event, Millis};
use prometheus::IntCounterVec;

mod file;
mod ipfix;
mod record;
mod syslog;

use record::Record;

pub use file::FileSinkConfig;
pub use ipfix::IpfixSinkConfig;
pub use syslog::SyslogSinkConfig;

/// Bumped by SIGHUP: file sinks reopen their file (logrotate's habit).
pub static REOPEN: AtomicU64 = AtomicU64::new(0);

/// One configured sink.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines in a file (`-`: standard output).
    File(FileSinkConfig),
    /// Syslog (RFC 5424).
    Syslog(SyslogSinkConfig),
    /// IPFIX (RFC 7011, RFC 8158 templates).
    Ipfix(IpfixSinkConfig),
}

impl SinkConfig {
    /// The sink's name in metrics and logs.
    pub fn name(&self) -> String {
        match self {
            SinkConfig::File(f) => format!("file:{}", f.path.display()),
            SinkConfig::Syslog(s) => format!("syslog:{}", s.address),
            SinkConfig::Ipfix(i) => format!("ipfix:{}", i.collector),
        }
    }

    fn queue(&self) -> usize {
        match self {
            SinkConfig::File(f) => f.queue,
            SinkConfig::Syslog(s) => s.queue,
            SinkConfig::Ipfix(i) => i.queue,
        }
    }
}

/// What `check-config` says of `log.nat_sinks`, by YAML path.
pub fn validate(sinks: &[SinkConfig], err: &mut impl FnMut(&str, String)) {
    let host_port = |s: &str| {
        s.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
    };
    for (i, sink) in sinks.iter().enumerate() {
        let at = format!("log.nat_sinks[{i}]");
        if sink.queue() == 0 {
            err(&format!("{at}.queue"), "must be at least 1".into());
        }
        match sink {
            SinkConfig::File(f) => {
                if f.keep == 0 {
                    err(&format!("{at}.keep"), "must be at least 1".into());
                }
            }
            SinkConfig::Syslog(s) => {
                if !host_port(&s.address) {
                    err(
                        &format!("{at}.address"),
                        format!("{:?}: give host:port", s.address),
                    );
                }
                if s.facility > 23 {
                    err(&format!("{at}.facility"), "RFC 5424 §6.2.1: 0 to 23".into());
                }
                if let Some(ca) = s.ca.as_ref().filter(|ca| !ca.exists()) {
                    err(
                        &format!("{at}.ca"),
                        format!("{} does not exist", ca.display()),
                    );
                }
                if s.ca.is_some() && s.transport != syslog::Transport::Tls {
                    err(&format!("{at}.ca"), "only for transport: tls".into());
                }
            }
            SinkConfig::Ipfix(x) => {
                if !host_port(&x.collector) {
                    err(
                        &format!("{at}.collector"),
                        format!("{:?}: give host:port", x.collector),
                    );
                }
            }
        }
    }
}

/// How long a collector gets to accept a connection, a write or a read.
const COLLECTOR_TIMEOUT: Duration = Duration::from_secs(2);

/// The first address `host:port` resolves to.
fn resolve(host_port: &str) -> std::io::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host_port}: no address")))
}

/// A UDP socket to send to `to` from (the wildcard of its family).
fn udp_for(to: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let any: std::net::IpAddr = if to.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    std::net::UdpSocket::bind((any, 0))
}

/// A TCP connection to `to`, with [`COLLECTOR_TIMEOUT`] on connect, writes
/// and reads.
fn tcp_to(to: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let s = std::net::TcpStream::connect_timeout(&to, COLLECTOR_TIMEOUT)?;
    s.set_write_timeout(Some(COLLECTOR_TIMEOUT))?;
    s.set_read_timeout(Some(COLLECTOR_TIMEOUT))?;
    Ok(s)
}

/// Default depth of a sink's queue, in events.
pub(crate) fn default_queue() -> usize {
    65_536
}

/// What a sink thread does with the events it is given.
trait Writer: Send {
    /// Writes a batch (in order); returns how many could not be written.
    fn write(&mut self, events: &[Record]) -> u64;
    /// Called about once a second with nothing to write (rotation,
    /// reconnects, template refresh).
    fn tick(&mut self) {}
}

/// Events of one batch, with the wall-clock time they were logged at.
type Events = Arc<Vec<(Millis, Event)>>;

/// What a sink thread is given.
enum Msg {
    Events(Events),
    /// Answer once everything queued before is written (shutdown).
    Flush(SyncSender<()>),
}

/// A shard's handle on the sinks' queues.
struct SinkTx {
    name: String,
    tx: SyncSender<Msg>,
    /// Events queued and not yet taken by the sink's thread, and how many
    /// may be (`queue` in the sink's configuration).
    queued: Arc<AtomicUsize>,
    capacity: usize,
    complained: Mutex<Option<Instant>>,
}

/// A shard's handle on the NAT event log.
pub struct NatLog {
    sinks: Arc<Vec<SinkTx>>,
    dropped: IntCounterVec,
    buf: Vec<(Millis, Event)>,
}

impl Clone for NatLog {
    fn clone(&self) -> Self {
        NatLog {
            sinks: self.sinks.clone(),
            dropped: self.dropped.clone(),
            buf: Vec::new(),
        }
    }
}

/// The dropped-events counter, registered in `registry` if given.
fn dropped_counter(registry: Option<&prometheus::Registry>) -> std::io::Result<IntCounterVec> {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "pcpd_natlog_dropped_total",
            "NAT log events a sink could not take (full queue, unreachable collector, full disk).",
        ),
        &["sink"],
    )
    .map_err(std::io::Error::other)?;
    if let Some(r) = registry {
        r.register(Box::new(c.clone()))
            .map_err(std::io::Error::other)?;
    }
    Ok(c)
}

impl NatLog {
    /// Opens every sink (a file that cannot be opened fails the start)
    /// and starts one thread per sink; counts drops in `registry`.
    pub fn open(
        sinks: &[SinkConfig],
        registry: Option<&prometheus::Registry>,
    ) -> std::io::Result<Self> {
        let dropped = dropped_counter(registry)?;
        let mut handles = Vec::new();
        for cfg in sinks {
            let name = cfg.name();
            let writer: Box<dyn Writer> = match cfg {
                SinkConfig::File(f) => Box::new(file::FileWriter::open(f, name.clone())?),
                SinkConfig::Syslog(s) => Box::new(syslog::SyslogWriter::new(s)?),
                SinkConfig::Ipfix(i) => Box::new(ipfix::IpfixWriter::new(i)?),
            };
            let capacity = cfg.queue().max(1);
            let (tx, rx) = sync_channel(capacity);
            let counter = dropped.with_label_values(&[&name]);
            let queued = Arc::new(AtomicUsize::new(0));
            let taken = queued.clone();
            std::thread::Builder::new()
                .name(format!("natlog {name}"))
                .spawn(move || run(rx, writer, counter, &taken))?;
            handles.push(SinkTx {
                name,
                tx,
                queued,
                capacity,
                complained: Mutex::new(None),
            });
        }
        Ok(NatLog {
            sinks: Arc::new(handles),
            dropped,
            buf: Vec::new(),
        })
    }

    /// A log on standard output only (unit tests).
    #[cfg(test)]
    pub fn stdout() -> std::io::Result<Self> {
        let out = FileSinkConfig::at(std::path::PathBuf::from("-"));
        Self::open(&[SinkConfig::File(out)], None)
    }

    /// Buffers the event, if it is one the log records.
    pub fn record(&mut self, now: Millis, event: &Event) {
        let logged = !matches!(
            event,
            // Renewals change lifetimes only; RFC 8158 has no event for them.
            Event::MappingRenewed(_) | Event::MappingRefreshed(_)
        );
        if logged && !self.sinks.is_empty() {
            self.buf.push((now, event.clone()));
        }
    }

    /// Hands buffered events to every sink's queue, never waiting.
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let events: Events = Arc::new(std::mem::take(&mut self.buf));
        let n = events.len();
        for sink in self.sinks.iter() {
            // The queue's bound counts events, not batches (a batch larger
            // than the bound still goes into an empty queue).
            let before = sink.queued.fetch_add(n, Ordering::AcqRel);
            let full = before > 0 && before + n > sink.capacity;
            if full || sink.tx.try_send(Msg::Events(events.clone())).is_err() {
                sink.queued.fetch_sub(n, Ordering::AcqRel);
                let lost = n as u64;
                self.dropped.with_label_values(&[&sink.name]).inc_by(lost);
                complain(&sink.complained, || {
                    tracing::error!(sink = %sink.name, lost, "NAT log: the sink's queue is full; events dropped (pcpd_natlog_dropped_total)");
                });
            }
        }
    }

    /// Waits (at most `within`) until every sink has written what was
    /// queued before: at shutdown, so the log holds every event of the
    /// requests answered.
    pub fn finish(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for sink in self.sinks.iter() {
            let (tx, rx) = sync_channel(1);
            let mut msg = Msg::Flush(tx);
            loop {
                match sink.tx.try_send(msg) {
                    Ok(()) => break,
                    Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                        msg = m;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                tracing::error!(sink = %sink.name, "NAT log: not all events written before exit");
            }
        }
    }
}

/// Runs `f` at most once every 10 s per sink.
fn complain(last: &Mutex<Option<Instant>>, f: impl FnOnce()) {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
        *last = Some(Instant::now());
        f();
    }
}

/// How long a sink thread lets events gather after writing some.
const GATHER: Duration = Duration::from_millis(5);

/// A sink thread: takes what is queued, writes it in batches.
fn run(
    rx: Receiver<Msg>,
    mut writer: Box<dyn Writer>,
    dropped: prometheus::IntCounter,
    queued: &AtomicUsize,
) {
    let mut batch = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(first) => {
                let mut next = Some(first);
                let mut flushed = Vec::new();
                while let Some(m) = next.take() {
                    match m {
                        Msg::Events(events) => {
                            queued.fetch_sub(events.len(), Ordering::AcqRel);
                            batch.extend(events.iter().filter_map(|(now, e)| Record::of(*now, e)));
                        }
                        Msg::Flush(ack) => flushed.push(ack),
                    }
                    if batch.len() < 4096 {
                        next = rx.try_recv().ok();
                    }
                }
                let lost = writer.write(&batch);
                dropped.inc_by(lost);
                let busy = !batch.is_empty();
                batch.clear();
                let acked = !flushed.is_empty();
                for ack in flushed {
                    let _ = ack.try_send(());
                }
                if busy && !acked {
                    // Under load, let events gather: a shard's send wakes
                    // this thread only while it waits, so a short pause
                    // here spares the shards a wake-up per batch.
                    std::thread::sleep(GATHER);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => writer.tick(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_sinks_are_named_by_their_yaml_path() {
        let sinks: Vec<SinkConfig> = serde_yaml::from_str(
            r#"
- { type: syslog, transport: udp, address: "nohost", ca: /nope.pem, facility: 30 }
- { type: ipfix, transport: tcp, collector: "192.0.2.1:0", queue: 0 }
- { type: file, path: /tmp/x.jsonl, keep: 0 }
- { type: syslog, transport: tls, address: "logs.example.net:6514" }
"#,
        )
        .unwrap();
        let mut got = Vec::new();
        validate(&sinks, &mut |p, m| got.push(format!("{p}: {m}")));
        assert_eq!(
            got,
            [
                "log.nat_sinks[0].address: \"nohost\": give host:port",
                "log.nat_sinks[0].facility: RFC 5424 §6.2.1: 0 to 23",
                "log.nat_sinks[0].ca: /nope.pem does not exist",
                "log.nat_sinks[0].ca: only for transport: tls",
                "log.nat_sinks[1].queue: must be at least 1",
                "log.nat_sinks[1].collector: \"192.0.2.1:0\": give host:port",
                "log.nat_sinks[2].keep: must be at least 1",
            ]
        );
    }
}
