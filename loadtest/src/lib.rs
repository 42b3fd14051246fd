//! # pcp-loadtest: load pcpd the way a busy ISP would
//!
//! Simulated subscribers each send from their own address of 127.0.0.0/8
//! (per-packet source address through IP_PKTINFO), with several mappings
//! each, in configurable mixes of MAP create / renew / delete, PEER,
//! ANNOUNCE and NAT-PMP; closed loop (N in flight) or open loop (fixed
//! rate); bounded by request count and duration. Every reply is validated
//! (opcode, nonce, result; renewals keep their external port) and latencies
//! go into an HDR histogram. `reflect` is a batched UDP reflector: the
//! ceiling of this machine for a request/response UDP service.
//!
//! This library holds the parts with tests of their own; `main.rs` does the
//! I/O.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_wire::{natpmp, MapData, Nonce, OpData, Options, PeerData, Request, Response, ResultCode};
use serde::Serialize;

/// First simulated subscriber address: 127.64.0.0 (the daemon's default
/// config serves all of 127.0.0.0/8).
pub const FIRST_SUBSCRIBER: u32 = 0x7f40_0000;

/// The source address of subscriber `i`.
pub fn subscriber_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(FIRST_SUBSCRIBER + i)
}

/// Largest number of simulated subscribers (the rest of 127.64.0.0/10).
pub const MAX_SUBSCRIBERS: u32 = 1 << 22;

/// Whether a target may be loaded: loopback always; other addresses only
/// from inside a network namespace other than the host's (a test
/// namespace), which `in_test_netns` tells.
pub fn target_allowed(target: SocketAddr, in_test_netns: bool) -> Result<(), String> {
    if target.ip().to_canonical().is_loopback() || in_test_netns {
        Ok(())
    } else {
        Err(format!(
            "refusing to load {target}: only loopback targets, or any target from inside a test network namespace"
        ))
    }
}

/// True when this process runs in a network namespace other than PID 1's.
pub fn in_test_netns() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/net"),
        std::fs::read_link("/proc/1/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

/// Kinds of request in a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// MAP for a new internal port.
    Create,
    /// MAP renewing an existing mapping (same nonce).
    Renew,
    /// MAP with lifetime 0 for an existing mapping.
    Delete,
    /// PEER to a remote peer.
    Peer,
    /// ANNOUNCE.
    Announce,
    /// NAT-PMP public address request.
    Natpmp,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 6] = [
        Kind::Create,
        Kind::Renew,
        Kind::Delete,
        Kind::Peer,
        Kind::Announce,
        Kind::Natpmp,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Renew => "renew",
            Kind::Delete => "delete",
            Kind::Peer => "peer",
            Kind::Announce => "announce",
            Kind::Natpmp => "natpmp",
        }
    }
}

/// Relative weights of request kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    weights: Vec<(Kind, u32)>,
    total: u32,
}

impl Mix {
    /// Parses `create=10,renew=70,...` or a preset: `create`, `renew`,
    /// `mixed` (10 create, 60 renew, 10 delete, 10 peer, 5 announce, 5 natpmp).
    pub fn parse(s: &str) -> Result<Mix, String> {
        let spec = match s {
            "mixed" => "create=10,renew=60,delete=10,peer=10,announce=5,natpmp=5",
            "create" | "renew" | "peer" | "announce" | "natpmp" => {
                return Self::parse(&format!("{s}=1"))
            }
            other => other,
        };
        let mut weights = Vec::new();
        for part in spec.split(',') {
            let (k, w) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KIND=WEIGHT"))?;
            let kind = Kind::ALL
                .into_iter()
                .find(|x| x.name() == k.trim())
                .ok_or_else(|| {
                    format!("{k:?}: kinds are create, renew, delete, peer, announce, natpmp")
                })?;
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|_| format!("{w:?}: weight must be a number"))?;
            if w > 0 {
                weights.push((kind, w));
            }
        }
        let total = weights.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err("the mix has no positive weight".into());
        }
        Ok(Mix { weights, total })
    }

    /// The kind for a uniform draw `r`.
    pub fn pick(&self, r: u32) -> Kind {
        let mut x = r % self.total;
        for (k, w) in &self.weights {
            if x < *w {
                return *k;
            }
            x -= w;
        }
        self.weights[0].0
    }

    /// Whether the mix renews or deletes existing mappings (needs a prefill).
    pub fn needs_mappings(&self) -> bool {
        self.weights
            .iter()
            .any(|(k, _)| matches!(k, Kind::Renew | Kind::Delete))
    }
}

/// Encodes a request; `seq` goes into the nonce so the reply can be matched.
pub fn build(
    kind: Kind,
    subscriber: Ipv4Addr,
    seq: u64,
    internal_port: u16,
    out: &mut [u8],
) -> usize {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&seq.to_be_bytes());
    nonce[8..].copy_from_slice(&0x5043_5021u32.to_be_bytes());
    let map = MapData {
        nonce: Nonce(nonce),
        protocol: 6,
        internal_port,
        external_port: 0,
        external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let (lifetime, data) = match kind {
        Kind::Create | Kind::Renew => (3600, OpData::Map(map)),
        Kind::Delete => (0, OpData::Map(map)),
        Kind::Peer => (
            600,
            OpData::Peer(PeerData {
                map,
                remote_port: 443,
                remote_addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, (seq % 250) as u8 + 1)),
            }),
        ),
        Kind::Announce => (0, OpData::Announce),
        Kind::Natpmp => {
            return natpmp::Request::PublicAddress.emit(out).unwrap_or(0);
        }
    };
    let req = Request {
        lifetime,
        client_addr: IpAddr::V4(subscriber),
        data,
        options: Options::NONE,
    };
    req.emit(out).unwrap_or(0)
}

/// The nonce of a request built by [`build`] for a given mapping, so
/// renewals and deletes use the nonce the mapping was created with.
pub fn nonce_seq(bytes: &[u8]) -> Option<u64> {
    let n = bytes.get(24..32)?;
    let tag = bytes.get(32..36)?;
    (tag == 0x5043_5021u32.to_be_bytes())
        .then(|| u64::from_be_bytes(n.try_into().unwrap_or_default()))
}

/// What a reply says, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A PCP response: the request's sequence number (from the nonce; none
    /// for ANNOUNCE), its result, and the external port it gives.
    Pcp {
        /// Request sequence number.
        seq: Option<u64>,
        /// Opcode of the reply.
        opcode: pcp_wire::Opcode,
        /// Result code.
        result: ResultCode,
        /// External port (MAP/PEER).
        external_port: u16,
        /// Granted lifetime, seconds.
        lifetime: u32,
    },
    /// A NAT-PMP public address response.
    NatPmp {
        /// Result code.
        result: pcp_wire::NatPmpResult,
    },
    /// The reflector's echo of a request.
    Echo {
        /// Request sequence number.
        seq: Option<u64>,
    },
}

/// Parses and checks a reply; `Err` says why it is invalid.
pub fn validate(bytes: &[u8], echo: bool) -> Result<Reply, String> {
    if echo {
        return Ok(Reply::Echo {
            seq: nonce_seq(bytes),
        });
    }
    match bytes.first() {
        Some(0) => match natpmp::Response::parse(bytes) {
            Ok(natpmp::Response::PublicAddress { result, .. }) => Ok(Reply::NatPmp { result }),
            Ok(other) => Err(format!("unexpected NAT-PMP reply {other:?}")),
            Err(e) => Err(format!("bad NAT-PMP reply: {e}")),
        },
        _ => {
            let h = pcp_wire::ResponseHeader::parse(bytes)
                .map_err(|e| format!("bad PCP reply: {e}"))?;
            let (seq, port) = match Response::parse(bytes) {
                Ok(r) => (
                    r.data.map_data().and_then(|_| nonce_seq(bytes)),
                    r.data.map_data().map_or(0, |m| m.external_port),
                ),
                Err(_) => (nonce_seq(bytes), 0),
            };
            Ok(Reply::Pcp {
                seq,
                opcode: h.opcode,
                result: h.result,
                external_port: port,
                lifetime: h.lifetime,
            })
        }
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Latency {
    /// Reads percentiles off a histogram of microseconds.
    pub fn from_histogram(h: &hdrhistogram::Histogram<u64>) -> Latency {
        Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Target.
    pub target: String,
    /// Workload description.
    pub mix: String,
    /// Simulated subscribers.
    pub subscribers: u32,
    /// Requests sent in the measured phase.
    pub sent: u64,
    /// Valid replies.
    pub replies: u64,
    /// Requests without a reply within the timeout.
    pub lost: u64,
    /// Invalid replies (unparseable, unknown nonce, port changed on renew).
    pub invalid: u64,
    /// Unsolicited mapping updates received (RFC 6887 §14.2), not counted
    /// as replies.
    pub unsolicited: u64,
    /// Replies by kind and result name.
    pub results: BTreeMap<String, BTreeMap<String, u64>>,
    /// Measured seconds.
    pub seconds: f64,
    /// Valid replies per second.
    pub replies_per_sec: f64,
    /// Latency of valid replies.
    pub latency_us: Latency,
    /// Server CPU seconds used during the run, when `--server-pid` was given.
    pub server_cpu_seconds: Option<f64>,
    /// Server resident memory at the end, bytes.
    pub server_rss_bytes: Option<u64>,
    /// Mappings prefilled before measuring.
    pub prefilled: u64,
}

impl Summary {
    /// Counts a valid reply.
    pub fn count(&mut self, kind: Kind, result: &str) {
        *self
            .results
            .entry(kind.name().to_string())
            .or_default()
            .entry(result.to_string())
            .or_insert(0) += 1;
    }

    /// The human-readable report.
    pub fn human(&self) -> String {
        let mut s = format!(
            "target {}  mix {}  subscribers {}  prefilled {}\n\
             sent {}  replies {}  lost {}  invalid {}  in {:.2} s\n\
             throughput {:.0} replies/s\n\
             latency us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
            self.target,
            self.mix,
            self.subscribers,
            self.prefilled,
            self.sent,
            self.replies,
            self.lost,
            self.invalid,
            self.seconds,
            self.replies_per_sec,
            self.latency_us.p50,
            self.latency_us.p90,
            self.latency_us.p99,
            self.latency_us.p999,
            self.latency_us.max,
        );
        for (kind, by) in &self.results {
            let parts: Vec<String> = by.iter().map(|(r, n)| format!("{r} {n}")).collect();
            s.push_str(&format!("  {kind}: {}\n", parts.join(", ")));
        }
        if let Some(cpu) = self.server_cpu_seconds {
            s.push_str(&format!(
                "server CPU {:.2} s ({:.1} us per reply)\n",
                cpu,
                if self.replies > 0 {
                    cpu * 1e6 / self.replies as f64
                } else {
                    0.0
                }
            ));
        }
        if let Some(rss) = self.server_rss_bytes {
            s.push_str(&format!("server RSS {:.1} MiB\n", rss as f64 / 1048576.0));
        }
        s
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident memory of a process, bytes.
pub fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_outside_a_test_namespace() {
        assert!(target_allowed("127.0.0.1:5351".parse().unwrap(), false).is_ok());
        assert!(target_allowed("[::1]:5351".parse().unwrap(), false).is_ok());
        assert!(target_allowed("10.0.0.1:5351".parse().unwrap(), false).is_err());
        assert!(target_allowed("192.0.2.1:5351".parse().unwrap(), false).is_err());
        assert!(target_allowed("10.0.0.1:5351".parse().unwrap(), true).is_ok());
    }

    #[test]
    fn subscribers_are_distinct_loopback_addresses() {
        assert_eq!(subscriber_addr(0), Ipv4Addr::new(127, 64, 0, 0));
        assert_eq!(subscriber_addr(257), Ipv4Addr::new(127, 64, 1, 1));
        assert!(subscriber_addr(MAX_SUBSCRIBERS - 1).is_loopback());
    }

    #[test]
    fn mixes_parse_and_pick_by_weight() {
        let m = Mix::parse("mixed").unwrap();
        let mut counts = BTreeMap::new();
        for r in 0..100 {
            *counts.entry(m.pick(r)).or_insert(0) += 1;
        }
        assert_eq!(counts[&Kind::Renew], 60);
        assert_eq!(counts[&Kind::Announce], 5);
        assert!(m.needs_mappings());
        assert!(!Mix::parse("create").unwrap().needs_mappings());
        assert!(Mix::parse("create=0").is_err());
        assert!(Mix::parse("fly=1").is_err());
        assert!(Mix::parse("create=x").is_err());
    }

    #[test]
    fn requests_round_trip_through_validation() {
        let mut buf = [0u8; 1100];
        let n = build(Kind::Create, subscriber_addr(5), 42, 8080, &mut buf);
        assert_eq!(n, 60);
        assert_eq!(nonce_seq(&buf[..n]), Some(42));
        // The reflector echoes: the nonce matches.
        assert_eq!(validate(&buf[..n], true), Ok(Reply::Echo { seq: Some(42) }));
        // A server's error response copies the request: still matched.
        let mut out = [0u8; 1100];
        let m = pcp_wire::pcp::emit_error_response(
            &buf[..n],
            ResultCode::UserExQuota,
            30,
            1,
            true,
            &mut out,
        )
        .unwrap();
        match validate(&out[..m], false).unwrap() {
            Reply::Pcp { seq, result, .. } => {
                assert_eq!((seq, result), (Some(42), ResultCode::UserExQuota))
            }
            other => panic!("{other:?}"),
        }
        // Garbage is invalid, not a crash.
        assert!(validate(&[2, 0x81, 0], false).is_err());
        let n = build(Kind::Natpmp, subscriber_addr(5), 1, 0, &mut buf);
        assert_eq!(&buf[..n], &[0, 0]);
    }

    #[test]
    fn latency_percentiles() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let l = Latency::from_histogram(&h);
        assert_eq!((l.p50, l.max), (500, 1000));
        assert!((989..=991).contains(&l.p99));
    }

    #[test]
    fn cpu_and_memory_of_this_process() {
        let pid = std::process::id();
        assert!(process_cpu_seconds(pid).is_some());
        assert!(process_rss_bytes(pid).unwrap() > 0);
    }
}
