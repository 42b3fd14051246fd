//! What deployed clients depend on (issue 16), against the real daemon on
//! loopback: the delete answers some clients read, mapping ids that
//! survive a restart, a host asking from several addresses, and a
//! `--discard-state` that a failed start takes back. Addresses
//! 127.0.0.71-79 are this file's.
#![allow(missing_docs)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use pcp_wire::{MapData, Nonce, OpData, Options, Request, Response, ResponseHeader, ResultCode};

/// A client that works as erlang-nat's `natpcp` documents itself: it finds
/// the gateway with an ANNOUNCE, maps with lifetime 3600 (a fixed and a
/// zero external port), learns its external address from the answer to a
/// lifetime-0 MAP, and deletes with lifetime 0.
struct NatPcpClient {
    sock: UdpSocket,
    /// The client address its requests carry (§8.2: its source).
    me: Ipv4Addr,
    gateway: SocketAddr,
}

impl NatPcpClient {
    fn new(me: Ipv4Addr, gateway: SocketAddr) -> Self {
        let sock = UdpSocket::bind((me, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        NatPcpClient { sock, me, gateway }
    }

    fn exchange(&self, req: &Request<'_>) -> Vec<u8> {
        let mut buf = vec![0u8; req.buffer_len()];
        req.emit(&mut buf).unwrap();
        for _ in 0..3 {
            self.sock.send_to(&buf, self.gateway).unwrap();
            let mut out = [0u8; 1100];
            if let Ok((n, from)) = self.sock.recv_from(&mut out) {
                assert_eq!(from, self.gateway);
                return out[..n].to_vec();
            }
        }
        panic!("no answer from {}", self.gateway);
    }

    /// `discover/0`: a gateway that answers ANNOUNCE with SUCCESS.
    fn discover(&self) -> bool {
        let r = self.exchange(&Request {
            lifetime: 0,
            client_addr: IpAddr::V4(self.me),
            data: OpData::Announce,
            options: Options::NONE,
        });
        ResponseHeader::parse(&r).is_ok_and(|h| h.result == ResultCode::Success)
    }

    fn map(
        &self,
        internal_port: u16,
        external_port: u16,
        lifetime: u32,
    ) -> (ResultCode, IpAddr, u16) {
        let r = self.exchange(&Request {
            lifetime,
            client_addr: IpAddr::V4(self.me),
            data: OpData::Map(MapData {
                nonce: Nonce([0x4e; 12]),
                protocol: 6,
                internal_port,
                external_port,
                external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            }),
            options: Options::NONE,
        });
        let r = Response::parse(&r).unwrap();
        let m = r.data.map_data().unwrap();
        (r.result, m.external_addr.to_canonical(), m.external_port)
    }

    /// `get_external_address/1`: the address in a lifetime-0 MAP's answer;
    /// the unspecified address is the client's error.
    fn external_address(&self) -> Option<IpAddr> {
        let (result, addr, _) = self.map(0, 0, 0);
        (result == ResultCode::Success && !addr.is_unspecified()).then_some(addr)
    }
}

fn start(name: &str, ip: Ipv4Addr, delete_answer: Option<&str>) -> Daemon {
    let dir = temp_dir(name);
    let mut cfg = config_for(ip, &dir);
    if let Some(a) = delete_answer {
        cfg["pcp"]["compatibility"]["delete_answer"] = a.into();
    }
    Daemon::start_in(dir, ip, cfg)
}

/// RFC 6887 §15.1 (the default) copies the request's zero fields into a
/// delete's answer, so such a client learns no address; the compatibility
/// switch answers with the external address, and the deleted endpoint.
#[test]
fn a_client_that_reads_delete_answers_works_only_with_the_switch_section_15_1() {
    for (ip, switch) in [
        (Ipv4Addr::new(127, 0, 0, 71), None),
        (Ipv4Addr::new(127, 0, 0, 72), Some("external")),
    ] {
        let d = start(&format!("natpcp-{}", ip.octets()[3]), ip, switch);
        let client = NatPcpClient::new(Ipv4Addr::new(127, 0, 0, 1), d.pcp_addr());
        assert!(client.discover());
        // Asked before any mapping: the address it will be given.
        let early = client.external_address();
        let (r1, addr1, port1) = client.map(8080, 8080, 3600);
        let (r2, addr2, port2) = client.map(9090, 0, 3600);
        assert_eq!((r1, r2), (ResultCode::Success, ResultCode::Success));
        assert_eq!(addr1, addr2, "paired pooling");
        assert!(port1 != 0 && port2 != 0);
        let learned = client.external_address();
        let (rd, del_addr, del_port) = client.map(8080, 0, 0);
        assert_eq!(rd, ResultCode::Success);
        match switch {
            None => {
                assert_eq!(
                    (early, learned),
                    (None, None),
                    "§15.1 answers copy the request"
                );
                assert_eq!((del_addr.is_unspecified(), del_port), (true, 0));
            }
            Some(_) => {
                assert_eq!(early, Some(addr1), "the promised address is the one given");
                assert_eq!(learned, Some(addr1));
                assert_eq!((del_addr, del_port), (addr1, port1), "the deleted endpoint");
            }
        }
        // The deletes happened either way.
        assert_eq!(client.map(9090, 0, 0).0, ResultCode::Success);
        let (_, list) = call("GET", &d.url("/v1/mappings"), Some(TOKEN_READ), None);
        assert_eq!(list["total"], 0, "{list}");
    }
}

/// An admin-API mapping id names the mapping, not where it sits in memory:
/// the same id before and after a kill -9 and restart, and usable then.
#[test]
fn mapping_ids_are_the_same_after_a_restart() {
    let ip = Ipv4Addr::new(127, 0, 0, 73);
    let mut d = start("ids", ip, None);
    for (port, nonce) in [(8080u16, 1u8), (8081, 2), (8082, 3)] {
        let r = d
            .pcp_exchange(&map_request(nonce, port, 3600, &[]))
            .unwrap();
        assert_eq!(Response::parse(&r).unwrap().result, ResultCode::Success);
    }
    let list = |d: &Daemon| {
        let (s, v) = call("GET", &d.url("/v1/mappings"), Some(TOKEN_READ), None);
        assert_eq!(s, 200, "{v}");
        let mut items: Vec<(String, u64)> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_string(),
                    m["external_port"].as_u64().unwrap(),
                )
            })
            .collect();
        items.sort();
        items
    };
    let before = list(&d);
    assert_eq!(before.len(), 3);
    assert_eq!(before[0].0, "6-127.0.0.1-8080");
    let ids: Vec<String> = before.iter().map(|(id, _)| id.clone()).collect();
    d.kill9_and_restart();
    assert_eq!(list(&d), before, "same ids, same mappings");
    let (s, m) = call(
        "GET",
        &d.url(&format!("/v1/mappings/{}", ids[1])),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!((s, m["internal_port"].as_u64()), (200, Some(8081)), "{m}");
    let (s, _) = call(
        "DELETE",
        &d.url(&format!("/v1/mappings/{}", ids[1])),
        Some(TOKEN_WRITE),
        None,
    );
    assert_eq!(s, 204);
    let (s, _) = call(
        "GET",
        &d.url(&format!("/v1/mappings/{}", ids[1])),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(s, 404);
    let (s, body) = call("GET", &d.url("/v1/mappings/0-1-2"), Some(TOKEN_READ), None);
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("PROTOCOL-ADDR-PORT"),
        "{body}"
    );
}

/// A host with several addresses may ask from any of them (§8.2: the
/// client address must match the source, nothing stricter); each address
/// is its own subscriber. Naming another of its addresses is
/// ADDRESS_MISMATCH.
#[test]
fn a_host_asks_from_any_of_its_addresses_section_8_2() {
    let ip = Ipv4Addr::new(127, 0, 0, 74);
    let d = start("multi", ip, None);
    let mut seen = Vec::new();
    for n in [2u8, 3, 4] {
        let me = Ipv4Addr::new(127, 0, 0, n);
        let client = NatPcpClient::new(me, d.pcp_addr());
        let (r, addr, port) = client.map(8080, 0, 3600);
        assert_eq!(r, ResultCode::Success, "from {me}");
        seen.push((addr, port));
    }
    let (_, list) = call("GET", &d.url("/v1/mappings"), Some(TOKEN_READ), None);
    assert_eq!(list["total"], 3, "{list}");
    // From 127.0.0.3, naming 127.0.0.2: refused (§8.2, NAT detected).
    let mut liar = NatPcpClient::new(Ipv4Addr::new(127, 0, 0, 3), d.pcp_addr());
    liar.me = Ipv4Addr::new(127, 0, 0, 2);
    assert_eq!(liar.map(9000, 0, 3600).0, ResultCode::AddressMismatch);
}

/// `--discard-state` moves the state aside only for a start that happens:
/// a port in use refuses the start before anything moves, and a failure
/// after the move (the PCP port taken) puts the state back.
#[test]
fn a_failed_start_with_discard_state_keeps_the_state() {
    let ip = Ipv4Addr::new(127, 0, 0, 75);
    let dir = temp_dir("discard-undo");
    let cfg = config_for(ip, &dir);
    let mut d = Daemon::start_in(dir.clone(), ip, cfg.clone());
    let r = d.pcp_exchange(&map_request(1, 8080, 3600, &[])).unwrap();
    let granted = Response::parse(&r).unwrap();
    assert_eq!(granted.result, ResultCode::Success);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let state = dir.join("state");
    let aside = || {
        std::fs::read_dir(&state)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("discarded-")
            })
            .count()
    };

    // The admin port is taken: refused before the state is touched.
    let admin = std::net::TcpListener::bind((ip, 8351)).unwrap();
    let err = Daemon::try_start(dir.clone(), ip, cfg.clone(), &["--discard-state"])
        .err()
        .expect("refused");
    assert!(err.contains("admin.listen"), "{err}");
    assert_eq!(aside(), 0, "nothing moved");
    drop(admin);

    // The PCP port is taken (no SO_REUSEPORT): the state was moved, then
    // comes back.
    let udp = UdpSocket::bind((ip, 5351)).unwrap();
    let err = Daemon::try_start(dir.clone(), ip, cfg.clone(), &["--discard-state"])
        .err()
        .expect("refused");
    assert!(err.contains("UDP"), "{err}");
    assert!(err.contains("discarded state is back"), "{err}");
    assert_eq!(aside(), 0, "put back");
    drop(udp);

    // A plain start finds the mapping, same endpoint, same epoch.
    d.restart_after_exit();
    let bytes = d.pcp_exchange(&map_request(1, 8080, 3600, &[])).unwrap();
    let again = Response::parse(&bytes).unwrap();
    assert_eq!(
        again.data.map_data().unwrap().external_port,
        granted.data.map_data().unwrap().external_port
    );
    assert!(again.epoch >= granted.epoch, "the epoch continues (§8.5)");
}
