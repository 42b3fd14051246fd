//! Starts the real pcpd binary on a loopback address of its own.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod ns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN_WRITE: &str = "pcpd-dev-token";
pub const TOKEN_READ: &str = "read-only-token";

pub struct Daemon {
    pub child: Child,
    pub args: Vec<String>,
    /// Extra environment (e.g. libfaketime's), kept for restarts.
    pub env: Vec<(String, String)>,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub scheme: &'static str,
}

/// The built-in default, as YAML the tests edit.
pub fn default_config() -> serde_yaml::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pcpd"))
        .arg("print-default-config")
        .output()
        .expect("pcpd runs");
    assert!(out.status.success());
    serde_yaml::from_slice(&out.stdout).expect("default config is YAML")
}

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A config for loopback address `ip` (127.0.0.x), state in `dir`.
pub fn config_for(ip: Ipv4Addr, dir: &std::path::Path) -> serde_yaml::Value {
    let mut v = default_config();
    v["listen"] = serde_yaml::to_value(vec![format!("{ip}:5351")]).unwrap();
    v["shards"] = 2.into();
    v["state_dir"] = dir.join("state").display().to_string().into();
    v["admin"]["listen"] = format!("{ip}:8351").into();
    v["metrics"]["listen"] = format!("{ip}:9351").into();
    let tokens = serde_yaml::to_value(vec![
        serde_yaml::to_value(
            serde_json::json!({"name": "ops", "sha256": sha256_hex(TOKEN_WRITE), "scope": "write"}),
        )
        .unwrap(),
        serde_yaml::to_value(
            serde_json::json!({"name": "noc", "sha256": sha256_hex(TOKEN_READ), "scope": "read"}),
        )
        .unwrap(),
    ])
    .unwrap();
    v["admin"]["tokens"] = tokens;
    v
}

/// The default profile's rate limit out of the way of a load test.
pub fn no_rate_limit(cfg: &mut serde_yaml::Value) {
    cfg["pcp"]["profiles"]["residential"]["rate_per_sec"] = 100_000.into();
    cfg["pcp"]["profiles"]["residential"]["burst"] = 100_000.into();
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcpd-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Daemon {
    /// Starts pcpd on the test default for `ip`.
    pub fn on_default(name: &str, ip: Ipv4Addr) -> Daemon {
        let dir = temp_dir(name);
        let cfg = config_for(ip, &dir);
        Self::start_in(dir, ip, cfg)
    }

    /// Starts pcpd with `cfg` and waits until it answers (bounded).
    pub fn start_in(dir: PathBuf, ip: Ipv4Addr, cfg: serde_yaml::Value) -> Daemon {
        Self::try_start(dir, ip, cfg, &[]).unwrap_or_else(|e| panic!("pcpd did not start: {e}"))
    }

    /// Starts pcpd with extra arguments; `Err` carries its stderr when it
    /// exits instead of becoming ready.
    pub fn try_start(
        dir: PathBuf,
        ip: Ipv4Addr,
        cfg: serde_yaml::Value,
        args: &[&str],
    ) -> Result<Daemon, String> {
        Self::try_start_env(dir, ip, cfg, args, &[])
    }

    /// [`Daemon::try_start`] with extra environment variables.
    pub fn try_start_env(
        dir: PathBuf,
        ip: Ipv4Addr,
        cfg: serde_yaml::Value,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        let config_path = dir.join("pcpd.yaml");
        std::fs::write(&config_path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
        let tls = cfg["admin"]["tls"].is_mapping();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut d = Daemon {
            child: spawn(&config_path, &dir, args, &env),
            env,
            args: args.iter().map(|a| a.to_string()).collect(),
            ip,
            dir,
            config_path,
            scheme: if tls { "https" } else { "http" },
        };
        if let Err(e) = d.wait_ready() {
            // Keep the directory for the caller (Drop would remove it).
            let _ = d.child.kill();
            let _ = d.child.wait();
            std::mem::forget(d);
            return Err(e);
        }
        Ok(d)
    }

    /// SIGKILL, then start again on the same state (no graceful anything).
    pub fn kill9_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.restart_after_exit();
    }

    /// Starts again on the same state, once the process has exited.
    pub fn restart_after_exit(&mut self) {
        self.child = spawn(&self.config_path, &self.dir, &[], &self.env);
        self.wait_ready()
            .unwrap_or_else(|e| panic!("pcpd did not restart: {e}"));
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                return Err(format!("pcpd exited: {status}\n{log}"));
            }
            if std::net::TcpStream::connect((self.ip, 8351)).is_ok() && self.udp_answers() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("pcpd did not become ready in 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn udp_answers(&self) -> bool {
        let req = announce_request(IpAddr::V4(Ipv4Addr::LOCALHOST));
        self.pcp_exchange(&req).is_some()
    }

    pub fn pcp_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 5351))
    }

    /// One request/response over UDP from 127.0.0.1 (bounded wait).
    pub fn pcp_exchange(&self, req: &[u8]) -> Option<Vec<u8>> {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        sock.send_to(req, self.pcp_addr()).unwrap();
        let mut buf = [0u8; 1500];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                assert_eq!(from, self.pcp_addr(), "reply comes from the address asked");
                Some(buf[..n].to_vec())
            }
            Err(_) => None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}:8351{path}", self.scheme, self.ip)
    }

    pub fn metrics_text(&self) -> String {
        let mut resp = ureq::get(&format!("http://{}:9351/metrics", self.ip))
            .call()
            .expect("metrics answer");
        resp.body_mut().read_to_string().unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

fn spawn(
    config: &std::path::Path,
    dir: &std::path::Path,
    args: &[&str],
    env: &[(String, String)],
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_pcpd"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("PCPD_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("pcpd starts")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn announce_request(client: IpAddr) -> Vec<u8> {
    let req = pcp_wire::Request {
        lifetime: 0,
        client_addr: client,
        data: pcp_wire::OpData::Announce,
        options: pcp_wire::Options::NONE,
    };
    let mut buf = vec![0u8; req.buffer_len()];
    req.emit(&mut buf).unwrap();
    buf
}

pub fn map_request(
    nonce: u8,
    internal_port: u16,
    lifetime: u32,
    options: &[pcp_wire::PcpOption<'_>],
) -> Vec<u8> {
    let req = pcp_wire::Request {
        lifetime,
        client_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        data: pcp_wire::OpData::Map(pcp_wire::MapData {
            nonce: pcp_wire::Nonce([nonce; 12]),
            protocol: 6,
            internal_port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: pcp_wire::Options::List(options),
    };
    let mut buf = vec![0u8; req.buffer_len()];
    req.emit(&mut buf).unwrap();
    buf
}

/// Parses a Prometheus text exposition into (series, value).
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series value");
            (
                series.to_string(),
                value.parse::<f64>().expect("numeric value"),
            )
        })
        .collect()
}

pub fn metric(text: &str, series: &str) -> Option<f64> {
    parse_metrics(text)
        .into_iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| v)
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// One admin API call: (status, JSON body or Null).
pub fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let agent = agent();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let resp = match body {
        Some(b) => agent.run(
            req.header("Content-Type", "application/json")
                .body(b.to_string())
                .unwrap(),
        ),
        None => agent.run(req.body(()).unwrap()),
    }
    .expect("HTTP exchange");
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// The status of a GET without a token; 0 when nothing answers (a node
/// that stopped, or is stopping).
pub fn status_of(url: &str) -> u16 {
    agent().get(url).call().map_or(0, |r| r.status().as_u16())
}

/// A mapping whose success reply a test received.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    pub subscriber: Ipv4Addr,
    pub internal_port: u16,
    pub nonce: [u8; 12],
    pub external: (IpAddr, u16),
}

pub fn map_from(
    subscriber: Ipv4Addr,
    internal_port: u16,
    nonce: [u8; 12],
    server: SocketAddr,
) -> Option<(pcp_wire::ResultCode, (IpAddr, u16), u32)> {
    let sock = UdpSocket::bind((subscriber, 0)).ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let req = pcp_wire::Request {
        lifetime: 3600,
        client_addr: IpAddr::V4(subscriber),
        data: pcp_wire::OpData::Map(pcp_wire::MapData {
            nonce: pcp_wire::Nonce(nonce),
            protocol: 6,
            internal_port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: pcp_wire::Options::NONE,
    };
    let mut buf = [0u8; 1100];
    let n = req.emit(&mut buf).unwrap();
    sock.send_to(&buf[..n], server).ok()?;
    let n = sock.recv(&mut buf).ok()?;
    let r = pcp_wire::Response::parse(&buf[..n]).ok()?;
    let m = r.data.map_data()?;
    Some((r.result, (m.external_addr, m.external_port), r.epoch))
}

/// Every acknowledged mapping is still there with the same external
/// endpoint: a renewal with its nonce returns it.
pub fn all_present(d: &Daemon, acked: &[Acked]) {
    all_present_retrying(d, acked, 1)
}

/// [`all_present`], sending a request without an answer up to `tries`
/// times (a client retransmits, RFC 6887 §8.1.1); any other answer is a loss.
pub fn all_present_retrying(d: &Daemon, acked: &[Acked], tries: u32) {
    let mut lost = Vec::new();
    for a in acked {
        let mut got = None;
        for _ in 0..tries {
            got = map_from(a.subscriber, a.internal_port, a.nonce, d.pcp_addr());
            if got.is_some() {
                break;
            }
        }
        match got {
            Some((pcp_wire::ResultCode::Success, ext, _)) if ext == a.external => {}
            other => lost.push((a, other)),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged mappings lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(3)]
    );
}

/// The NAT event log's lines (`state/nat-events.jsonl`), once `until`
/// holds for them: the log's sinks write from threads of their own, so a
/// line lands a moment after its request is answered. Waits 5 s at most,
/// then returns what is there.
pub fn nat_events(
    d: &Daemon,
    until: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text =
            std::fs::read_to_string(d.dir.join("state/nat-events.jsonl")).unwrap_or_default();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("torn NAT log line {l:?}: {e}"))
            })
            .collect();
        if until(&events) || std::time::Instant::now() >= deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One PCP MAP from `src` (a loopback address of the subscriber's own) to
/// `d`: the result code.
pub fn pcp_map(
    d: &Daemon,
    src: Ipv4Addr,
    protocol: u8,
    port: u16,
    lifetime: u32,
    nonce: u8,
) -> pcp_wire::ResultCode {
    pcp_map_granted(d, src, protocol, port, lifetime, nonce).0
}

/// [`pcp_map`]: the result code and the lifetime granted.
pub fn pcp_map_granted(
    d: &Daemon,
    src: Ipv4Addr,
    protocol: u8,
    port: u16,
    lifetime: u32,
    nonce: u8,
) -> (pcp_wire::ResultCode, u32) {
    let s = UdpSocket::bind((src, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let req = pcp_wire::Request {
        lifetime,
        client_addr: src.into(),
        data: pcp_wire::OpData::Map(pcp_wire::MapData {
            nonce: pcp_wire::Nonce([nonce; 12]),
            protocol,
            internal_port: port,
            external_port: 0,
            external_addr: Ipv4Addr::UNSPECIFIED.into(),
        }),
        options: pcp_wire::Options::NONE,
    };
    let mut buf = vec![0u8; req.buffer_len()];
    req.emit(&mut buf).unwrap();
    s.send_to(&buf, d.pcp_addr()).unwrap();
    let mut out = [0u8; 1100];
    let n = s.recv(&mut out).expect("pcpd answers");
    let r = pcp_wire::Response::parse(&out[..n]).unwrap();
    (r.result, r.lifetime)
}
