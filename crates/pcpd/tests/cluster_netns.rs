//! Failover with the nftables backend and real traffic (issue 14, test 6).
//! The test makes its own network namespaces and sends nothing elsewhere:
//!
//! ```text
//!                 ┌── cgn-a: pcpd "a" + nftables ──┐
//!  sub ── br0 ────┤  100.64.0.1 | 198.51.100.1     ├──── br0 ── inet
//!  100.64.0.2     └── cgn-b: pcpd "b" + nftables ──┘         198.51.100.2
//!                    100.64.0.3 | 198.51.100.4
//!            ops: etcd on 10.99.0.1, reached by both routers' ops0
//! ```
//!
//! A mapping made through node a forwards traffic through a's kernel.
//! Node a is killed with SIGKILL; node b takes its partition over from
//! etcd and installs it in its own kernel; the test then moves the
//! subscriber's default route and the pool's route to b, as BGP would,
//! and the same external address and port reach the subscriber through
//! b. Needs root, iproute2, nftables and etcd (`.ci/prereqs`); a missing
//! prerequisite fails the test.
#![cfg(feature = "cluster")]
#![allow(missing_docs)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::ns::{in_ns, run, tcp_reaches};
use pcp_wire::{MapData, Nonce, OpData, Options, Request, Response, ResultCode};
use serde_json::Value;

const SUB: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const INET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const TOKEN: &str = "cluster-netns-token";
const ETCD: &str = "http://10.99.0.1:2379";

/// One router: its namespace, addresses and pcpd.
struct Router {
    ns: String,
    node: &'static str,
    lan: Ipv4Addr,
    wan: Ipv4Addr,
    ops: Ipv4Addr,
    pcpd: Option<Child>,
}

struct Lab {
    sub: String,
    inet: String,
    ops: String,
    a: Router,
    b: Router,
    dir: PathBuf,
    etcd: Option<Child>,
}

fn ip(ns: &str, args: &[&str]) {
    let mut v = vec!["ip", "-n", ns];
    v.extend_from_slice(args);
    run(&v);
}

/// A bridge `br0` in `ns` with `addr` on it.
fn bridge(ns: &str, addr: &str) {
    ip(ns, &["link", "add", "br0", "type", "bridge"]);
    ip(ns, &["addr", "add", addr, "dev", "br0"]);
    ip(ns, &["link", "set", "br0", "up"]);
}

/// A veth from `router` (device `dev`, address `addr`) to `ns`'s bridge.
fn wire(router: &str, dev: &str, addr: &str, ns: &str, peer: &str) {
    ip(
        router,
        &[
            "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", ns,
        ],
    );
    ip(router, &["addr", "add", addr, "dev", dev]);
    ip(router, &["link", "set", dev, "up"]);
    ip(ns, &["link", "set", peer, "master", "br0", "up"]);
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        let name = |n: &str| format!("pcpdc-{n}-{pid}");
        let router = |n: &str, node, last_lan, last_wan, last_ops| Router {
            ns: name(n),
            node,
            lan: Ipv4Addr::new(100, 64, 0, last_lan),
            wan: Ipv4Addr::new(198, 51, 100, last_wan),
            ops: Ipv4Addr::new(10, 99, 0, last_ops),
            pcpd: None,
        };
        let lab = Lab {
            sub: name("sub"),
            inet: name("inet"),
            ops: name("ops"),
            a: router("cgn-a", "a", 1, 1, 2),
            b: router("cgn-b", "b", 3, 4, 3),
            dir: common::temp_dir("cluster-netns"),
            etcd: None,
        };
        for ns in [&lab.sub, &lab.inet, &lab.ops, &lab.a.ns, &lab.b.ns] {
            run(&["ip", "netns", "add", ns]);
            ip(ns, &["link", "set", "lo", "up"]);
        }
        bridge(&lab.sub, "100.64.0.2/24");
        bridge(&lab.inet, "198.51.100.2/24");
        bridge(&lab.ops, "10.99.0.1/24");
        for (r, tag) in [(&lab.a, "a"), (&lab.b, "b")] {
            wire(
                &r.ns,
                "sub0",
                &format!("{}/24", r.lan),
                &lab.sub,
                &format!("s{tag}"),
            );
            wire(
                &r.ns,
                "inet0",
                &format!("{}/24", r.wan),
                &lab.inet,
                &format!("i{tag}"),
            );
            wire(
                &r.ns,
                "ops0",
                &format!("{}/24", r.ops),
                &lab.ops,
                &format!("o{tag}"),
            );
            run(&[
                "ip",
                "netns",
                "exec",
                &r.ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
        }
        // Routing starts at a.
        ip(&lab.sub, &["route", "add", "default", "via", "100.64.0.1"]);
        ip(
            &lab.inet,
            &["route", "add", "192.0.2.0/24", "via", "198.51.100.1"],
        );
        lab
    }

    /// Routing moves to b (what BGP does once b announces the partition).
    fn route_to_b(&self) {
        ip(
            &self.sub,
            &["route", "replace", "default", "via", "100.64.0.3"],
        );
        ip(
            &self.inet,
            &["route", "replace", "192.0.2.0/24", "via", "198.51.100.4"],
        );
    }

    fn start_etcd(&mut self) {
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ops,
                "etcd",
                "--name",
                "e0",
                "--data-dir",
            ])
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                ETCD,
                "--advertise-client-urls",
                ETCD,
            ])
            .args(["--listen-peer-urls", "http://10.99.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://10.99.0.1:2380"])
            .args(["--initial-cluster", "e0=http://10.99.0.1:2380"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd runs (Debian package etcd-server; .ci/prereqs installs it)");
        self.etcd = Some(child);
    }

    fn config(&self, r: &Router) -> PathBuf {
        let mut cfg = common::default_config();
        cfg["listen"] = serde_yaml::to_value(vec![format!("{}:5351", r.lan)]).unwrap();
        cfg["shards"] = 2.into();
        cfg["state_dir"] = self
            .dir
            .join(format!("state-{}", r.node))
            .display()
            .to_string()
            .into();
        cfg["pcp"]["pools"]["default"]["prefixes"] =
            serde_yaml::to_value(vec!["192.0.2.0/28"]).unwrap();
        cfg["pcp"]["subscribers"][0]["prefixes"] =
            serde_yaml::to_value(vec!["100.64.0.0/24"]).unwrap();
        cfg["dataplane"]["backend"] = "nftables".into();
        cfg["admin"]["tokens"] = serde_yaml::to_value(vec![serde_json::json!({
            "name": "test", "sha256": common::sha256_hex(TOKEN), "scope": "write"
        })])
        .unwrap();
        cfg["cluster"] = serde_yaml::to_value(serde_json::json!({
            "node": r.node,
            "etcd": { "endpoints": [ETCD], "prefix": "/pcpd/netns" },
            "lease_ttl_secs": 3,
            "partitions": [{ "name": "p0", "subscribers": ["100.64.0.0/24"], "pool": "default",
                             "external": ["192.0.2.0/28"], "prefer": ["a"] }],
        }))
        .unwrap();
        let path = self.dir.join(format!("{}.yaml", r.node));
        std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
        path
    }

    fn start(&mut self, which: &str) {
        let r = if which == "a" { &self.a } else { &self.b };
        let config = self.config(r);
        let log = std::fs::File::create(self.dir.join(format!("{which}.log"))).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &r.ns,
                env!("CARGO_BIN_EXE_pcpd"),
                "--config",
            ])
            .arg(config)
            .env("PCPD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ip netns exec pcpd");
        let ns = r.ns.clone();
        if which == "a" {
            self.a.pcpd = Some(child);
        } else {
            self.b.pcpd = Some(child);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while api(&ns, "/readyz").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "{which} not ready in 30 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        ["a.log", "b.log", "etcd.log"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f}\n{}",
                    std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in [
            self.a.pcpd.as_mut(),
            self.b.pcpd.as_mut(),
            self.etcd.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.sub, &self.inet, &self.ops, &self.a.ns, &self.b.ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::thread::panicking() {
            eprintln!("logs kept in {}:\n{}", self.dir.display(), self.logs());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// GET on a router's admin API (127.0.0.1:8351 in its namespace); status 0
/// when nothing answers.
fn api(ns: &str, path: &str) -> (u16, Value) {
    common::ns::api_get(ns, path, TOKEN)
}

/// Whether `r`'s kernel holds a NAT element for external endpoint `ext`.
fn kernel_has(r: &Router, ext: SocketAddrV4) -> bool {
    let out = Command::new("ip")
        .args([
            "netns", "exec", &r.ns, "nft", "-j", "list", "table", "ip", "pcpd",
        ])
        .output()
        .expect("nft runs (nftables)");
    let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
        return false; // no table yet
    };
    let addr = format!("\"{}\"", ext.ip());
    let port = ext.port().to_string();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("map"))
        .flat_map(|m| m["elem"].as_array().cloned().unwrap_or_default())
        .map(|e| e.to_string())
        .any(|e| e.contains(&addr) && e.split(|c: char| !c.is_ascii_digit()).any(|n| n == port))
}

fn owns_p0(r: &Router) -> bool {
    api(&r.ns, "/v1/cluster/partitions/p0/health").0 == 200
}

/// A PCP MAP for TCP 8080 from the subscriber, to `server`; (result,
/// external endpoint, epoch).
fn map(sock: &UdpSocket, server: Ipv4Addr) -> (ResultCode, SocketAddrV4, u32) {
    let req = Request {
        lifetime: 600,
        client_addr: IpAddr::V4(SUB),
        data: OpData::Map(MapData {
            nonce: Nonce([9; 12]),
            protocol: 6,
            internal_port: 8080,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::NONE,
    };
    let mut buf = vec![0u8; req.buffer_len()];
    req.emit(&mut buf).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    for _ in 0..5 {
        sock.send_to(&buf, (server, 5351)).unwrap();
        let mut out = [0u8; 1100];
        if let Ok((n, from)) = sock.recv_from(&mut out) {
            assert_eq!(from, SocketAddr::from((server, 5351)));
            let resp = Response::parse(&out[..n]).unwrap();
            let m = resp.data.map_data().expect("a MAP response");
            let IpAddr::V4(ext) = m.external_addr.to_canonical() else {
                panic!("IPv4 external address expected");
            };
            return (
                resp.result,
                SocketAddrV4::new(ext, m.external_port),
                resp.epoch,
            );
        }
    }
    panic!("{server} did not answer");
}

#[test]
fn after_failover_a_mapping_forwards_through_the_survivors_kernel() {
    let mut lab = Lab::new();
    lab.start_etcd();
    lab.start("a");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !owns_p0(&lab.a) {
        assert!(
            Instant::now() < deadline,
            "a never owned p0\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.start("b");

    let listener = in_ns(&lab.sub, || TcpListener::bind((SUB, 8080)).unwrap());
    let pcp = in_ns(&lab.sub, || UdpSocket::bind((SUB, 5999)).unwrap());
    let (code, ext, epoch_a) = map(&pcp, lab.a.lan);
    assert_eq!(code, ResultCode::Success);
    let seen_a = Instant::now();
    assert!(
        tcp_reaches(&lab.inet, &listener, INET, ext),
        "the mapping forwards through a\n{}",
        lab.logs()
    );

    assert!(kernel_has(&lab.a, ext), "a's kernel holds the mapping");
    assert!(!kernel_has(&lab.b, ext), "b's kernel does not, yet");

    // a dies; its kernel would keep forwarding, but routing will move.
    let mut a = lab.a.pcpd.take().unwrap();
    a.kill().unwrap();
    a.wait().unwrap();
    let killed = Instant::now();
    while !owns_p0(&lab.b) {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "b did not take p0 over within TTL + 2 s\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = killed.elapsed();
    assert!(kernel_has(&lab.b, ext), "b installed the mapping from etcd");
    lab.route_to_b();

    assert!(
        tcp_reaches(&lab.inet, &listener, INET, ext),
        "the mapping made on a forwards through b's kernel after the failover ({took:?})\n{}",
        lab.logs()
    );
    // The client renews on b: same external endpoint, epoch kept (§8.5).
    let (code, again, epoch_b) = map(&pcp, lab.b.lan);
    assert_eq!((code, again), (ResultCode::Success, ext));
    let client_delta = seen_a.elapsed().as_secs() as i64;
    let server_delta = i64::from(epoch_b) - i64::from(epoch_a);
    assert!(
        server_delta >= -1
            && client_delta + 2 >= server_delta - server_delta / 16
            && server_delta + 2 >= client_delta - client_delta / 16,
        "epoch {epoch_a} then {epoch_b} after {client_delta} s"
    );
    eprintln!("b answered for p0 {took:?} after a was killed; traffic forwards through b");
}
