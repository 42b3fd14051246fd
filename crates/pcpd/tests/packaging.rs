//! What operators install: the Helm chart (rendered, linted and validated
//! with the real Helm library, its config accepted by pcpd), the systemd
//! unit (`systemd-analyze verify`), and the Prometheus scrape config (a real
//! Prometheus scrapes a running pcpd; `promtool check metrics` passes).
//! `.ci/prereqs` installs the tools; a missing one fails, never skips.
#![allow(missing_docs)]

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn output(cmd: &mut Command, what: &str) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (run .ci/prereqs)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn helm_chart_renders_lints_validates_and_pcpd_accepts_its_config() {
    let (ok, text) = output(
        Command::new("python3")
            .arg(repo().join(".ci/chart_check.py"))
            .arg(env!("CARGO_BIN_EXE_pcpd")),
        "python3 .ci/chart_check.py (pip install helm-python-sdk kubernetes-validate)",
    );
    println!("{text}");
    assert!(ok, "chart check failed:\n{text}");
    // Each of the five CI value sets (one in cluster mode, one dual-stack
    // with an IPv6 firewall class) went through
    // every step.
    for step in [
        "helm lint (strict)",
        "schemas (strict)",
        "pcpd check-config",
    ] {
        assert_eq!(text.matches(step).count(), 5, "{step}:\n{text}");
    }
    // The monitoring set renders the Grafana dashboard for the sidecar.
    assert_eq!(
        text.matches("the dashboard, labelled for Grafana's sidecar")
            .count(),
        1,
        "{text}"
    );
}

#[test]
fn systemd_unit_verifies() {
    let dir = common::temp_dir("systemd");
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/pcpd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/pcpd --config /etc/pcpd/pcpd.yaml"));
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    // verify checks that ExecStart exists: point it at the binary built here.
    let here = unit.replace("/usr/bin/pcpd", env!("CARGO_BIN_EXE_pcpd"));
    let path = dir.join("pcpd.service");
    std::fs::write(&path, &here).unwrap();
    let (ok, text) = output(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        "systemd-analyze",
    );
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    // The check is real: a mistyped directive is reported.
    let broken = dir.join("pcpd-broken.service");
    std::fs::write(
        &broken,
        here.replace("ProtectSystem=strict", "ProtectSystem=stricter"),
    )
    .unwrap();
    let (_, text) = output(
        Command::new("systemd-analyze").arg("verify").arg(&broken),
        "systemd-analyze",
    );
    assert!(text.contains("stricter"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prometheus, run by the test; killed on drop.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get_json(url: &str) -> Option<Value> {
    let mut resp = ureq::get(url).call().ok()?;
    serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()
}

/// A real Prometheus on `ip`:9090 with the shipped scrape config (pointed
/// at `d`, scraping every second) and rules; returns once it has seen
/// `pcpd_ready 1`, with its API base and that answer.
fn start_prometheus(d: &Daemon, ip: Ipv4Addr) -> (Prometheus, String, Option<Value>) {
    // The shipped scrape config and rules, pointed at this pcpd.
    let dir = d.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml"))
        .unwrap()
        .replace("127.0.0.1:9351", &format!("{ip}:9351"))
        .replace("scrape_interval: 15s", "scrape_interval: 1s");
    std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
    std::fs::copy(
        repo().join("deploy/prometheus/pcpd-rules.yml"),
        dir.join("pcpd-rules.yml"),
    )
    .unwrap();
    let (ok, text) = output(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.join("prometheus.yml")),
        "promtool",
    );
    assert!(ok, "promtool check config:\n{text}");
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let prom = Prometheus(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={ip}:9090"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (apt-get install prometheus)"),
    );
    let api = format!("http://{ip}:9090/api/v1");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let up = get_json(&format!("{api}/query?query=pcpd_ready"));
        let value = up.as_ref().and_then(|v| {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_string)
        });
        if value.as_deref() == Some("1") {
            break up;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
            panic!("Prometheus never saw pcpd_ready 1: {up:?}\n{log}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    (prom, api, ready)
}

#[test]
fn prometheus_scrapes_pcpd_with_the_shipped_config() {
    let ip = Ipv4Addr::new(127, 0, 0, 31);
    let d = Daemon::on_default("prometheus", ip);

    // promtool accepts the exposition format.
    let scrape = d.metrics_text();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    use std::io::Write as _;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (_prom, api, ready) = start_prometheus(&d, ip);
    assert_eq!(ready.unwrap()["data"]["result"][0]["metric"]["job"], "pcpd");
    let targets = get_json(&format!("{api}/targets")).expect("targets");
    let t = &targets["data"]["activeTargets"][0];
    assert_eq!(t["health"], "up", "{t}");
    assert_eq!(t["labels"]["instance"], format!("{ip}:9351"));
    // pcpd's own series are queryable, and the shipped rules are loaded.
    let info = get_json(&format!("{api}/query?query=pcpd_build_info")).unwrap();
    assert_eq!(
        info["data"]["result"].as_array().map(Vec::len),
        Some(1),
        "{info}"
    );
    let pools = get_json(&format!("{api}/query?query=pcpd_pool_blocks")).unwrap();
    assert!(
        !pools["data"]["result"].as_array().unwrap().is_empty(),
        "{pools}"
    );
    let rules = get_json(&format!("{api}/rules")).unwrap();
    let names: Vec<&str> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(names.contains(&"PcpdDataplaneErrors"), "{names:?}");
    assert!(names.contains(&"PcpdPoolExhausted"), "{names:?}");
    // The alerts fire on the series pcpd exports (promtool's rule tests).
    let (ok, text) = output(
        Command::new("promtool")
            .args(["test", "rules"])
            .arg(repo().join("deploy/prometheus/pcpd-rules.test.yml")),
        "promtool",
    );
    assert!(ok, "promtool test rules:\n{text}");
}

/// One PCP MAP from `src` to `d` with nonce byte `nonce`; the result.
fn map_once(d: &Daemon, src: Ipv4Addr, port: u16, nonce: u8) -> pcp_wire::ResultCode {
    common::pcp_map(d, src, 6, port, 600, nonce)
}

/// An instant query; the result vector.
fn query(api: &str, expr: &str) -> Value {
    let mut r = ureq::get(&format!("{api}/query"))
        .query("query", expr)
        .call()
        .unwrap_or_else(|e| panic!("{expr}: {e}"));
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].clone()
}

/// Every panel of the shipped Grafana dashboard, evaluated by a real
/// Prometheus scraping a pcpd under a short load, returns data (numbers,
/// not NaN); every shipped alert rule parses, and every series it names
/// exists (a rule that does not fire returns nothing by design).
#[test]
fn grafana_dashboard_panels_and_alert_rules_evaluate_on_real_prometheus() {
    let ip = Ipv4Addr::new(127, 0, 0, 32);
    let d = Daemon::on_default("dashboard", ip);
    let (_prom, api, _) = start_prometheus(&d, ip);
    // A short load touching every panel: creates, renewals, a wrong nonce
    // (NOT_AUTHORIZED), quota refusals, a THIRD_PARTY refusal, a drop.
    for i in 0..20u8 {
        let src = Ipv4Addr::new(127, 0, 32, i + 1);
        assert_eq!(map_once(&d, src, 8000, 1), pcp_wire::ResultCode::Success);
        assert_eq!(map_once(&d, src, 8000, 1), pcp_wire::ResultCode::Success);
        assert_eq!(
            map_once(&d, src, 8000, 2),
            pcp_wire::ResultCode::NotAuthorized
        );
    }
    let hog = Ipv4Addr::new(127, 0, 33, 1);
    let refused = (0..70u16)
        .map(|p| map_once(&d, hog, 1000 + p, 1))
        .filter(|r| *r != pcp_wire::ResultCode::Success)
        .count();
    assert!(refused > 0, "quota or rate limit reached");
    let s = std::net::UdpSocket::bind((ip, 0)).unwrap();
    s.send_to(&[2, 1], d.pcp_addr()).unwrap(); // too short: dropped (§8.2)
                                               // Two scrapes after the load, so rates see it.
    std::thread::sleep(Duration::from_secs(4));

    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/pcpd.json")).unwrap(),
    )
    .unwrap();
    let helm: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("helm/pcpd/dashboards/pcpd.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dash, helm, "one dashboard, shipped twice");
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$instance", ".*");
            let result = query(&api, &expr);
            let values: Vec<&str> = result
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|r| r["value"][1].as_str())
                .collect();
            assert!(
                !values.is_empty()
                    && values
                        .iter()
                        .all(|v| v.parse::<f64>().is_ok_and(|x| !x.is_nan())),
                "panel {:?}: {expr} returned {result}",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} panel queries");

    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/prometheus/pcpd-rules.yml")).unwrap(),
    )
    .unwrap();
    let names = |expr: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut word = String::new();
        for c in expr.chars().chain([' ']) {
            if c.is_ascii_alphanumeric() || c == '_' {
                word.push(c);
            } else {
                if word.starts_with("pcpd_") || word == "up" {
                    out.push(std::mem::take(&mut word));
                }
                word.clear();
            }
        }
        out
    };
    let mut alerts = 0;
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        query(&api, expr); // parses and evaluates
        for name in names(expr) {
            assert!(
                !query(&api, &name).as_array().unwrap().is_empty(),
                "alert {:?}: no series {name}",
                rule["alert"]
            );
        }
        alerts += 1;
    }
    assert!(alerts >= 6, "{alerts} alert rules");
}
