//! The real daemon on loopback: PCP and NAT-PMP over UDP, the admin API
//! over HTTP and HTTPS, metrics, reload, and real clients written by others.
#![allow(missing_docs)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use common::*;
use pcp_wire::{natpmp, OpData, PcpOption, Response, ResponseHeader, ResultCode};
use serde_json::Value;

#[test]
fn every_opcode_and_error_path_over_udp() {
    let d = Daemon::on_default("udp", Ipv4Addr::new(127, 0, 0, 11));
    // ANNOUNCE (§14.1.2).
    let r = d
        .pcp_exchange(&announce_request(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        .unwrap();
    let h = ResponseHeader::parse(&r).unwrap();
    assert_eq!(
        (h.opcode, h.result, h.lifetime),
        (pcp_wire::Opcode::Announce, ResultCode::Success, 0)
    );
    // MAP create and renew (§11.3).
    let desc = [PcpOption::Description("web")];
    let r1 = d.pcp_exchange(&map_request(1, 8080, 3600, &desc)).unwrap();
    let m1 = Response::parse(&r1).unwrap();
    assert_eq!(m1.result, ResultCode::Success);
    assert_eq!(m1.lifetime, 3600);
    assert_eq!(m1.options.iter().collect::<Vec<_>>(), desc.to_vec());
    let r2 = Response::parse(&d.pcp_exchange(&map_request(1, 8080, 3600, &[])).unwrap())
        .unwrap()
        .data;
    assert_eq!(
        r2.map_data().unwrap().external_port,
        m1.data.map_data().unwrap().external_port
    );
    // Wrong nonce (§11.3).
    let bad = d.pcp_exchange(&map_request(2, 8080, 3600, &[])).unwrap();
    assert_eq!(
        ResponseHeader::parse(&bad).unwrap().result,
        ResultCode::NotAuthorized
    );
    // PEER (§12).
    let peer = pcp_wire::Request {
        lifetime: 600,
        client_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        data: OpData::Peer(pcp_wire::PeerData {
            map: pcp_wire::MapData {
                nonce: pcp_wire::Nonce([3; 12]),
                protocol: 17,
                internal_port: 5000,
                external_port: 0,
                external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            },
            remote_port: 443,
            remote_addr: "198.51.100.7".parse().unwrap(),
        }),
        options: pcp_wire::Options::NONE,
    };
    let mut buf = [0u8; 1100];
    let n = peer.emit(&mut buf).unwrap();
    let pb = d.pcp_exchange(&buf[..n]).unwrap();
    let p = Response::parse(&pb).unwrap();
    assert_eq!(p.result, ResultCode::Success);
    // Delete (§15.1).
    let db = d.pcp_exchange(&map_request(1, 8080, 0, &[])).unwrap();
    let del = Response::parse(&db).unwrap();
    assert_eq!((del.result, del.lifetime), (ResultCode::Success, 0));
    // Unsupported version: UNSUPP_VERSION with version 2 (§9).
    let mut v3 = map_request(1, 1, 1, &[]);
    v3[0] = 3;
    let r = d.pcp_exchange(&v3).unwrap();
    assert_eq!((r[0], r[3]), (2, u8::from(ResultCode::UnsuppVersion)));
    // Unknown opcode: UNSUPP_OPCODE with the payload copied (§8.2).
    let mut op = announce_request(IpAddr::V4(Ipv4Addr::LOCALHOST));
    op[1] = 7;
    op.extend_from_slice(&[9, 9, 9, 9]);
    let r = d.pcp_exchange(&op).unwrap();
    assert_eq!(
        (r.len(), r[1], r[3]),
        (28, 0x87, u8::from(ResultCode::UnsuppOpcode))
    );
    // Not a multiple of 4: MALFORMED_REQUEST.
    let mut odd = announce_request(IpAddr::V4(Ipv4Addr::LOCALHOST));
    odd.push(0);
    assert_eq!(
        d.pcp_exchange(&odd).unwrap()[3],
        u8::from(ResultCode::MalformedRequest)
    );
    // Over 1100 octets: MALFORMED_REQUEST with the first 1100 copied
    // (§8.2), whichever shard's socket the kernel picks (fresh source ports).
    for _ in 0..8 {
        let mut big = map_request(1, 8081, 3600, &[]);
        big.resize(1200, 0);
        let r = d.pcp_exchange(&big).unwrap();
        assert_eq!(
            (r.len(), r[3]),
            (1100, u8::from(ResultCode::MalformedRequest))
        );
    }
    // Client address not the source: ADDRESS_MISMATCH (§8.2).
    let r = d
        .pcp_exchange(&announce_request("127.0.0.99".parse().unwrap()))
        .unwrap();
    assert_eq!(r[3], u8::from(ResultCode::AddressMismatch));
    // Silently dropped: 1 octet, R bit set (§8.2).
    assert!(d.pcp_exchange(&[2]).is_none());
    let mut resp = announce_request(IpAddr::V4(Ipv4Addr::LOCALHOST));
    resp[1] |= 0x80;
    assert!(d.pcp_exchange(&resp).is_none());
    // NAT-PMP on the same port (RFC 6886).
    let r = natpmp::Response::parse(&d.pcp_exchange(&[0, 0]).unwrap()).unwrap();
    let natpmp::Response::PublicAddress { result, addr, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(result, pcp_wire::NatPmpResult::Success);
    assert_eq!(addr.octets()[..3], [192, 0, 2]);

    // Every answer is counted.
    std::thread::sleep(Duration::from_millis(700));
    let text = d.metrics_text();
    assert!(
        metric(
            &text,
            r#"pcpd_responses_total{opcode="map",result="SUCCESS"}"#
        )
        .unwrap()
            >= 3.0
    );
    assert_eq!(
        metric(
            &text,
            r#"pcpd_responses_total{opcode="map",result="NOT_AUTHORIZED"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"pcpd_responses_total{opcode="peer",result="SUCCESS"}"#
        ),
        Some(1.0)
    );
    assert!(metric(&text, r#"pcpd_drops_total{reason="not_request"}"#).unwrap() >= 1.0);
    assert!(metric(&text, r#"pcpd_drops_total{reason="too_short"}"#).unwrap() >= 1.0);
    assert_eq!(
        metric(&text, r#"pcpd_build_info{version="0.1.0"}"#),
        Some(1.0)
    );
    assert_eq!(metric(&text, "pcpd_ready"), Some(1.0));
    // The kernel steered every datagram to its owner shard (reuseport BPF):
    // from fresh source ports, without it about half would be handed off.
    assert_eq!(metric(&text, "pcpd_handoffs_total"), Some(0.0));
    assert!(metric(&text, "pcpd_request_duration_seconds_count").unwrap() >= 10.0);
    assert!(metric(&text, r#"pcpd_pool_blocks_allocated{pool="default"}"#).unwrap() >= 1.0);
    let mappings: f64 = parse_metrics(&text)
        .iter()
        .filter(|(s, _)| s.starts_with("pcpd_mappings{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(mappings, 1.0, "the PEER mapping is left");
    assert!(metric(&text, r#"pcpd_dataplane_changes_total{result="ok"}"#).unwrap() >= 4.0);
    // The NAT event log has the block allocation and the mapping events.
    let events = nat_events(&d, |e| e.iter().any(|e| e["event"] == "mapping_delete"));
    let log = format!("{events:?}");
    assert!(events.iter().any(|e| e["natEvent"] == 16), "{log}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "mapping_create" && e["natEvent"] == 8),
        "{log}"
    );
    assert!(
        events.iter().any(|e| e["event"] == "mapping_delete"),
        "{log}"
    );
}

#[test]
fn admin_api_auth_errors_and_operations() {
    let ip = Ipv4Addr::new(127, 0, 0, 12);
    let d = Daemon::on_default("api", ip);
    // Public endpoints.
    assert_eq!(call("GET", &d.url("/healthz"), None, None).0, 200);
    assert_eq!(call("GET", &d.url("/readyz"), None, None).0, 200);
    let (s, doc) = call("GET", &d.url("/v1/openapi.json"), None, None);
    assert_eq!(s, 200);
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    // Auth refusals: 401 without or with an unknown token, 403 for read scope on writes.
    let (s, body) = call("GET", &d.url("/v1/mappings"), None, None);
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    assert_eq!(
        call("GET", &d.url("/v1/mappings"), Some("nope"), None).0,
        401
    );
    let (s, body) = call(
        "POST",
        &d.url("/v1/mappings"),
        Some(TOKEN_READ),
        Some(serde_json::json!({})),
    );
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    assert_eq!(
        call("GET", &d.url("/v1/pools"), Some(TOKEN_READ), None).0,
        200
    );
    // 404 and 422 with JSON bodies.
    let (s, body) = call("GET", &d.url("/v1/nothing"), Some(TOKEN_READ), None);
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (s, body) = call(
        "GET",
        &d.url("/v1/mappings?limit=0"),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    assert_eq!(
        call(
            "GET",
            &d.url("/v1/mappings?bogus=1"),
            Some(TOKEN_READ),
            None
        )
        .0,
        400
    );
    assert_eq!(
        call(
            "GET",
            &d.url("/v1/subscribers/not-an-ip"),
            Some(TOKEN_READ),
            None
        )
        .0,
        400
    );
    let (s, _) = call(
        "POST",
        &d.url("/v1/mappings"),
        Some(TOKEN_WRITE),
        Some(serde_json::json!({"internal_addr": "127.0.0.5"})),
    );
    assert_eq!(s, 400, "missing fields");
    let (s, body) = call(
        "POST",
        &d.url("/v1/mappings"),
        Some(TOKEN_WRITE),
        Some(
            serde_json::json!({"internal_addr": "198.18.0.1", "protocol": "tcp", "internal_port": 22}),
        ),
    );
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (422, Some("not_a_subscriber"))
    );

    // A static mapping: create, list, get, filter, conflict, delete.
    let (s, m) = call(
        "POST",
        &d.url("/v1/mappings"),
        Some(TOKEN_WRITE),
        Some(
            serde_json::json!({"internal_addr": "127.0.0.5", "protocol": "tcp", "internal_port": 22}),
        ),
    );
    assert_eq!(s, 201, "{m}");
    assert_eq!(m["kind"]["type"], "static");
    let id = m["id"].as_str().unwrap().to_string();
    let (s, _) = call(
        "POST",
        &d.url("/v1/mappings"),
        Some(TOKEN_WRITE),
        Some(
            serde_json::json!({"internal_addr": "127.0.0.5", "protocol": "tcp", "internal_port": 22}),
        ),
    );
    assert_eq!(s, 409);
    let (s, got) = call(
        "GET",
        &d.url(&format!("/v1/mappings/{id}")),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(
        (s, got["external_port"].clone()),
        (200, m["external_port"].clone())
    );
    let (_, list) = call(
        "GET",
        &d.url("/v1/mappings?subscriber=127.0.0.5&protocol=tcp"),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(list["total"], 1);
    let (_, list) = call(
        "GET",
        &d.url("/v1/mappings?protocol=udp"),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(list["total"], 0);
    // PCP sees the static mapping (§11.3 item 2): lifetime 2^32-1.
    let (s, sub) = call(
        "GET",
        &d.url("/v1/subscribers/127.0.0.5"),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(sub["blocks"].as_array().unwrap().len(), 1);
    assert_eq!(
        call(
            "GET",
            &d.url("/v1/subscribers/127.0.0.6"),
            Some(TOKEN_READ),
            None
        )
        .0,
        404
    );
    // Who held the external port now.
    let ext = format!(
        "{}:{}",
        m["external_addr"].as_str().unwrap(),
        m["external_port"]
    );
    let (s, who) = call(
        "GET",
        &d.url(&format!("/v1/lookup?external={ext}")),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(
        (s, who["internal_addr"].as_str()),
        (200, Some("127.0.0.5")),
        "{who}"
    );
    let (s, _) = call(
        "GET",
        &d.url(&format!(
            "/v1/lookup?external={ext}&at=2001-01-01T00:00:00Z"
        )),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(s, 404);
    assert_eq!(
        call(
            "GET",
            &d.url(&format!("/v1/lookup?external={ext}&at=yesterday")),
            Some(TOKEN_READ),
            None
        )
        .0,
        400
    );
    // Pools.
    let (_, pools) = call("GET", &d.url("/v1/pools"), Some(TOKEN_READ), None);
    assert_eq!(pools["pools"][0]["blocks_allocated"], 1);
    // Drain moves the mapping to another address.
    let (s, dr) = call(
        "POST",
        &d.url("/v1/pools/drain"),
        Some(TOKEN_WRITE),
        Some(serde_json::json!({"address": m["external_addr"]})),
    );
    assert_eq!(s, 200, "{dr}");
    let (_, list) = call(
        "GET",
        &d.url("/v1/mappings?subscriber=127.0.0.5"),
        Some(TOKEN_READ),
        None,
    );
    assert_ne!(list["items"][0]["external_addr"], m["external_addr"]);
    let moved_id = list["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        call(
            "POST",
            &d.url("/v1/pools/undrain"),
            Some(TOKEN_WRITE),
            Some(serde_json::json!({"address": m["external_addr"]}))
        )
        .0,
        200
    );
    assert_eq!(
        call(
            "POST",
            &d.url("/v1/pools/drain"),
            Some(TOKEN_WRITE),
            Some(serde_json::json!({"address": "10.0.0.1"}))
        )
        .0,
        404
    );
    // Delete, then 404.
    assert_eq!(
        call(
            "DELETE",
            &d.url(&format!("/v1/mappings/{moved_id}")),
            Some(TOKEN_WRITE),
            None
        )
        .0,
        204
    );
    assert_eq!(
        call(
            "DELETE",
            &d.url(&format!("/v1/mappings/{moved_id}")),
            Some(TOKEN_WRITE),
            None
        )
        .0,
        404
    );
    assert_eq!(
        call(
            "DELETE",
            &d.url("/v1/mappings/x-y"),
            Some(TOKEN_WRITE),
            None
        )
        .0,
        400
    );
}

#[test]
fn reload_by_api_and_sighup_without_dropping_mappings() {
    let ip = Ipv4Addr::new(127, 0, 0, 13);
    let dir = temp_dir("reload");
    let cfg = config_for(ip, &dir);
    let d = Daemon::start_in(dir, ip, cfg.clone());
    // (lifetime, opcode data) of a MAP renewal.
    let granted = |d: &Daemon| {
        let bytes = d.pcp_exchange(&map_request(1, 9000, 50_000, &[])).unwrap();
        let r = Response::parse(&bytes).unwrap();
        assert_eq!(r.result, ResultCode::Success);
        (r.lifetime, r.data)
    };
    let before = granted(&d);
    assert_eq!(before.0, 50_000);
    // Shorter max lifetime: applied, the mapping keeps its port.
    let mut c2 = cfg.clone();
    c2["pcp"]["lifetimes"]["max"] = 600.into();
    std::fs::write(&d.config_path, serde_yaml::to_string(&c2).unwrap()).unwrap();
    let (s, body) = call("POST", &d.url("/v1/reload"), Some(TOKEN_WRITE), None);
    assert_eq!(s, 200, "{body}");
    let after = granted(&d);
    assert_eq!(after.0, 600);
    assert_eq!(after.1, before.1, "same external endpoint");
    // A pool change would strand mappings: 409 with a clear message.
    let mut c3 = c2.clone();
    c3["pcp"]["pools"]["default"]["block_size"] = 256.into();
    std::fs::write(&d.config_path, serde_yaml::to_string(&c3).unwrap()).unwrap();
    let (s, body) = call("POST", &d.url("/v1/reload"), Some(TOKEN_WRITE), None);
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (409, Some("reload_would_strand"))
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("pcp.pools"));
    // An invalid file: 422 naming the path.
    std::fs::write(&d.config_path, "pcp: {pools: 7}\n").unwrap();
    let (s, body) = call("POST", &d.url("/v1/reload"), Some(TOKEN_WRITE), None);
    assert_eq!(s, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pcp.pools"),
        "{body}"
    );
    // SIGHUP applies a valid file the same way.
    let mut c4 = cfg.clone();
    c4["pcp"]["lifetimes"]["max"] = 900.into();
    std::fs::write(&d.config_path, serde_yaml::to_string(&c4).unwrap()).unwrap();
    d.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if granted(&d).0 == 900 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP reload not applied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, list) = call("GET", &d.url("/v1/mappings"), Some(TOKEN_READ), None);
    assert_eq!(list["total"], 1, "nothing dropped");
}

fn self_signed(
    dir: &std::path::Path,
    ip: Ipv4Addr,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec![ip.to_string()]).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    (c, k, cert.cert.der().to_vec())
}

#[test]
fn https_admin_api_with_rustls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ip = Ipv4Addr::new(127, 0, 0, 14);
    let dir = temp_dir("tls");
    let (cert, key, der) = self_signed(&dir, ip);
    let mut cfg = config_for(ip, &dir);
    cfg["admin"]["allow_plaintext_on_loopback"] = false.into();
    cfg["admin"]["tls"] =
        serde_yaml::to_value(serde_json::json!({"cert": cert, "key": key})).unwrap();
    let d = Daemon::start_in(dir, ip, cfg);
    assert_eq!(d.scheme, "https");
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
            ureq::tls::Certificate::from_der(&der).to_owned(),
        ])))
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .get(&d.url("/v1/pools"))
        .header("Authorization", &format!("Bearer {TOKEN_READ}"))
        .call()
        .expect("HTTPS works");
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(body["pools"][0]["name"], "default");
    let r = agent.get(&d.url("/v1/pools")).call().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Plain HTTP to the TLS port is not served.
    let plain = agent.get(&format!("http://{ip}:8351/v1/pools")).call();
    assert!(plain.is_err() || plain.unwrap().status().as_u16() >= 400);
}

#[test]
fn natpmpc_from_debian_maps_a_port() {
    // CI installs natpmpc (.ci/run); a missing tool is a failure, not a skip.
    let ip = Ipv4Addr::new(127, 0, 0, 15);
    let d = Daemon::on_default("natpmpc", ip);
    let out = Command::new("natpmpc")
        .args(["-g", &ip.to_string(), "-a", "0", "8080", "tcp", "600"])
        .output()
        .expect("natpmpc is installed (apt-get install natpmpc)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("Mapped public port"))
        .unwrap_or_else(|| panic!("{text}"));
    // "Mapped public port 1234 protocol TCP to local port 8080 liftime 600"
    let words: Vec<&str> = line.split_whitespace().collect();
    let port: u16 = words[3].parse().unwrap();
    assert_eq!(
        (words[5], words[9], words[11]),
        ("TCP", "8080", "600"),
        "{line}"
    );
    let (_, list) = call(
        "GET",
        &d.url("/v1/mappings?protocol=tcp"),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["items"][0]["external_port"], port);
    assert_eq!(list["items"][0]["internal_port"], 8080);
    assert_eq!(list["items"][0]["natpmp"], true);
    let out = Command::new("natpmpc")
        .args(["-g", &ip.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Public IP address : 192.0.2."), "{text}");
}

#[test]
fn crab_nat_maps_over_pcp() {
    let ip = Ipv4Addr::new(127, 0, 0, 16);
    let d = Daemon::on_default("crab", ip);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mapping = rt
        .block_on(crab_nat::PortMapping::new(
            ip.into(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            crab_nat::InternetProtocol::Udp,
            std::num::NonZeroU16::new(7777).unwrap(),
            crab_nat::PortMappingOptions {
                lifetime_seconds: Some(300),
                ..Default::default()
            },
        ))
        .expect("crab_nat gets a mapping");
    assert!(
        matches!(
            mapping.mapping_type(),
            crab_nat::PortMappingType::Pcp { .. }
        ),
        "PCP, not NAT-PMP"
    );
    assert_eq!(mapping.lifetime(), 300);
    let (_, list) = call(
        "GET",
        &d.url("/v1/mappings?protocol=udp"),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(
        list["items"][0]["external_port"],
        mapping.external_port().get()
    );
    assert_eq!(list["items"][0]["natpmp"], false);
    rt.block_on(mapping.try_drop())
        .map_err(|(e, _)| e)
        .expect("crab_nat deletes it");
    let (_, list) = call("GET", &d.url("/v1/mappings"), Some(TOKEN_READ), None);
    assert_eq!(list["total"], 0);
}

#[test]
fn check_config_and_print_default_config() {
    let dir = temp_dir("check");
    let good = dir.join("good.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_pcpd"))
        .arg("print-default-config")
        .output()
        .unwrap();
    std::fs::write(&good, &out.stdout).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pcpd"))
        .args(["check-config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (1 pools"));
    let bad = dir.join("bad.yaml");
    let text = String::from_utf8(std::fs::read(&good).unwrap())
        .unwrap()
        .replace("block_size: 512", "block_size: 0")
        .replace("scope: write", "scope: admin");
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pcpd"))
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.tokens[0].scope") && err.contains("line "),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deploy_examples_pass_check_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let dir = temp_dir("deploy");
    let (cert, key, _) = self_signed(&dir, Ipv4Addr::LOCALHOST);
    // check-config on a copy of `text`: success, and what it printed.
    let check = |name: &str, text: &str| {
        let copy = dir.join(name);
        std::fs::write(&copy, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_pcpd"))
            .arg("check-config")
            .arg(&copy)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), said)
    };
    let mut seen = std::collections::BTreeMap::new();
    let load =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../loadtest/pcpd-load.yaml");
    let paths = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .chain([load]);
    for path in paths {
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        // TLS files live under /etc/pcpd/tls on a real node; point at test ones.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/etc/pcpd/tls/admin.crt", &cert.display().to_string())
            .replace("/etc/pcpd/tls/admin.key", &key.display().to_string())
            .replace("/etc/pcpd/tls/clients-ca.crt", &cert.display().to_string());
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let (ok, out) = check(&name, &text);
        assert!(ok, "{}: {out}", path.display());
        seen.insert(name, text);
    }
    assert!(
        seen.len() >= 5,
        "small ISP, deterministic NAT, NAT64 and IPv6 firewall examples, and the load test's config: {:?}",
        seen.keys()
    );
    // A firewall class names no pool (RFC 6887 §3: external = internal).
    let firewall = &seen["ipv6-firewall.yaml"];
    let with_pool = firewall.replace(
        "      kind: firewall\n",
        "      kind: firewall\n      pool: public\n",
    );
    let (ok, out) = check("pool.yaml", &with_pool);
    assert!(
        !ok && out.contains("pcp.subscribers[1].pool: a firewall class has no pool"),
        "{out}"
    );
    // An IPv6 NAT class (NAT64) cannot run on nftables: Linux has no NAT64.
    let on_nft = seen["nat64.yaml"].replace(
        "shards: 0\n",
        "shards: 0\ndataplane: { backend: nftables }\n",
    );
    let (ok, out) = check("nat64-nft.yaml", &on_nft);
    assert!(
        !ok && out.contains("pcp.subscribers[0].prefixes[0]") && out.contains("no NAT64"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn admin_api_can_require_client_certificates() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ip = Ipv4Addr::new(127, 0, 0, 17);
    let dir = temp_dir("mtls");
    let (cert, key, server_der) = self_signed(&dir, ip);
    // A client CA and a client certificate it signed.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = rcgen::CertificateParams::new(vec!["noc.example".to_string()])
        .unwrap()
        .signed_by(&client_key, &rcgen::Issuer::new(ca_params, ca_key))
        .unwrap();
    let ca_path = dir.join("clients-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let mut cfg = config_for(ip, &dir);
    cfg["admin"]["allow_plaintext_on_loopback"] = false.into();
    cfg["admin"]["tls"] =
        serde_yaml::to_value(serde_json::json!({"cert": cert, "key": key, "client_ca": ca_path}))
            .unwrap();
    let d = Daemon::start_in(dir, ip, cfg);
    let roots = ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
        ureq::tls::Certificate::from_der(&server_der).to_owned(),
    ]));
    // Without a client certificate the handshake is refused.
    let anon: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(roots.clone())
                .build(),
        )
        .http_status_as_error(false)
        .build()
        .into();
    assert!(anon
        .get(&d.url("/v1/pools"))
        .header("Authorization", &format!("Bearer {TOKEN_READ}"))
        .call()
        .is_err());
    // With one signed by the configured CA (and a token) it works.
    let key_pem = client_key.serialize_pem();
    let private_key = ureq::tls::parse_pem(key_pem.as_bytes())
        .find_map(|item| match item {
            Ok(ureq::tls::PemItem::PrivateKey(k)) => Some(k.to_owned()),
            _ => None,
        })
        .expect("client key PEM");
    let identity = ureq::tls::ClientCert::new_with_certs(
        &[ureq::tls::Certificate::from_der(client.der()).to_owned()],
        private_key,
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(roots)
                .client_cert(Some(identity))
                .build(),
        )
        .http_status_as_error(false)
        .build()
        .into();
    let r = agent
        .get(&d.url("/v1/pools"))
        .header("Authorization", &format!("Bearer {TOKEN_READ}"))
        .call()
        .expect("mTLS works");
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn log_lines_to_a_file_carry_no_colour_codes() {
    let ip = Ipv4Addr::new(127, 0, 0, 19);
    let d = Daemon::on_default("plainlog", ip);
    // The development token's warning is always logged (PCPD_LOG=warn).
    let log = std::fs::read_to_string(d.dir.join("stderr.log")).unwrap();
    assert!(log.contains("WARN"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI escapes in a log file: {log:?}");
}

#[test]
fn debug_log_has_one_line_per_answer_with_its_result_and_no_nonce() {
    let ip = Ipv4Addr::new(127, 0, 0, 18);
    let dir = temp_dir("debuglog");
    let cfg = config_for(ip, &dir);
    let env = [("PCPD_LOG", "warn,pcpd::shard=debug")];
    let d = Daemon::try_start_env(dir, ip, cfg, &[], &env).unwrap();
    let reply = d.pcp_exchange(&map_request(0xab, 9000, 600, &[])).unwrap();
    assert_eq!(Response::parse(&reply).unwrap().result, ResultCode::Success);
    let bad = d.pcp_exchange(&map_request(0xcd, 9000, 600, &[])).unwrap();
    assert_eq!(
        Response::parse(&bad).unwrap().result,
        ResultCode::NotAuthorized
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = std::fs::read_to_string(d.dir.join("stderr.log")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("answered") && l.contains("opcode=\"MAP\""))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("result=\"SUCCESS\"") && l.contains("lifetime=600")),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("result=\"NOT_AUTHORIZED\"")),
        "{log}"
    );
    assert!(
        !log.contains("abababab") && !log.contains("cdcdcdcd"),
        "a nonce in the log: {log}"
    );
}

/// A firewall class through the admin API and the NAT event log: a static
/// pinhole's external endpoint is its internal one (RFC 6887 §3), the
/// subscriber is shown as a firewall subscriber with no block, and the log
/// says `pinhole_open` / `pinhole_close` without a NAT event code.
#[test]
fn static_pinholes_through_the_admin_api_and_the_event_log() {
    let ip = Ipv4Addr::new(127, 0, 0, 10);
    let dir = temp_dir("pinholes-api");
    let mut cfg = config_for(ip, &dir);
    let profile = cfg["pcp"]["subscribers"][0]["profile"].clone();
    let class = serde_yaml::to_value(serde_json::json!({
        "prefixes": ["fd00:f00::/64"], "kind": "firewall", "profile": profile,
    }))
    .unwrap();
    cfg["pcp"]["subscribers"]
        .as_sequence_mut()
        .unwrap()
        .push(class);
    let d = Daemon::start_in(dir, ip, cfg);
    let body = serde_json::json!({"internal_addr": "fd00:f00::5", "protocol": "udp", "internal_port": 3478});
    let (s, m) = call(
        "POST",
        &d.url("/v1/mappings"),
        Some(TOKEN_WRITE),
        Some(body),
    );
    assert_eq!(s, 201, "{m}");
    assert_eq!(
        (&m["external_addr"], &m["external_port"], &m["firewall"]),
        (
            &serde_json::json!("fd00:f00::5"),
            &serde_json::json!(3478),
            &serde_json::json!(true)
        ),
        "{m}"
    );
    let id = m["id"].as_str().unwrap().to_string();
    let (s, got) = call(
        "GET",
        &d.url(&format!("/v1/mappings/{id}")),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(
        (s, &got["external_addr"]),
        (200, &m["external_addr"]),
        "{got}"
    );
    let (s, usage) = call(
        "GET",
        &d.url("/v1/subscribers/fd00:f00::5"),
        Some(TOKEN_READ),
        None,
    );
    assert_eq!(s, 200, "{usage}");
    assert_eq!(usage["firewall"], true, "{usage}");
    assert_eq!(usage["blocks"], serde_json::json!([]), "{usage}");
    let (s, _) = call(
        "DELETE",
        &d.url(&format!("/v1/mappings/{id}")),
        Some(TOKEN_WRITE),
        None,
    );
    assert_eq!(s, 204);
    let events = nat_events(&d, |e| e.iter().any(|e| e["event"] == "pinhole_close"));
    let log = format!("{events:?}");
    let open = events.iter().find(|e| e["event"] == "pinhole_open");
    assert!(
        open.is_some_and(|e| e["sourceAddress"] == "fd00:f00::5" && e.get("natEvent").is_none()),
        "{log}"
    );
    assert!(
        events.iter().any(|e| e["event"] == "pinhole_close"),
        "{log}"
    );
}
