//! `pcpctl` against a real pcpd on loopback (127.0.0.77 plain, 127.0.0.78
//! HTTPS): every command, its table and `--json` forms, the token from the
//! environment or a file, and the exit codes scripts rely on.
#![allow(missing_docs)]

mod common;

use std::net::Ipv4Addr;
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

/// pcpctl with `args`, the URL of `d`, and `token` in PCPD_TOKEN (if any).
fn pcpctl(d: &Daemon, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pcpctl"));
    c.env_remove("PCPD_TOKEN")
        .env_remove("PCPD_TOKEN_FILE")
        .env("PCPD_URL", d.url(""))
        .args(args);
    if let Some(t) = token {
        c.env("PCPD_TOKEN", t);
    }
    c.output().expect("pcpctl runs")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(o), String::from_utf8_lossy(&o.stderr)))
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// A PCP MAP from `ip`, so there is a dynamic mapping to list.
fn map_from(d: &Daemon, ip: Ipv4Addr, port: u16) {
    assert_eq!(
        pcp_map(d, ip, 6, port, 3600, 7),
        pcp_wire::ResultCode::Success
    );
}

#[test]
fn every_command_against_a_real_pcpd() {
    let ip = Ipv4Addr::new(127, 0, 0, 77);
    let d = Daemon::on_default("pcpctl", ip);
    map_from(&d, ip, 8080);

    // health needs no token; exit 0 when ready.
    let h = pcpctl(&d, None, &["health"]);
    assert_eq!(code(&h), 0, "{}", text(&h));
    assert!(text(&h).contains("ready: yes"));

    // The list as a table, and as JSON.
    let t = pcpctl(&d, Some(TOKEN_READ), &["mappings", "list"]);
    assert_eq!(code(&t), 0);
    let out = text(&t);
    let id = format!("6-{ip}-8080");
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.contains(&id) && out.contains("tcp"), "{out}");
    assert!(out.trim_end().ends_with("1 of 1 (offset 0)"), "{out}");
    let j = json(&pcpctl(
        &d,
        Some(TOKEN_READ),
        &[
            "--json",
            "mappings",
            "list",
            "--subscriber",
            &ip.to_string(),
        ],
    ));
    assert_eq!(j["total"], 1);
    let external = j["items"][0]["external_addr"].as_str().unwrap().to_string();
    let ext_port = j["items"][0]["external_port"].as_u64().unwrap();

    // get, subscriber, pools, lookup.
    let g = json(&pcpctl(
        &d,
        Some(TOKEN_READ),
        &["mappings", "get", &id, "--json"],
    ));
    assert_eq!(g["id"], id.as_str());
    let s = text(&pcpctl(
        &d,
        Some(TOKEN_READ),
        &["subscriber", &ip.to_string()],
    ));
    assert!(s.contains("mappings     1 of"), "{s}");
    let p = text(&pcpctl(&d, Some(TOKEN_READ), &["pools"]));
    assert!(p.starts_with("POOL") && p.contains("default"), "{p}");
    let l = pcpctl(
        &d,
        Some(TOKEN_READ),
        &["lookup", &format!("{external}:{ext_port}")],
    );
    assert_eq!(code(&l), 0, "{}", String::from_utf8_lossy(&l.stderr));
    assert!(text(&l).contains(&ip.to_string()), "{}", text(&l));
    // The same question answered from the NAT event log, as for a
    // lawful request older than pcpd's retained history.
    nat_events(&d, |e| {
        e.iter().any(|e| e["event"] == "port_block_allocation")
    });
    let log = d.dir.join("state/nat-events.jsonl").display().to_string();
    let target = format!("{external}:{ext_port}");
    let from_logs = json(&pcpctl(
        &d,
        None,
        &["lookup", &target, "--logs", &log, "--json"],
    ));
    assert_eq!(from_logs["internal_addr"], ip.to_string(), "{from_logs}");
    assert_eq!(from_logs["source"], "logs");
    let before = pcpctl(
        &d,
        None,
        &[
            "lookup",
            &target,
            "--at",
            "2000-01-01T00:00:00Z",
            "--logs",
            &log,
        ],
    );
    assert_eq!(code(&before), 3, "nobody held it in 2000");

    // Writes need the write token: a read token is refused (exit 4) ...
    let refused = pcpctl(
        &d,
        Some(TOKEN_READ),
        &["mappings", "create", "127.0.0.79:22"],
    );
    assert_eq!(
        code(&refused),
        4,
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("scope write"));
    // ... the write token, from a file, creates; a second create conflicts (1).
    let dir = temp_dir("pcpctl-token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN_WRITE}\n")).unwrap();
    let tf = token_file.display().to_string();
    let c = pcpctl(
        &d,
        None,
        &[
            "--token-file",
            &tf,
            "--json",
            "mappings",
            "create",
            "127.0.0.79:22",
        ],
    );
    assert_eq!(code(&c), 0, "{}", String::from_utf8_lossy(&c.stderr));
    let created = json(&c);
    assert_eq!(created["kind"]["type"], "static");
    let again = pcpctl(
        &d,
        None,
        &["--token-file", &tf, "mappings", "create", "127.0.0.79:22"],
    );
    assert_eq!(code(&again), 1);
    assert!(String::from_utf8_lossy(&again.stderr).contains("mapping_exists"));
    let static_id = created["id"].as_str().unwrap();
    let del = pcpctl(&d, Some(TOKEN_WRITE), &["mappings", "delete", static_id]);
    assert_eq!(
        (code(&del), text(&del).trim()),
        (0, format!("deleted {static_id}").as_str())
    );
    // Not found is 3, for get and delete alike.
    let gone = pcpctl(&d, Some(TOKEN_READ), &["mappings", "get", static_id]);
    assert_eq!(code(&gone), 3);
    assert_eq!(
        code(&pcpctl(
            &d,
            Some(TOKEN_WRITE),
            &["mappings", "delete", static_id]
        )),
        3
    );

    // Drain and undrain the subscriber's address: the mapping moves.
    let dr = pcpctl(&d, Some(TOKEN_WRITE), &["drain", &external]);
    assert_eq!(code(&dr), 0, "{}", String::from_utf8_lossy(&dr.stderr));
    assert!(text(&dr).contains("1 mappings moved"), "{}", text(&dr));
    let un = pcpctl(&d, Some(TOKEN_WRITE), &["undrain", &external]);
    assert_eq!(code(&un), 0);
    let moved = json(&pcpctl(
        &d,
        Some(TOKEN_READ),
        &["mappings", "get", &id, "--json"],
    ));
    assert_ne!(
        moved["external_addr"],
        external.as_str(),
        "moved off the drained address"
    );

    // reload re-reads the file.
    let r = pcpctl(&d, Some(TOKEN_WRITE), &["reload"]);
    assert_eq!(code(&r), 0, "{}", String::from_utf8_lossy(&r.stderr));
    assert!(text(&r).starts_with("reloaded:"));

    // No token: 4, with what to do; a bad argument: 2; nobody there: 5.
    let none = pcpctl(&d, None, &["pools"]);
    assert_eq!(code(&none), 4);
    assert!(String::from_utf8_lossy(&none.stderr).contains("PCPD_TOKEN"));
    assert_eq!(
        code(&pcpctl(
            &d,
            Some(TOKEN_WRITE),
            &["mappings", "create", "not-an-endpoint"]
        )),
        2
    );
    assert_eq!(code(&pcpctl(&d, Some(TOKEN_READ), &["no-such-command"])), 2);
    let bad = pcpctl(
        &d,
        Some(TOKEN_READ),
        &["lookup", "1.2.3.4:5", "--at", "yesterday"],
    );
    assert_eq!(code(&bad), 1, "400 from the API");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
    let away = Command::new(env!("CARGO_BIN_EXE_pcpctl"))
        .env("PCPD_URL", "http://127.0.0.77:1")
        .env("PCPD_TOKEN", TOKEN_READ)
        .arg("pools")
        .output()
        .unwrap();
    assert_eq!(code(&away), 5);
    assert!(String::from_utf8_lossy(&away.stderr).contains("is pcpd running"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn https_with_the_operators_ca() {
    let ip = Ipv4Addr::new(127, 0, 0, 78);
    let dir = temp_dir("pcpctl-tls");
    let cert = rcgen::generate_simple_self_signed(vec![ip.to_string()]).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    let mut cfg = config_for(ip, &dir);
    cfg["admin"]["allow_plaintext_on_loopback"] = false.into();
    cfg["admin"]["tls"] = serde_yaml::to_value(serde_json::json!({"cert": c, "key": k})).unwrap();
    let d = Daemon::start_in(dir.clone(), ip, cfg);
    assert_eq!(d.scheme, "https");
    // Without the CA the certificate is not trusted: unreachable (5).
    let untrusted = pcpctl(&d, Some(TOKEN_READ), &["pools"]);
    assert_eq!(code(&untrusted), 5);
    let ca = c.display().to_string();
    let ok = pcpctl(&d, Some(TOKEN_READ), &["--ca", &ca, "--json", "pools"]);
    assert_eq!(code(&ok), 0, "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(json(&ok)["pools"][0]["name"], "default");
}
