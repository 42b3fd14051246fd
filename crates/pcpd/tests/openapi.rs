//! The admin API against its contract, docs/openapi.json, with a real
//! schemathesis (PyPI, pinned in .ci/prereqs; .ci/schemathesis.toml) and a
//! real pcpd on 127.0.0.33: with a write token every check passes (no 5xx,
//! no schema-valid request refused, no schema-violating one accepted,
//! every response matching its schema, stateful links); without one, no
//! protected operation ever succeeds. A missing schemathesis fails the
//! test.
#![allow(missing_docs)]

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// `st run` against `d` with `args`; success and what it printed.
fn schemathesis(d: &Daemon, args: &[&str]) -> (bool, String) {
    let out = Command::new("st")
        .arg("--no-color")
        .arg("--config-file")
        .arg(repo().join(".ci/schemathesis.toml"))
        .arg("run")
        .arg(d.url("/v1/openapi.json"))
        .args(["--checks", "all", "--workers", "1", "--seed", "6887"])
        .args(args)
        .output()
        .expect("schemathesis (pip install schemathesis; .ci/prereqs pins it)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A PCP mapping from `src`, so listings and lookups have something to find.
fn map_from(d: &Daemon, src: Ipv4Addr, port: u16) {
    assert_eq!(
        pcp_map(d, src, 17, port, 3600, 3),
        pcp_wire::ResultCode::Success
    );
}

#[test]
fn the_admin_api_keeps_its_openapi_contract() {
    let ip = Ipv4Addr::new(127, 0, 0, 33);
    let d = Daemon::on_default("openapi", ip);
    for i in 0..5 {
        map_from(&d, Ipv4Addr::new(127, 0, 33, i + 1), 5000 + u16::from(i));
    }
    let auth = format!("Authorization: Bearer {TOKEN_WRITE}");
    let (ok, text) = schemathesis(&d, &["-H", &auth, "--max-examples", "150"]);
    assert!(ok, "schemathesis with a token:\n{text}");
    for phase in ["Coverage", "Fuzzing", "Stateful"] {
        assert!(
            text.contains(&format!("✅ {phase}")),
            "{phase} did not run and pass:\n{text}"
        );
    }

    // Without a token nothing protected succeeds: every request is kept
    // in a HAR file and read back.
    let har = d.dir.join("noauth.har");
    let har_arg = har.display().to_string();
    let _ = schemathesis(
        &d,
        &[
            "--max-examples",
            "40",
            "--report",
            "har",
            "--report-har-path",
            &har_arg,
        ],
    );
    let log: Value =
        serde_json::from_str(&std::fs::read_to_string(&har).expect("HAR written")).unwrap();
    let public = ["/healthz", "/readyz", "/v1/openapi.json"];
    let mut protected = 0;
    for e in log["log"]["entries"].as_array().unwrap() {
        let url = e["request"]["url"].as_str().unwrap();
        let path = url
            .split('?')
            .next()
            .unwrap()
            .splitn(4, '/')
            .nth(3)
            .map(|p| format!("/{p}"))
            .unwrap();
        let status = e["response"]["status"].as_u64().unwrap();
        if public.contains(&path.as_str()) || path.ends_with("/health") {
            continue;
        }
        protected += 1;
        assert!(
            !(200..300).contains(&status),
            "{} {path} succeeded without a token: {status}",
            e["request"]["method"]
        );
    }
    assert!(
        protected > 200,
        "{protected} protected requests without a token"
    );
}
