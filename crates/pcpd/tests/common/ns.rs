//! Network namespaces made by a test: joining one, running a command, and
//! probing whether a TCP connection crosses a NAT (tests/netns.rs,
//! tests/cluster_netns.rs). Needs root, iproute2 and nftables; a missing
//! prerequisite fails the test.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a probe waits for a packet or a connection.
pub const PROBE: Duration = Duration::from_millis(1500);

/// Runs `f` on a thread that has joined network namespace `ns`; sockets
/// made there stay in that namespace wherever they are used afterwards.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {ns}: {e} (the netns test needs root)"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (install iproute2, nftables, natpmpc)", args[0]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?} failed (the netns test needs root): {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Makes network namespaces `names`, each with its loopback up.
pub fn add_namespaces(names: &[&str]) {
    for ns in names {
        run(&["ip", "netns", "add", ns]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
}

/// `ip -n NS ARGS...`.
pub fn ip(ns: &str, args: &[&str]) {
    let mut v = vec!["ip", "-n", ns];
    v.extend_from_slice(args);
    run(&v);
}

/// Whether a TCP connection from namespace `from_ns` (source `from`) to
/// `to` reaches `listener` (in the subscriber's namespace), keeps the
/// remote address through DNAT, and carries data back.
pub fn tcp_reaches(
    from_ns: &str,
    listener: &TcpListener,
    from: impl Into<IpAddr>,
    to: impl Into<SocketAddr>,
) -> bool {
    let (from, to) = (from.into(), to.into());
    let stream = in_ns(from_ns, || {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
        s.connect_timeout(&to.into(), PROBE)
            .map(|()| std::net::TcpStream::from(s))
    });
    let Ok(mut stream) = stream else {
        return false;
    };
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + PROBE;
    let mut accepted = loop {
        match listener.accept() {
            Ok((s, peer)) => {
                assert_eq!(peer.ip(), from, "DNAT keeps the remote address");
                break s;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("connected but never accepted: {e}"),
        }
    };
    accepted.set_nonblocking(false).unwrap();
    accepted.write_all(b"hello from the subscriber").unwrap();
    drop(accepted);
    stream.set_read_timeout(Some(PROBE)).unwrap();
    let mut got = String::new();
    let _ = stream.read_to_string(&mut got);
    got == "hello from the subscriber"
}

/// GET on an admin API at 127.0.0.1:8351 inside namespace `ns`, with a
/// bearer token; status 0 when nothing answers.
pub fn api_get(ns: &str, path: &str, token: &str) -> (u16, serde_json::Value) {
    let url = format!("http://127.0.0.1:8351{path}");
    in_ns(ns, move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        match agent
            .get(&url)
            .header("Authorization", format!("Bearer {token}"))
            .call()
        {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let text = r.body_mut().read_to_string().unwrap_or_default();
                let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
                (status, body)
            }
            Err(_) => (0, serde_json::Value::Null),
        }
    })
}

/// pcpd's stderr log in `dir` (where [`spawn_pcpd`] writes it).
pub fn pcpd_log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
}

/// Starts pcpd inside namespace `ns` with `config` (`ip netns exec`), its
/// stderr appended to `dir/stderr.log`.
pub fn spawn_pcpd(
    ns: &str,
    config: &std::path::Path,
    dir: &std::path::Path,
) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_pcpd"), "--config"])
        .arg(config)
        .env("PCPD_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("ip netns exec pcpd")
}

/// Starts pcpd in `ns` and waits (30 s at most) until its admin API in
/// that namespace says it is ready; fails with its log if it exits.
pub fn start_pcpd(
    ns: &str,
    config: &std::path::Path,
    dir: &std::path::Path,
    token: &str,
) -> std::process::Child {
    let mut child = spawn_pcpd(ns, config, dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    while api_get(ns, "/readyz", token).0 != 200 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("pcpd exited: {status}\n{}", pcpd_log(dir));
        }
        assert!(
            Instant::now() < deadline,
            "pcpd not ready in 30 s\n{}",
            pcpd_log(dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// One PCP request from `sock` to `server`, retransmitted up to three
/// times: the result, the assigned external endpoint and the lifetime;
/// `None` when nothing answered.
pub fn pcp_exchange(
    sock: &std::net::UdpSocket,
    server: SocketAddr,
    req: &pcp_wire::Request<'_>,
) -> Option<(pcp_wire::ResultCode, SocketAddr, u32)> {
    use pcp_wire::{OpData, PeerData, Response};
    let mut buf = vec![0u8; req.buffer_len()];
    req.emit(&mut buf).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for _ in 0..3 {
        sock.send_to(&buf, server).unwrap();
        let mut out = [0u8; 1100];
        if let Ok((n, from)) = sock.recv_from(&mut out) {
            assert_eq!(from, server, "the answer comes from the address asked");
            let resp = Response::parse(&out[..n]).unwrap();
            let m = match resp.data {
                OpData::Map(m) | OpData::Peer(PeerData { map: m, .. }) => m,
                OpData::Announce => panic!("not a mapping response"),
            };
            let ext = SocketAddr::new(m.external_addr.to_canonical(), m.external_port);
            return Some((resp.result, ext, resp.lifetime));
        }
    }
    None
}
