//! The nftables dataplane proven with real traffic. The test makes three
//! network namespaces of its own and sends nothing anywhere else:
//!
//! ```text
//!  sub (100.64.0.2) ──veth── cgn: pcpd + nftables ──veth── inet (198.51.100.2, .3)
//!                            100.64.0.1 | 198.51.100.1       route 192.0.2.0/24 via cgn
//! ```
//!
//! The subscriber asks for mappings with real clients (natpmpc for NAT-PMP,
//! crab_nat for PCP MAP, our codec for PEER and FILTER); the internet host
//! connects to what was granted. Needs root, iproute2, nftables and natpmpc
//! (`.ci/prereqs` installs them; CI runs as root): a missing prerequisite
//! fails the test, it never skips. The namespaces (and with them every
//! veth and the kernel's nftables state) are deleted on drop, also when an
//! assertion fails.
#![allow(missing_docs)]

mod common;

use common::ns::{in_ns, run, PROBE};

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pcp_wire::{Filter, MapData, Nonce, OpData, Options, PcpOption, PeerData, Request, ResultCode};
use serde_json::Value;

const SUB: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const INET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const INET_OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
const TOKEN: &str = "netns-test-token";

/// The three namespaces, and pcpd running in `cgn`.
struct Lab {
    sub: String,
    cgn: String,
    inet: String,
    dir: PathBuf,
    config: PathBuf,
    pcpd: Option<Child>,
}

impl Lab {
    fn new() -> Lab {
        // Tests of this file run side by side: each lab its own names.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let dir = common::temp_dir(&format!("netns-{n}"));
        let lab = Lab {
            sub: format!("pcpdt-sub-{id}"),
            cgn: format!("pcpdt-cgn-{id}"),
            inet: format!("pcpdt-inet-{id}"),
            config: dir.join("pcpd.yaml"),
            dir,
            pcpd: None,
        };
        let (sub, cgn, inet) = (lab.sub.as_str(), lab.cgn.as_str(), lab.inet.as_str());
        for ns in [sub, cgn, inet] {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let link = |ns: &str, args: &[&str]| {
            let mut v = vec!["ip", "-n", ns];
            v.extend_from_slice(args);
            run(&v);
        };
        link(
            cgn,
            &[
                "link", "add", "sub0", "type", "veth", "peer", "name", "eth0", "netns", sub,
            ],
        );
        link(
            cgn,
            &[
                "link", "add", "inet0", "type", "veth", "peer", "name", "eth0", "netns", inet,
            ],
        );
        link(cgn, &["addr", "add", "100.64.0.1/24", "dev", "sub0"]);
        link(cgn, &["addr", "add", "198.51.100.1/24", "dev", "inet0"]);
        link(sub, &["addr", "add", "100.64.0.2/24", "dev", "eth0"]);
        link(inet, &["addr", "add", "198.51.100.2/24", "dev", "eth0"]);
        link(inet, &["addr", "add", "198.51.100.3/24", "dev", "eth0"]);
        for (ns, dev) in [(cgn, "sub0"), (cgn, "inet0"), (sub, "eth0"), (inet, "eth0")] {
            link(ns, &["link", "set", dev, "up"]);
        }
        link(sub, &["route", "add", "default", "via", "100.64.0.1"]);
        // The pool is routed to the CGNAT router.
        link(
            inet,
            &["route", "add", "192.0.2.0/24", "via", "198.51.100.1"],
        );
        run(&[
            "ip",
            "netns",
            "exec",
            cgn,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);

        let mut cfg = common::default_config();
        cfg["listen"] = serde_yaml::to_value(vec!["100.64.0.1:5351"]).unwrap();
        cfg["shards"] = 2.into();
        cfg["state_dir"] = lab.dir.join("state").display().to_string().into();
        cfg["pcp"]["lifetimes"]["min"] = 2.into();
        cfg["pcp"]["pools"]["default"]["prefixes"] =
            serde_yaml::to_value(vec!["192.0.2.0/28"]).unwrap();
        cfg["pcp"]["subscribers"][0]["prefixes"] =
            serde_yaml::to_value(vec!["100.64.0.0/24"]).unwrap();
        cfg["dataplane"]["backend"] = "nftables".into();
        cfg["admin"]["tokens"] = serde_yaml::to_value(vec![serde_json::json!({
            "name": "test", "sha256": common::sha256_hex(TOKEN), "scope": "write"
        })])
        .unwrap();
        std::fs::write(&lab.config, serde_yaml::to_string(&cfg).unwrap()).unwrap();
        lab
    }

    fn start_pcpd(&mut self) {
        self.pcpd = Some(common::ns::start_pcpd(
            &self.cgn,
            &self.config,
            &self.dir,
            TOKEN,
        ));
    }

    fn stop_pcpd(&mut self) {
        if let Some(mut c) = self.pcpd.take() {
            // SIGKILL: no graceful anything; the kernel keeps forwarding.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        common::ns::pcpd_log(&self.dir)
    }

    /// GET on the admin API (127.0.0.1:8351 inside the router namespace);
    /// status 0 when it does not answer.
    fn api(&self, path: &str) -> (u16, Value) {
        common::ns::api_get(&self.cgn, path, TOKEN)
    }

    /// The value of one series of the metrics endpoint (127.0.0.1:9351
    /// inside the router namespace), as `name{labels}` prints it.
    fn metric(&self, series: &str) -> f64 {
        let text = in_ns(&self.cgn, || {
            let mut r = ureq::get("http://127.0.0.1:9351/metrics")
                .call()
                .expect("metrics endpoint");
            r.body_mut().read_to_string().unwrap()
        });
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    fn mappings(&self) -> Vec<Value> {
        let (status, v) = self.api("/v1/mappings");
        assert_eq!(status, 200, "{v}");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    fn nft_elements(&self, set: &str) -> usize {
        let text = run(&[
            "ip", "netns", "exec", &self.cgn, "nft", "-j", "list", "table", "ip", "pcpd",
        ]);
        let v: Value = serde_json::from_str(&text).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i.get("map").or_else(|| i.get("set")))
            .filter(|m| m["name"] == set)
            .map(|m| m["elem"].as_array().map_or(0, Vec::len))
            .sum()
    }

    /// Whether a TCP connection from the internet host (source `from`)
    /// to `to` reaches `listener` in the subscriber's namespace.
    fn tcp_reaches(&self, listener: &TcpListener, from: Ipv4Addr, to: SocketAddrV4) -> bool {
        common::ns::tcp_reaches(&self.inet, listener, from, to)
    }

    /// Whether a UDP datagram from the internet host to `to` reaches
    /// `sock` in the subscriber's namespace, and its answer comes back
    /// from `to`.
    fn udp_reaches(&self, sock: &UdpSocket, to: SocketAddrV4) -> bool {
        let probe = in_ns(&self.inet, || UdpSocket::bind((INET, 0)).unwrap());
        probe.send_to(b"ping", to).unwrap();
        sock.set_read_timeout(Some(PROBE)).unwrap();
        let mut buf = [0u8; 64];
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            return false;
        };
        assert_eq!(&buf[..n], b"ping");
        sock.send_to(b"pong", from).unwrap();
        probe.set_read_timeout(Some(PROBE)).unwrap();
        match probe.recv_from(&mut buf) {
            Ok((n, back)) => &buf[..n] == b"pong" && back == SocketAddr::V4(to),
            Err(_) => false,
        }
    }

    /// One PCP request from `sock` (in the subscriber's namespace).
    fn pcp(&self, sock: &UdpSocket, req: &Request<'_>) -> (ResultCode, SocketAddrV4, u32) {
        let (result, ext, lifetime) =
            common::ns::pcp_exchange(sock, SocketAddr::from((GATEWAY, 5351)), req)
                .unwrap_or_else(|| panic!("pcpd did not answer\n{}", self.log()));
        let SocketAddr::V4(ext) = ext else {
            panic!("IPv4 external address expected: {ext}");
        };
        (result, ext, lifetime)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_pcpd();
        for ns in [&self.sub, &self.cgn, &self.inet] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("pcpd log kept in {}:\n{}", self.dir.display(), self.log());
        }
    }
}

fn natpmpc(lab: &Lab, args: &[&str]) -> String {
    let mut v = vec![
        "ip",
        "netns",
        "exec",
        lab.sub.as_str(),
        "natpmpc",
        "-g",
        "100.64.0.1",
    ];
    v.extend_from_slice(args);
    run(&v)
}

fn map_request<'a>(
    nonce: u8,
    protocol: u8,
    internal_port: u16,
    lifetime: u32,
    options: &'a [PcpOption<'a>],
) -> Request<'a> {
    Request {
        lifetime,
        client_addr: IpAddr::V4(SUB),
        data: OpData::Map(MapData {
            nonce: Nonce([nonce; 12]),
            protocol,
            internal_port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::List(options),
    }
}

#[test]
fn mappings_forward_real_traffic_through_nftables() {
    let mut lab = Lab::new();
    lab.start_pcpd();
    let pcp_sock = in_ns(&lab.sub, || UdpSocket::bind((SUB, 5999)).unwrap());

    // NAT-PMP (RFC 6886) with Debian's natpmpc: a TCP mapping for 8080.
    let tcp_listener = in_ns(&lab.sub, || TcpListener::bind((SUB, 8080)).unwrap());
    let out = natpmpc(&lab, &["-a", "0", "8080", "tcp", "600"]);
    let public: Ipv4Addr = out
        .lines()
        .find_map(|l| l.strip_prefix("Public IP address : "))
        .unwrap_or_else(|| panic!("{out}"))
        .trim()
        .parse()
        .unwrap();
    let tcp_port: u16 = out
        .lines()
        .find(|l| l.starts_with("Mapped public port"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    let tcp_ext = SocketAddrV4::new(public, tcp_port);
    assert!(
        lab.tcp_reaches(&tcp_listener, INET, tcp_ext),
        "NAT-PMP TCP mapping forwards\n{}",
        lab.log()
    );

    // PCP MAP (RFC 6887 §11) with crab_nat: UDP 9000, short lifetime.
    let udp_sock = in_ns(&lab.sub, || UdpSocket::bind((SUB, 9000)).unwrap());
    let granted_at = Instant::now();
    let mapping = in_ns(&lab.sub, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(crab_nat::PortMapping::new(
            IpAddr::V4(GATEWAY).into(),
            IpAddr::V4(SUB),
            crab_nat::InternetProtocol::Udp,
            NonZeroU16::new(9000).unwrap(),
            crab_nat::PortMappingOptions {
                lifetime_seconds: Some(4),
                ..Default::default()
            },
        ))
        .expect("crab_nat gets a PCP mapping")
    });
    assert_eq!(mapping.lifetime(), 4);
    let crab_nat::PortMappingType::Pcp {
        external_ip: IpAddr::V4(udp_ip),
        ..
    } = mapping.mapping_type()
    else {
        panic!("a PCP mapping with an IPv4 external address expected");
    };
    let udp_ext = SocketAddrV4::new(udp_ip, mapping.external_port().get());
    assert!(
        lab.udp_reaches(&udp_sock, udp_ext),
        "PCP UDP mapping forwards\n{}",
        lab.log()
    );

    // Ordinary outbound traffic leaves from the subscriber's port block.
    let (status, usage) = lab.api("/v1/subscribers/100.64.0.2");
    assert_eq!(status, 200, "{usage}");
    let block = &usage["blocks"][0];
    let (first, last) = (
        block["first_port"].as_u64().unwrap(),
        block["last_port"].as_u64().unwrap(),
    );
    let sink = in_ns(&lab.inet, || UdpSocket::bind((INET, 7001)).unwrap());
    sink.set_read_timeout(Some(PROBE)).unwrap();
    let plain = in_ns(&lab.sub, || UdpSocket::bind((SUB, 0)).unwrap());
    plain.send_to(b"out", (INET, 7001)).unwrap();
    let mut buf = [0u8; 16];
    let (_, seen) = sink
        .recv_from(&mut buf)
        .expect("outbound UDP is NATed and forwarded");
    assert_eq!(
        seen.ip(),
        IpAddr::V4(public),
        "subscriber SNAT to its external address"
    );
    assert!(
        (first..=last).contains(&u64::from(seen.port())),
        "source port {} inside the block {first}-{last}",
        seen.port()
    );

    // PEER (RFC 6887 §12): the outbound flow leaves from the granted port.
    let peer_sock = in_ns(&lab.sub, || UdpSocket::bind((SUB, 40000)).unwrap());
    let peer_sink = in_ns(&lab.inet, || UdpSocket::bind((INET, 7000)).unwrap());
    let peer = Request {
        lifetime: 600,
        client_addr: IpAddr::V4(SUB),
        data: OpData::Peer(PeerData {
            map: MapData {
                nonce: Nonce([7; 12]),
                protocol: 17,
                internal_port: 40000,
                external_port: 0,
                external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            },
            remote_port: 7000,
            remote_addr: IpAddr::V4(INET),
        }),
        options: Options::NONE,
    };
    let (code, peer_ext, _) = lab.pcp(&peer_sock, &peer);
    assert_eq!(code, ResultCode::Success);
    peer_sock.send_to(b"peer", (INET, 7000)).unwrap();
    peer_sink.set_read_timeout(Some(PROBE)).unwrap();
    let (_, seen) = peer_sink.recv_from(&mut buf).expect("PEER flow forwarded");
    assert_eq!(
        seen,
        SocketAddr::V4(peer_ext),
        "PEER flow leaves from the granted external port"
    );

    // FILTER (RFC 6887 §13.3): only 198.51.100.2/32 may reach 8081.
    let filtered_listener = in_ns(&lab.sub, || TcpListener::bind((SUB, 8081)).unwrap());
    let filter = [PcpOption::Filter(Filter {
        prefix_len: 128,
        remote_port: 0,
        remote_addr: IpAddr::V4(INET),
    })];
    let (code, filtered_ext, _) = lab.pcp(&pcp_sock, &map_request(3, 6, 8081, 600, &filter));
    assert_eq!(code, ResultCode::Success);
    assert!(
        lab.tcp_reaches(&filtered_listener, INET, filtered_ext),
        "the permitted prefix gets in"
    );
    assert!(
        !lab.tcp_reaches(&filtered_listener, INET_OTHER, filtered_ext),
        "another prefix is kept out"
    );

    // Delete (NAT-PMP lifetime 0, RFC 6886 §3.4): no longer reachable.
    natpmpc(&lab, &["-a", "0", "8080", "tcp", "0"]);
    assert!(
        !lab.tcp_reaches(&tcp_listener, INET, tcp_ext),
        "deleted mapping no longer forwards"
    );

    // Expiry (RFC 6887 §15): the 4 s UDP mapping is gone after its lifetime.
    let wait = Duration::from_secs(6).saturating_sub(granted_at.elapsed());
    std::thread::sleep(wait);
    assert!(
        !lab.udp_reaches(&udp_sock, udp_ext),
        "expired mapping no longer forwards"
    );
    assert!(
        lab.mappings().iter().all(|m| m["internal_port"] != 9000),
        "expired mapping is gone from the API"
    );

    // Restart: kill -9; the kernel keeps forwarding while pcpd is down,
    // and the restarted pcpd keeps the mapping without rewriting it.
    let dnat_before = lab.nft_elements("dnat4");
    lab.stop_pcpd();
    assert!(
        lab.tcp_reaches(&filtered_listener, INET, filtered_ext),
        "forwarding while pcpd is down"
    );
    lab.start_pcpd();
    assert_eq!(lab.nft_elements("dnat4"), dnat_before);
    assert!(
        lab.tcp_reaches(&filtered_listener, INET, filtered_ext),
        "forwarding after restart"
    );
    assert!(
        !lab.tcp_reaches(&filtered_listener, INET_OTHER, filtered_ext),
        "filter kept after restart"
    );
    let (code, renewed, _) = lab.pcp(&pcp_sock, &map_request(3, 6, 8081, 600, &filter));
    assert_eq!(
        (code, renewed),
        (ResultCode::Success, filtered_ext),
        "renewal keeps the port"
    );

    // Someone flushes pcpd's table behind its back: a new mapping cannot be
    // installed, so the client is told NETWORK_FAILURE (RFC 6887 §7.4), not
    // success, and pcpd does not keep it.
    run(&[
        "ip", "netns", "exec", &lab.cgn, "nft", "delete", "table", "ip", "pcpd",
    ]);
    let (code, _, lifetime) = lab.pcp(&pcp_sock, &map_request(4, 6, 8082, 600, &[]));
    assert_eq!(code, ResultCode::NetworkFailure);
    assert_eq!(lifetime, 30, "short-lifetime error");
    assert!(lab.mappings().iter().all(|m| m["internal_port"] != 8082));
    // A restart rebuilds the table from pcpd's state (reconcile).
    lab.stop_pcpd();
    lab.start_pcpd();
    assert!(
        lab.tcp_reaches(&filtered_listener, INET, filtered_ext),
        "reconciled after the flush"
    );
    assert!(!lab.tcp_reaches(&filtered_listener, INET_OTHER, filtered_ext));
    peer_sock.send_to(b"peer", (INET, 7000)).unwrap();
    let (_, seen) = peer_sink
        .recv_from(&mut buf)
        .expect("PEER flow forwarded after reconcile");
    assert_eq!(seen, SocketAddr::V4(peer_ext));
}

/// A datagram from `probe` (on the internet host) to `to`: whether `sock`
/// (on the subscriber) gets it. The same probe socket is one flow, one
/// conntrack entry.
fn udp_flow_alive(probe: &UdpSocket, sock: &UdpSocket, to: SocketAddrV4) -> bool {
    probe.send_to(b"flow", to).unwrap();
    sock.set_read_timeout(Some(PROBE)).unwrap();
    let mut buf = [0u8; 16];
    matches!(sock.recv_from(&mut buf), Ok((4, _)))
}

/// Conntrack follows the mapping: an established inbound UDP flow and TCP
/// connection stop when their mapping is deleted or expires, not when the
/// kernel's conntrack entry times out (days for TCP); other mappings'
/// flows go on. Entries are removed in-process over ctnetlink.
#[test]
fn established_flows_stop_with_their_mapping_delete_and_expiry() {
    let mut lab = Lab::new();
    lab.start_pcpd();
    let client = in_ns(&lab.sub, || UdpSocket::bind((SUB, 0)).unwrap());
    let (udp, keep, short) = in_ns(&lab.sub, || {
        (
            UdpSocket::bind((SUB, 9100)).unwrap(),
            UdpSocket::bind((SUB, 9101)).unwrap(),
            UdpSocket::bind((SUB, 9102)).unwrap(),
        )
    });
    let web = in_ns(&lab.sub, || TcpListener::bind((SUB, 8100)).unwrap());
    let mut ext = Vec::new();
    for (nonce, proto, port, lifetime) in [
        (1, 17, 9100, 600),
        (2, 17, 9101, 600),
        (3, 17, 9102, 2),
        (4, 6, 8100, 600),
    ] {
        let (r, e, _) = lab.pcp(&client, &map_request(nonce, proto, port, lifetime, &[]));
        assert_eq!(r, ResultCode::Success);
        ext.push(e);
    }
    let probe = || in_ns(&lab.inet, || UdpSocket::bind((INET, 0)).unwrap());
    let (p_udp, p_keep, p_short) = (probe(), probe(), probe());
    for (p, s, e) in [
        (&p_udp, &udp, ext[0]),
        (&p_keep, &keep, ext[1]),
        (&p_short, &short, ext[2]),
    ] {
        assert!(
            udp_flow_alive(p, s, e),
            "the flow to {e} runs\n{}",
            lab.log()
        );
    }
    let mut conn = in_ns(&lab.inet, || {
        std::net::TcpStream::connect_timeout(&std::net::SocketAddr::V4(ext[3]), PROBE)
    })
    .expect("TCP through the mapping");
    web.set_nonblocking(false).unwrap();
    let (mut inside, _) = web.accept().unwrap();
    inside.set_read_timeout(Some(PROBE)).unwrap();
    use std::io::{Read, Write};
    conn.write_all(b"one").unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(inside.read(&mut buf).unwrap(), 3);

    // Delete (lifetime 0, §15.1) the UDP 9100 and the TCP mapping.
    for (nonce, proto, port) in [(1, 17, 9100), (4, 6, 8100)] {
        let (r, _, _) = lab.pcp(&client, &map_request(nonce, proto, port, 0, &[]));
        assert_eq!(r, ResultCode::Success);
    }
    assert!(
        !udp_flow_alive(&p_udp, &udp, ext[0]),
        "a deleted mapping's UDP flow stops"
    );
    let _ = conn.write_all(b"two");
    assert!(
        !matches!(inside.read(&mut buf), Ok(n) if n > 0),
        "a deleted mapping's TCP connection stops"
    );
    assert!(
        udp_flow_alive(&p_keep, &keep, ext[1]),
        "another mapping's flow goes on"
    );

    // Expiry (lifetime 2 s) stops its running flow too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while udp_flow_alive(&p_short, &short, ext[2]) {
        assert!(
            Instant::now() < deadline,
            "the flow outlived its mapping's lifetime"
        );
    }
    assert!(
        udp_flow_alive(&p_keep, &keep, ext[1]),
        "and the other one still goes on"
    );
    // The three flows stopped were found in the flow index that
    // conntrack's events keep: the table was walked at most once per
    // shard (2), to build the index at start, never to remove.
    assert!(
        lab.metric("pcpd_conntrack_dumps_total") <= 2.0,
        "{}",
        lab.log()
    );
    assert_eq!(
        lab.metric(r#"pcpd_conntrack_removed_total{via="dump"}"#),
        0.0
    );
    assert!(
        lab.metric(r#"pcpd_conntrack_removed_total{via="index"}"#) >= 3.0,
        "the deleted and expired mappings' flows came from the index"
    );
}
