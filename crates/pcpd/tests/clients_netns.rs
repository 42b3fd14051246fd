//! Where pcpd's datagrams leave on a gateway with a LAN and a WAN side:
//! restart announcements reach the LAN (RFC 6887 §14.1.3, RFC 6886
//! §3.2.1) although the routes point at the WAN, and every reply comes
//! from the address its request was sent to, over IPv4 and IPv6, with
//! several addresses on the interface. The test makes three network
//! namespaces of its own and sends nothing anywhere else:
//!
//! ```text
//!  lan (100.64.0.2, fd00:64::2) ──veth── gw: pcpd ──veth── wan (198.51.100.2, 2001:db8:1::2)
//!       100.64.0.1, .9 | fd00:64::1, ::9      default routes via wan
//! ```
//!
//! Needs root and iproute2 (`.ci/prereqs`; CI runs as root): a missing
//! prerequisite fails the test, it never skips.
#![allow(missing_docs)]

mod common;

use common::ns::{add_namespaces, in_ns, ip};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pcp_wire::{natpmp, OpData, Opcode, Options, Request, ResponseHeader, ResultCode};

const LAN_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 9)];
const LAN_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 9),
];
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 2);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

struct Lab {
    lan: String,
    gw: String,
    wan: String,
    dir: PathBuf,
    pcpd: Option<Child>,
}

impl Lab {
    fn new(name: &str) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            lan: format!("pcpdc-{name}-lan-{pid}"),
            gw: format!("pcpdc-{name}-gw-{pid}"),
            wan: format!("pcpdc-{name}-wan-{pid}"),
            dir: common::temp_dir(&format!("clients-netns-{name}")),
            pcpd: None,
        };
        let (lan, gw, wan) = (lab.lan.as_str(), lab.gw.as_str(), lab.wan.as_str());
        add_namespaces(&[lan, gw, wan]);
        // The WAN side first, so that the kernel's own choice (the routes,
        // the first ff00::/8 entry) is the wrong one.
        for (dev, peer) in [("wan0", wan), ("lan0", lan)] {
            ip(
                gw,
                &[
                    "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", peer,
                ],
            );
        }
        ip(gw, &["addr", "add", "198.51.100.1/24", "dev", "wan0"]);
        ip(
            gw,
            &["addr", "add", "2001:db8:1::1/64", "dev", "wan0", "nodad"],
        );
        for a in LAN_V4 {
            ip(gw, &["addr", "add", &format!("{a}/24"), "dev", "lan0"]);
        }
        for a in LAN_V6 {
            ip(
                gw,
                &["addr", "add", &format!("{a}/64"), "dev", "lan0", "nodad"],
            );
        }
        ip(
            lan,
            &["addr", "add", &format!("{CLIENT_V4}/24"), "dev", "eth0"],
        );
        ip(
            lan,
            &[
                "addr",
                "add",
                &format!("{CLIENT_V6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        ip(wan, &["addr", "add", "198.51.100.2/24", "dev", "eth0"]);
        ip(
            wan,
            &["addr", "add", "2001:db8:1::2/64", "dev", "eth0", "nodad"],
        );
        for (ns, dev) in [(gw, "wan0"), (gw, "lan0"), (lan, "eth0"), (wan, "eth0")] {
            ip(ns, &["link", "set", dev, "up"]);
        }
        ip(gw, &["route", "add", "default", "via", "198.51.100.2"]);
        ip(
            gw,
            &["-6", "route", "add", "default", "via", "2001:db8:1::2"],
        );
        lab
    }

    /// Starts pcpd in `gw` on `listen`, with a one-address pool.
    fn start(&mut self, listen: &[&str]) {
        let mut cfg = common::default_config();
        cfg["listen"] = serde_yaml::to_value(listen).unwrap();
        cfg["state_dir"] = self.dir.join("state").display().to_string().into();
        cfg["pcp"]["pools"]["default"]["prefixes"] =
            serde_yaml::to_value(vec![format!("{EXTERNAL}/32")]).unwrap();
        cfg["pcp"]["subscribers"][0]["prefixes"] =
            serde_yaml::to_value(vec!["100.64.0.0/24", "fd00:64::/64"]).unwrap();
        cfg["pcp"]["unsolicited"]["announce_targets"] =
            serde_yaml::to_value(vec!["224.0.0.1", "ff02::1"]).unwrap();
        let config = self.dir.join("pcpd.yaml");
        std::fs::write(&config, serde_yaml::to_string(&cfg).unwrap()).unwrap();
        self.pcpd = Some(common::ns::spawn_pcpd(&self.gw, &config, &self.dir));
    }

    fn log(&self) -> String {
        common::ns::pcpd_log(&self.dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.pcpd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.lan, &self.gw, &self.wan] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn announce(client: IpAddr) -> Vec<u8> {
    let req = Request {
        lifetime: 0,
        client_addr: client,
        data: OpData::Announce,
        options: Options::NONE,
    };
    let mut buf = vec![0u8; req.buffer_len()];
    req.emit(&mut buf).unwrap();
    buf
}

/// Every datagram `sock` receives within `wait`, with its source.
fn collect(sock: &UdpSocket, wait: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    let end = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 1500];
    while Instant::now() < end {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            out.push((buf[..n].to_vec(), from));
        }
    }
    out
}

/// A restart without state sends ANNOUNCE (PCP, both families) and the
/// NAT-PMP address announcement; the LAN hears all of them from the
/// gateway's LAN address although the default routes point at the WAN.
#[test]
fn restart_announcements_leave_by_the_listen_addresses_interface_section_14_1_3() {
    let mut lab = Lab::new("mc");
    // Listening before pcpd starts (RFC 6886 §3.2.1 clients listen on
    // 5350; every host is in 224.0.0.1 and ff02::1).
    let (v4, v6) = in_ns(&lab.lan, || {
        let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5350)).unwrap();
        let v6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        v6.set_only_v6(true).unwrap();
        v6.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 5350)).into())
            .unwrap();
        (v4, UdpSocket::from(v6))
    });
    // Wildcard sockets: the kernel alone would route the groups to the WAN.
    lab.start(&["0.0.0.0:5351", "[::]:5351"]);
    let heard_v4 = collect(&v4, Duration::from_secs(4));
    let heard_v6 = collect(&v6, Duration::from_secs(1));
    let pcp_v4: Vec<_> = heard_v4.iter().filter(|(p, _)| p[0] == 2).collect();
    let pmp_v4: Vec<_> = heard_v4.iter().filter(|(p, _)| p[0] == 0).collect();
    assert!(
        !pcp_v4.is_empty() && !heard_v6.is_empty(),
        "v4 {heard_v4:?} v6 {heard_v6:?}\n{}",
        lab.log()
    );
    for (p, from) in pcp_v4.iter().copied().chain(&heard_v6) {
        let h = ResponseHeader::parse(p).unwrap();
        assert_eq!(
            (h.opcode, h.result),
            (Opcode::Announce, ResultCode::Success)
        );
        assert!(
            LAN_V4.map(IpAddr::V4).contains(&from.ip())
                || LAN_V6.map(IpAddr::V6).contains(&from.ip()),
            "from a LAN address of the gateway: {from}"
        );
    }
    // NAT-PMP: the gateway's one address, 0, 250, 750, 1750 ms... (≥4 in 4 s).
    assert!(pmp_v4.len() >= 4, "{heard_v4:?}");
    for (p, from) in pmp_v4 {
        assert!(LAN_V4.map(IpAddr::V4).contains(&from.ip()), "{from}");
        match natpmp::Response::parse(p).unwrap() {
            natpmp::Response::PublicAddress { result, addr, .. } => {
                assert_eq!((result, addr), (pcp_wire::NatPmpResult::Success, EXTERNAL));
            }
            other => panic!("{other:?}"),
        }
    }
}

/// With wildcard sockets and two addresses per family on the LAN
/// interface, a reply comes from the address its request went to (a
/// client checks the source, RFC 6887 §8.3; RFC 6886 §3.2).
#[test]
fn replies_come_from_the_address_asked_v4_and_v6() {
    let mut lab = Lab::new("src");
    lab.start(&["0.0.0.0:5351", "[::]:5351"]);
    let targets: Vec<(IpAddr, IpAddr)> = LAN_V4
        .iter()
        .map(|a| (IpAddr::V4(*a), IpAddr::V4(CLIENT_V4)))
        .chain(
            LAN_V6
                .iter()
                .map(|a| (IpAddr::V6(*a), IpAddr::V6(CLIENT_V6))),
        )
        .collect();
    in_ns(&lab.lan, || {
        for (server, client) in &targets {
            let sock = UdpSocket::bind((*client, 0)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let dst = SocketAddr::new(*server, 5351);
            let deadline = Instant::now() + Duration::from_secs(20);
            let (reply, from) = loop {
                sock.send_to(&announce(*client), dst).unwrap();
                let mut buf = [0u8; 1100];
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    break (buf[..n].to_vec(), from);
                }
                assert!(
                    Instant::now() < deadline,
                    "no answer from {dst}\n{}",
                    lab.log()
                );
            };
            assert_eq!(from, dst, "the reply's source");
            let h = ResponseHeader::parse(&reply).unwrap();
            assert_eq!(
                (h.opcode, h.result),
                (Opcode::Announce, ResultCode::Success)
            );
            // NAT-PMP too (IPv4 only).
            if server.is_ipv4() {
                sock.send_to(&[0, 0], dst).unwrap();
                let mut buf = [0u8; 16];
                let (_, from) = sock.recv_from(&mut buf).expect("NAT-PMP answered");
                assert_eq!(from, dst);
            }
        }
    });
}
