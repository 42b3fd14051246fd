//! `pcp-loadtest run`: load a PCP server; `pcp-loadtest reflect`: the UDP
//! reflector baseline. Both are bounded in time; `run` also in requests.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use pcp_loadtest::*;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Longest run or reflector lifetime accepted.
const MAX_DURATION: Duration = Duration::from_secs(1800);
const BATCH: usize = 32;

#[derive(Parser)]
#[command(
    version,
    about = "Load generator for PCP servers, and a UDP reflector baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send a workload to a PCP server and report throughput and latency.
    Run(RunArgs),
    /// Answer every datagram with itself (the machine's UDP ceiling).
    Reflect {
        /// Address to answer on.
        #[arg(long, default_value = "127.0.0.1:5399")]
        listen: SocketAddr,
        /// Threads (one SO_REUSEPORT socket each).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// The server (loopback, or anything from inside a test namespace).
    #[arg(long, default_value = "127.0.0.1:5351")]
    target: SocketAddr,
    /// Simulated subscribers, each with its own source address.
    #[arg(long, default_value_t = 1000)]
    subscribers: u32,
    /// Mappings created per subscriber before measuring.
    #[arg(long, default_value_t = 4)]
    mappings: u16,
    /// The first internal port each subscriber maps (then upwards). Runs
    /// against the same server that should not meet each other's mappings
    /// use different ones: a MAP for a port another run mapped carries
    /// another nonce and is refused NOT_AUTHORIZED (RFC 6887 §11.3).
    #[arg(long, default_value_t = 20_000)]
    first_port: u16,
    /// Workload: create, renew, mixed, or KIND=WEIGHT,...
    #[arg(long, default_value = "mixed")]
    mix: String,
    /// Closed loop: requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop: requests per second (overrides --concurrency).
    #[arg(long)]
    rate: Option<u64>,
    /// Measured seconds (at most 1800).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Stop after this many measured requests.
    #[arg(long, default_value_t = 100_000_000)]
    requests: u64,
    /// A reply later than this is lost, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Requests in flight while prefilling (a server that answers one
    /// request at a time needs fewer than it can hold in its socket).
    #[arg(long, default_value_t = 256)]
    prefill_concurrency: usize,
    /// The target is `reflect`: replies are echoes.
    #[arg(long)]
    echo: bool,
    /// Server process to report CPU and memory for.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run(args) => {
            target_allowed(args.target, in_test_netns()).map_err(anyhow::Error::msg)?;
            if Duration::from_secs_f64(args.seconds.max(0.0)) > MAX_DURATION {
                bail!("--seconds is at most {}", MAX_DURATION.as_secs());
            }
            if args.subscribers == 0 || args.subscribers > MAX_SUBSCRIBERS {
                bail!("--subscribers must be 1..={MAX_SUBSCRIBERS}");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let summary = rt.block_on(run(args.clone()))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.human());
            }
            Ok(())
        }
        Cmd::Reflect {
            listen,
            threads,
            seconds,
        } => {
            target_allowed(listen, in_test_netns()).map_err(anyhow::Error::msg)?;
            let lifetime = Duration::from_secs(seconds).min(MAX_DURATION);
            reflect(listen, threads.max(1), lifetime)
        }
    }
}

fn socket(bind: SocketAddr, reuse_port: bool) -> anyhow::Result<(UdpSocket, UdpSocketState)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    // Deep buffers: the generator must not be the bottleneck.
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&bind.into())
        .with_context(|| format!("bind {bind}"))?;
    let std_sock: std::net::UdpSocket = s.into();
    let state = UdpSocketState::new((&std_sock).into())?;
    Ok((UdpSocket::from_std(std_sock)?, state))
}

/// The reflector: one thread and one SO_REUSEPORT socket per core, each
/// receiving up to [`BATCH`] datagrams per `recvmmsg` and echoing them
/// with one `sendmmsg`, into buffers allocated once. It is the ceiling
/// pcpd is measured against, so it must be the best this machine can do
/// (checked against `loadtest/baseline/reflect.c` by `report.sh`).
fn reflect(listen: SocketAddr, threads: usize, lifetime: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + lifetime;
    // Bind every socket before answering, so the kernel spreads the load
    // over all of them from the first datagram.
    let sockets = (0..threads)
        .map(|_| reflect_socket(listen))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let handles: Vec<_> = sockets
        .into_iter()
        .map(|sock| std::thread::spawn(move || reflect_loop(&sock, end)))
        .collect();
    eprintln!(
        "reflecting on {listen} with {threads} threads for {} s",
        lifetime.as_secs()
    );
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("reflector thread panicked"))??;
    }
    Ok(())
}

/// A blocking socket that wakes at least every 200 ms (to see the end).
fn reflect_socket(listen: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    s.set_reuse_port(true)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&listen.into())
        .with_context(|| format!("bind {listen}"))?;
    Ok(s.into())
}

fn reflect_loop(sock: &std::net::UdpSocket, end: Instant) -> anyhow::Result<()> {
    use nix::errno::Errno;
    use nix::sys::socket::{
        recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
    };
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let mut bufs: Box<[[u8; 1500]; BATCH]> = Box::new([[0u8; 1500]; BATCH]);
    let mut rx = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut tx = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut addrs: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
    let mut lens = [0usize; BATCH];
    let no_cmsgs: [ControlMessage<'_>; 0] = [];
    while Instant::now() < end {
        let n = {
            let mut iovs = bufs.each_mut().map(|b| [IoSliceMut::new(&mut b[..])]);
            // MSG_WAITFORONE: block for the first datagram, then take
            // what is queued without waiting.
            let got = match recvmmsg(fd, &mut rx, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(got) => got,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => bail!("recvmmsg: {e}"),
            };
            let mut n = 0;
            for m in got {
                addrs[n] = m.address;
                lens[n] = m.bytes;
                n += 1;
            }
            n
        };
        let iovs: [[IoSlice<'_>; 1]; BATCH] =
            std::array::from_fn(|i| [IoSlice::new(&bufs[i][..lens[i]])]);
        match sendmmsg(
            fd,
            &mut tx,
            &iovs[..n],
            &addrs[..n],
            no_cmsgs,
            MsgFlags::empty(),
        ) {
            Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(e) => bail!("sendmmsg: {e}"),
        }
    }
    Ok(())
}

struct Sub {
    /// (internal port, nonce seq, external port) of live mappings.
    /// (internal port, nonce key, external port, when it expires).
    mappings: Vec<(u16, u64, u16, Instant)>,
    next_port: u16,
    cursor: usize,
}

struct Outstanding {
    kind: Kind,
    sub: u32,
    port: u16,
    sent: Instant,
}

/// Client and server start a lifetime at slightly different moments: a
/// renewal sent this close to the client's idea of the expiry may find the
/// mapping gone.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// What `on_reply` says of an unsolicited update (not an invalid reply).
const UNSOLICITED: &str = "unsolicited";

/// Keys of requests without a nonce: one in flight per subscriber and kind.
fn nonceless_key(sub: u32, kind: Kind) -> u64 {
    (1 << 63) | (u64::from(sub) << 2) | u64::from(kind == Kind::Natpmp)
}

struct Gen {
    args: RunArgs,
    mix: Mix,
    subs: Vec<Sub>,
    out: HashMap<u64, Outstanding>,
    seq: u64,
    rng: u64,
    rr: u32,
}

impl Gen {
    fn random(&mut self) -> u32 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 32) as u32
    }

    /// Builds the next request into `buf`; returns (key, len, source).
    fn next(&mut self, kind: Kind, buf: &mut [u8]) -> Option<(u64, usize, IpAddr)> {
        let n_subs = self.args.subscribers;
        for _ in 0..16 {
            self.rr = (self.rr + 1) % n_subs;
            let s = self.rr;
            let addr = subscriber_addr(s);
            let (key, port, nonce_seq) = match kind {
                Kind::Create => {
                    self.seq += 1;
                    let sub = &mut self.subs[s as usize];
                    let port = sub.next_port;
                    sub.next_port = sub.next_port.wrapping_add(1).max(self.args.first_port);
                    (self.seq, port, self.seq)
                }
                Kind::Renew | Kind::Delete => {
                    let sub = &mut self.subs[s as usize];
                    if sub.mappings.is_empty() {
                        continue;
                    }
                    sub.cursor = (sub.cursor + 1) % sub.mappings.len();
                    let (port, seq, _, _) = sub.mappings[sub.cursor];
                    (seq, port, seq)
                }
                Kind::Peer => {
                    // A fixed nonce per (subscriber, peer slot): repeats renew.
                    let k = u64::from(self.random() % 64);
                    let seq = (1 << 62) | (u64::from(s) << 8) | k;
                    (seq, 30_000 + (k % 8) as u16, seq)
                }
                Kind::Announce | Kind::Natpmp => (nonceless_key(s, kind), 0, 0),
            };
            if self.out.contains_key(&key) {
                continue;
            }
            let len = build(kind, addr, nonce_seq, port, buf);
            self.out.insert(
                key,
                Outstanding {
                    kind,
                    sub: s,
                    port,
                    sent: Instant::now(),
                },
            );
            return Some((key, len, IpAddr::V4(addr)));
        }
        None
    }

    /// Matches a reply; returns (kind, result name, latency) or an error.
    fn on_reply(
        &mut self,
        bytes: &[u8],
        dst: Option<IpAddr>,
        summary: &mut Summary,
    ) -> Result<(Kind, Duration), String> {
        let reply = validate(bytes, self.args.echo)?;
        let sub_of = |ip: Option<IpAddr>| match ip {
            Some(IpAddr::V4(a)) => u32::from(a).checked_sub(FIRST_SUBSCRIBER),
            _ => None,
        };
        let mut lifetime = 0;
        let (key, result_name, ext_port, ok) = match reply {
            Reply::Echo { seq } => (
                seq.ok_or("echo without our nonce")?,
                "ECHO".to_string(),
                0,
                true,
            ),
            Reply::NatPmp { result } => {
                let s = sub_of(dst).ok_or("NAT-PMP reply to an unknown address")?;
                (
                    nonceless_key(s, Kind::Natpmp),
                    format!("{result:?}").to_uppercase(),
                    0,
                    result == pcp_wire::NatPmpResult::Success,
                )
            }
            Reply::Pcp {
                seq,
                opcode,
                result,
                external_port,
                lifetime: granted,
            } => {
                lifetime = granted;
                let key = match (opcode, seq) {
                    (pcp_wire::Opcode::Announce, _) => nonceless_key(
                        sub_of(dst).ok_or("ANNOUNCE reply to an unknown address")?,
                        Kind::Announce,
                    ),
                    (_, Some(seq)) => seq,
                    _ => return Err(format!("{opcode} reply without our nonce")),
                };
                (
                    key,
                    result.name().to_string(),
                    external_port,
                    result == pcp_wire::ResultCode::Success,
                )
            }
        };
        let Some(o) = self.out.remove(&key) else {
            // An unsolicited MAP/PEER response (RFC 6887 §14.2: the mapping
            // moved, e.g. a drain) for a mapping we hold: take the new port.
            // Looked up in the subscriber it was sent to only: a late reply
            // to a request that timed out lands here too, and a scan of
            // every subscriber per reply stalled the generator for minutes
            // at a million subscribers (pcpd idle, the run reporting
            // nothing).
            let moved = sub_of(dst)
                .and_then(|s| self.subs.get_mut(s as usize))
                .and_then(|s| s.mappings.iter_mut().find(|m| m.1 == key));
            return match moved {
                Some(m) if ok => {
                    m.2 = ext_port;
                    summary.unsolicited += 1;
                    Err(UNSOLICITED.into())
                }
                _ => Err("reply to no outstanding request".into()),
            };
        };
        let latency = o.sent.elapsed();
        summary.count(o.kind, &result_name);
        if ok && !self.args.echo {
            let sub = &mut self.subs[o.sub as usize];
            let expires = Instant::now() + Duration::from_secs(u64::from(lifetime));
            match o.kind {
                Kind::Create => sub.mappings.push((o.port, key, ext_port, expires)),
                Kind::Renew => {
                    if let Some(m) = sub.mappings.iter_mut().find(|m| m.1 == key) {
                        // A mapping that expired before its renewal was sent
                        // is made anew, on any port; a live one keeps its port.
                        if m.2 != ext_port && o.sent + EXPIRY_MARGIN < m.3 {
                            return Err(format!(
                                "renewal moved the mapping from port {} to {ext_port}",
                                m.2
                            ));
                        }
                        (m.2, m.3) = (ext_port, expires);
                    }
                }
                Kind::Delete => sub.mappings.retain(|m| m.1 != key),
                _ => {}
            }
        }
        Ok((o.kind, latency))
    }
}

async fn run(args: RunArgs) -> anyhow::Result<Summary> {
    let mix = Mix::parse(&args.mix).map_err(anyhow::Error::msg)?;
    let bind: SocketAddr = if args.target.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let (sock, state) = socket(bind, false)?;
    let mut gen = Gen {
        subs: (0..args.subscribers)
            .map(|_| Sub {
                mappings: Vec::new(),
                next_port: args.first_port,
                cursor: 0,
            })
            .collect(),
        mix,
        out: HashMap::new(),
        seq: 0,
        rng: 0x9e37_79b9_7f4a_7c15,
        rr: 0,
        args: args.clone(),
    };
    let mut summary = Summary {
        target: args.target.to_string(),
        mix: args.mix.clone(),
        subscribers: args.subscribers,
        ..Default::default()
    };
    // Prefill: each subscriber's mappings, not measured.
    if !args.echo && args.mappings > 0 && (gen.mix.needs_mappings() || args.mix == "create") {
        let total = u64::from(args.subscribers) * u64::from(args.mappings);
        let mut scratch = Summary::default();
        let prefill = Mix::parse("create").map_err(anyhow::Error::msg)?;
        let real = std::mem::replace(&mut gen.mix, prefill);
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut plan = Plan {
            total: Some(total),
            until: deadline,
            rate: None,
            concurrency: args.prefill_concurrency.max(1),
        };
        drive(&sock, &state, &mut gen, &mut scratch, &mut plan, None).await?;
        gen.mix = real;
        summary.prefilled = gen.subs.iter().map(|s| s.mappings.len() as u64).sum();
        if summary.prefilled < total * 9 / 10 {
            eprintln!(
                "warning: only {} of {total} mappings could be created",
                summary.prefilled
            );
        }
    }
    let cpu0 = args.server_pid.and_then(process_cpu_seconds);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let mut plan = Plan {
        total: Some(args.requests),
        until,
        rate: args.rate,
        concurrency: args.concurrency.max(1),
    };
    let bar = indicatif::ProgressBar::new((args.seconds * 10.0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let hist = drive(&sock, &state, &mut gen, &mut summary, &mut plan, Some(&bar)).await?;
    bar.finish_and_clear();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.replies_per_sec = summary.replies as f64 / summary.seconds.max(1e-9);
    summary.latency_us = Latency::from_histogram(&hist);
    if let (Some(pid), Some(c0)) = (args.server_pid, cpu0) {
        summary.server_cpu_seconds = process_cpu_seconds(pid).map(|c| c - c0);
        summary.server_rss_bytes = process_rss_bytes(pid);
    }
    Ok(summary)
}

struct Plan {
    total: Option<u64>,
    until: Instant,
    rate: Option<u64>,
    concurrency: usize,
}

/// Sends and receives until the plan is done and the last replies are in
/// (or timed out).
async fn drive(
    sock: &UdpSocket,
    state: &UdpSocketState,
    gen: &mut Gen,
    summary: &mut Summary,
    plan: &mut Plan,
    bar: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let timeout = Duration::from_millis(gen.args.timeout_ms);
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut buf = [0u8; 1100];
    let mut rbufs = Box::new([[0u8; 1500]; BATCH]);
    let mut metas = [RecvMeta::default(); BATCH];
    let mut last_sweep = Instant::now();
    let mut idle = false;
    let cap = 65_536usize;
    loop {
        let now = Instant::now();
        let sending = now < plan.until && plan.total.is_none_or(|t| sent < t);
        if (!sending || idle) && gen.out.is_empty() {
            break;
        }
        if now > plan.until + timeout * 2 {
            break;
        }
        // Send what the plan allows.
        if sending {
            let allowed = match plan.rate {
                Some(r) => {
                    ((now - start).as_secs_f64() * r as f64) as u64
                        - sent.min(((now - start).as_secs_f64() * r as f64) as u64)
                }
                None => plan.concurrency.saturating_sub(gen.out.len()) as u64,
            };
            let allowed = allowed
                .min(256)
                .min(plan.total.map_or(u64::MAX, |t| t - sent));
            for _ in 0..allowed {
                if gen.out.len() >= cap {
                    break;
                }
                let r = gen.random();
                let kind = gen.mix.pick(r);
                let Some((key, len, src)) = gen.next(kind, &mut buf) else {
                    // Nothing left to ask (a prefill whose creates were
                    // lost has no subscriber without its mappings): once
                    // the outstanding ones are answered or lost, stop.
                    idle = gen.out.is_empty();
                    break;
                };
                let t = Transmit {
                    destination: gen.args.target,
                    ecn: None,
                    contents: &buf[..len],
                    segment_size: None,
                    src_ip: Some(src),
                };
                match sock.try_io(Interest::WRITABLE, || state.try_send(sock.into(), &t)) {
                    Ok(()) => {
                        sent += 1;
                        summary.sent += 1;
                    }
                    Err(_) => {
                        gen.out.remove(&key);
                        break;
                    }
                }
            }
        }
        // Receive what is there.
        let got = {
            let mut iovs = rbufs.each_mut().map(|b| IoSliceMut::new(&mut b[..]));
            sock.try_io(Interest::READABLE, || {
                state.recv(sock.into(), &mut iovs, &mut metas)
            })
            .unwrap_or(0)
        };
        for (meta, b) in metas.iter().zip(rbufs.iter()).take(got) {
            for d in b[..meta.len].chunks(meta.stride.max(1)) {
                match gen.on_reply(d, meta.dst_ip, summary) {
                    Ok((_, lat)) => {
                        summary.replies += 1;
                        let _ = hist.record((lat.as_micros() as u64).max(1));
                    }
                    Err(e) if e == UNSOLICITED => {}
                    Err(_) => summary.invalid += 1,
                }
            }
        }
        if got == 0 {
            // Nothing to read: wait briefly (open loop keeps its pace).
            let _ = tokio::time::timeout(
                Duration::from_micros(if plan.rate.is_some() { 200 } else { 2000 }),
                sock.readable(),
            )
            .await;
        }
        if last_sweep.elapsed() > Duration::from_millis(100) {
            last_sweep = Instant::now();
            let before = gen.out.len();
            gen.out.retain(|_, o| o.sent.elapsed() < timeout);
            summary.lost += (before - gen.out.len()) as u64;
            if let Some(bar) = bar {
                bar.set_position((start.elapsed().as_secs_f64() * 10.0) as u64);
                bar.set_message(format!(
                    "{} replies, {:.0}/s",
                    summary.replies,
                    summary.replies as f64 / start.elapsed().as_secs_f64()
                ));
            }
        }
    }
    summary.lost += gen.out.len() as u64;
    gen.out.clear();
    Ok(hist)
}
