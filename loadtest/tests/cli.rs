//! The binary end to end: against its own reflector, on loopback, bounded.
#![allow(missing_docs)]

use std::process::{Command, Stdio};
use std::time::Duration;

const LT: &str = env!("CARGO_BIN_EXE_pcp-loadtest");

#[test]
fn runs_against_the_reflector_and_validates_every_reply() {
    let mut reflector = Command::new(LT)
        .args([
            "reflect",
            "--listen",
            "127.0.0.31:5399",
            "--threads",
            "1",
            "--seconds",
            "20",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new(LT)
        .args([
            "run",
            "--target",
            "127.0.0.31:5399",
            "--echo",
            "--mix",
            "create",
            "--seconds",
            "1",
            "--requests",
            "2000",
            "--subscribers",
            "50",
            "--json",
        ])
        .output()
        .unwrap();
    reflector.kill().unwrap();
    let _ = reflector.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["sent"], 2000, "bounded by --requests");
    assert_eq!(s["replies"], 2000);
    assert_eq!(s["invalid"], 0);
    assert_eq!(s["lost"], 0);
    assert_eq!(s["results"]["create"]["ECHO"], 2000);
    assert!(s["latency_us"]["p50"].as_u64().unwrap() >= 1);
}

#[test]
fn refuses_targets_off_this_host() {
    let out = Command::new(LT)
        .args(["run", "--target", "192.0.2.1:5351", "--seconds", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to load 192.0.2.1:5351"));
    let out = Command::new(LT)
        .args(["run", "--target", "127.0.0.1:5351", "--seconds", "99999"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "duration is bounded");
}
