//! The NAT event log's sinks against real collectors, all started by the
//! test on 127.0.0.35 and killed on drop: Debian's rsyslog (RFC 5424 over
//! UDP, TCP with octet counting, and TLS through its ossl driver) and
//! nfdump (nfcapd receives IPFIX, `nfdump -r` decodes). Every event of the
//! JSON file sink is found again in each collector, field by field.
//! nfcapd has no TCP input: the IPFIX-over-TCP stream is read by the test,
//! cut at the IPFIX message lengths and handed to nfcapd unchanged.
//! Missing rsyslog or nfdump fail the test (`.ci/prereqs` installs them).
#![allow(missing_docs)]

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const COLLECTOR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 35);

/// A process started by the test, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(what: &'static str, cmd: &mut Command) -> Proc {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{what}: {e} (.ci/prereqs installs rsyslog, rsyslog-openssl, nfdump)")
        });
    Proc(child)
}

/// rsyslogd with `conf`, in the foreground.
fn rsyslog(dir: &Path, name: &str, conf: &str) -> Proc {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf).unwrap();
    let p = spawn(
        "rsyslogd",
        Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&path)
            .arg("-i")
            .arg(dir.join(format!("{name}.pid"))),
    );
    p
}

/// Waits (10 s at most) until something accepts TCP on `port` of the
/// collector address: rsyslog opens its UDP and TCP inputs together.
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect((COLLECTOR, port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "rsyslog does not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines of `path` once there are `n` of them (15 s at most).
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n || Instant::now() >= deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads IPFIX over TCP from `listener` and hands each message to nfcapd
/// on UDP, until the peer closes.
fn relay_tcp_to(listener: TcpListener, to: (Ipv4Addr, u16)) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("pcpd connects over TCP");
        let out = UdpSocket::bind((COLLECTOR, 0)).unwrap();
        let mut messages = 0;
        loop {
            let mut head = [0u8; 4];
            if s.read_exact(&mut head).is_err() {
                return messages;
            }
            assert_eq!(
                u16::from_be_bytes([head[0], head[1]]),
                10,
                "IPFIX version 10"
            );
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let mut rest = vec![0u8; len - 4];
            s.read_exact(&mut rest).unwrap();
            let mut msg = head.to_vec();
            msg.extend_from_slice(&rest);
            out.send_to(&msg, to).unwrap();
            messages += 1;
        }
    })
}

/// PCP MAP from `src`; asserts success.
fn map(d: &Daemon, src: Ipv4Addr, port: u16, lifetime: u32) {
    assert_eq!(
        pcp_map(d, src, 6, port, lifetime, 9),
        pcp_wire::ResultCode::Success
    );
}

/// `msgid|app|hostname|structured-data|msg` lines rsyslog wrote.
fn syslog_fields(line: &str) -> (String, String, String, Value) {
    let mut parts = line.splitn(4, '|');
    let msgid = parts.next().unwrap().to_string();
    let app = parts.next().unwrap().to_string();
    let sd = parts.next().unwrap().to_string();
    let msg: Value = serde_json::from_str(parts.next().unwrap().trim())
        .unwrap_or_else(|e| panic!("{e}: {line}"));
    (msgid, app, sd, msg)
}

#[test]
fn every_event_reaches_rsyslog_and_nfdump_field_by_field() {
    let dir = temp_dir("natlog-sinks");
    let tls_dir = dir.join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec![COLLECTOR.to_string()]).unwrap();
    let (c, k) = (tls_dir.join("cert.pem"), tls_dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    let d_ = dir.display();
    let template = r#"template(name="fields" type="string" string="%msgid%|%app-name%|%structured-data%|%msg%\n")"#;
    let _plain = rsyslog(
        &dir,
        "plain",
        &format!(
            "global(workDirectory=\"{d_}\")\nmodule(load=\"imudp\")\nmodule(load=\"imtcp\")\n{template}\n\
             ruleset(name=\"udp\") {{ action(type=\"omfile\" file=\"{d_}/udp.log\" template=\"fields\") }}\n\
             ruleset(name=\"tcp\") {{ action(type=\"omfile\" file=\"{d_}/tcp.log\" template=\"fields\") }}\n\
             input(type=\"imudp\" address=\"{COLLECTOR}\" port=\"5514\" ruleset=\"udp\")\n\
             input(type=\"imtcp\" address=\"{COLLECTOR}\" port=\"5515\" ruleset=\"tcp\")\n"
        ),
    );
    let (cp, kp) = (c.display(), k.display());
    let _tls = rsyslog(
        &dir,
        "tls",
        &format!(
            "global(workDirectory=\"{d_}/tls\" defaultNetstreamDriver=\"ossl\" defaultNetstreamDriverCAFile=\"{cp}\" \
             defaultNetstreamDriverCertFile=\"{cp}\" defaultNetstreamDriverKeyFile=\"{kp}\")\n\
             module(load=\"imtcp\" streamDriver.name=\"ossl\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\")\n{template}\n\
             ruleset(name=\"tls\") {{ action(type=\"omfile\" file=\"{d_}/tls.log\" template=\"fields\") }}\n\
             input(type=\"imtcp\" address=\"{COLLECTOR}\" port=\"6514\" ruleset=\"tls\")\n"
        ),
    );
    wait_listening(5515);
    wait_listening(6514);
    let flows = dir.join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    let nfcapd = spawn(
        "nfcapd",
        Command::new("nfcapd")
            .args(["-b", &COLLECTOR.to_string(), "-p", "4739", "-t", "60", "-w"])
            .arg(&flows),
    );
    let flows_tcp = dir.join("flows-tcp");
    std::fs::create_dir_all(&flows_tcp).unwrap();
    let nfcapd_tcp = spawn(
        "nfcapd",
        Command::new("nfcapd")
            .args(["-b", &COLLECTOR.to_string(), "-p", "4740", "-t", "60", "-w"])
            .arg(&flows_tcp),
    );
    let tcp_in = TcpListener::bind((COLLECTOR, 4739)).unwrap();
    let relay = relay_tcp_to(tcp_in, (COLLECTOR, 4740));
    std::thread::sleep(Duration::from_millis(300));

    let ip = Ipv4Addr::new(127, 0, 0, 34);
    let mut cfg = config_for(ip, &dir);
    let json_log = dir.join("events.jsonl");
    cfg["log"]["nat_sinks"] = serde_yaml::to_value(serde_json::json!([
        {"type": "file", "path": json_log},
        {"type": "syslog", "transport": "udp", "address": format!("{COLLECTOR}:5514")},
        {"type": "syslog", "transport": "tcp", "address": format!("{COLLECTOR}:5515")},
        {"type": "syslog", "transport": "tls", "address": format!("{COLLECTOR}:6514"), "ca": c},
        {"type": "ipfix", "transport": "udp", "collector": format!("{COLLECTOR}:4739")},
        {"type": "ipfix", "transport": "tcp", "collector": format!("{COLLECTOR}:4739")},
    ]))
    .unwrap();
    let mut d = Daemon::start_in(dir.clone(), ip, cfg);
    for i in 0..10u8 {
        map(
            &d,
            Ipv4Addr::new(127, 0, 34, i + 1),
            8000 + u16::from(i),
            600,
        );
    }
    map(&d, Ipv4Addr::new(127, 0, 34, 1), 8000, 0); // a delete
    let events: Vec<Value> = wait_lines(&json_log, 21)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        events.len(),
        21,
        "10 blocks, 10 creates, 1 delete: {events:?}"
    );

    // rsyslog: the same events over each transport, RFC 5424 parsed by it.
    for name in ["udp", "tcp", "tls"] {
        let lines = wait_lines(&dir.join(format!("{name}.log")), events.len());
        assert_eq!(lines.len(), events.len(), "{name}: {lines:?}");
        for (line, e) in lines.iter().zip(&events) {
            let (msgid, app, sd, msg) = syslog_fields(line);
            assert_eq!(&msg, e, "{name}: the message is the event");
            assert_eq!(msgid, e["event"].as_str().unwrap(), "{name}: MSGID");
            assert_eq!(app, "pcpd");
            assert!(sd.starts_with("[nat@32473 "), "{name}: {sd}");
            for key in [
                "natEvent",
                "sourceAddress",
                "postNATSourceIPv4Address",
                "timeStamp",
            ] {
                let want = match &e[key] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                assert!(
                    sd.contains(&format!("{key}=\"{want}\"")),
                    "{name}: {key} in {sd}"
                );
            }
        }
    }

    // IPFIX: stop pcpd (the TCP stream closes), then nfcapd (it writes its file).
    d.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "pcpd did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let relayed = relay.join().unwrap();
    assert!(
        relayed >= 2,
        "templates and data over TCP: {relayed} messages"
    );
    std::thread::sleep(Duration::from_millis(300));
    for (p, dir) in [(nfcapd, &flows), (nfcapd_tcp, &flows_tcp)] {
        let _ = Command::new("kill")
            .args(["-TERM", &p.0.id().to_string()])
            .status();
        let mut p = p;
        let _ = p.0.wait();
        // nfcapd starts a new file at each interval's boundary: a run
        // that crosses one leaves two. Read them in time order.
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("nfcapd.2")
            })
            .collect();
        files.sort();
        assert!(!files.is_empty() && files.len() <= 2, "{files:?}");
        let mut records = Vec::new();
        for file in &files {
            let out = Command::new("nfdump")
                .env("TZ", "UTC")
                .arg("-r")
                .arg(file)
                .args(["-o", "json"])
                .output()
                .expect("nfdump");
            if out.stdout.trim_ascii().is_empty() {
                continue; // a file of the interval before, with no record
            }
            let these: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
            records.extend(these.as_array().cloned().unwrap_or_default());
        }
        assert_eq!(
            records.len(),
            events.len(),
            "{}: {records:?}",
            dir.display()
        );
        for (r, e) in records.iter().zip(&events) {
            assert_eq!(r["nat_event_id"], e["natEvent"].to_string(), "{r}");
            assert_eq!(r["src4_addr"], e["sourceAddress"], "{r}");
            assert_eq!(r["src4_xlt_ip"], e["postNATSourceIPv4Address"], "{r}");
            if e["event"].as_str().unwrap().starts_with("mapping") {
                assert_eq!(r["proto"], e["protocolIdentifier"], "{r}");
                assert_eq!(r["src_port"], e["sourceTransportPort"], "{r}");
                assert_eq!(
                    r["src_xlt_port"],
                    e["postNAPTSourceTransportPort"].to_string(),
                    "{r}"
                );
            }
            // nfdump prints the event time (ms) as local time; compare in UTC.
            let t = r["t_event"].as_str().unwrap();
            let ms = e["timeStamp"].as_u64().unwrap();
            let want = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap();
            let seconds = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                want.year(),
                u8::from(want.month()),
                want.day(),
                want.hour(),
                want.minute(),
                want.second(),
            );
            // nfdump 1.7 prints the milliseconds without zero padding
            // (13.015 s as "13.15"): compare them as a number.
            let (secs, millis) = t.split_once('.').unwrap_or((t, "0"));
            assert_eq!(secs, seconds, "{r}");
            assert_eq!(millis.parse::<u16>().ok(), Some(want.millisecond()), "{r}");
        }
    }
}

#[test]
fn a_dead_collector_drops_and_counts_a_full_disk_rotates_and_sighup_reopens() {
    let ip = Ipv4Addr::new(127, 0, 0, 36);
    let dir = temp_dir("natlog-rotate");
    let mut cfg = config_for(ip, &dir);
    let log = dir.join("events.jsonl");
    // Nothing listens on 127.0.0.35:5599; the queue holds 4 events.
    cfg["log"]["nat_sinks"] = serde_yaml::to_value(serde_json::json!([
        {"type": "file", "path": log, "rotate_bytes": 1000, "keep": 2},
        {"type": "file", "path": dir.join("timed.jsonl"), "rotate_secs": 1},
        {"type": "syslog", "transport": "tcp", "address": format!("{COLLECTOR}:5599"), "queue": 4},
    ]))
    .unwrap();
    let d = Daemon::start_in(dir.clone(), ip, cfg);
    for i in 0..30u8 {
        map(&d, Ipv4Addr::new(127, 0, 36, i + 1), 9000, 600);
    }
    // PCP never waited for the dead collector; its events were dropped and counted.
    let dropped = |d: &Daemon| {
        parse_metrics(&d.metrics_text())
            .iter()
            .filter(|(s, _)| {
                s.starts_with("pcpd_natlog_dropped_total{sink=\"syslog:127.0.0.35:5599\"}")
            })
            .map(|(_, v)| *v)
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while dropped(&d) < 56.0 {
        assert!(Instant::now() < deadline, "drops counted: {}", dropped(&d));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Rotation: the file and at most `keep` rotated ones, whole lines each.
    std::thread::sleep(Duration::from_millis(500));
    let rotated = |i: u32| PathBuf::from(format!("{}.{i}", log.display()));
    assert!(rotated(1).exists() && rotated(2).exists() && !rotated(3).exists());
    for p in [log.clone(), rotated(1), rotated(2)] {
        for line in std::fs::read_to_string(&p).unwrap().lines() {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("{}: {e}: {line}", p.display()));
        }
    }
    // Rotation by age: a second later, the next event starts a new file.
    let timed = dir.join("timed.jsonl");
    std::thread::sleep(Duration::from_millis(1200));
    map(&d, Ipv4Addr::new(127, 0, 36, 100), 9000, 600);
    let timed_old = PathBuf::from(format!("{}.1", timed.display()));
    // The event lands in the new file, or in a rotated one if a later
    // tick rotated again: look in all of them, until it is there.
    let all = || -> String {
        (0..=7)
            .map(|i| match i {
                0 => timed.clone(),
                i => PathBuf::from(format!("{}.{i}", timed.display())),
            })
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(timed_old.exists() && all().contains("127.0.36.100")) {
        assert!(Instant::now() < deadline, "no rotation by age: {}", all());
        std::thread::sleep(Duration::from_millis(50));
    }
    // logrotate's way: move the file, SIGHUP; new events go to a new file.
    let moved = dir.join("moved.jsonl");
    std::fs::rename(&log, &moved).unwrap();
    d.signal("HUP");
    std::thread::sleep(Duration::from_millis(1500));
    map(&d, Ipv4Addr::new(127, 0, 36, 200), 9000, 600);
    let lines = wait_lines(&log, 2);
    assert!(
        lines.iter().any(|l| l.contains("127.0.36.200")),
        "{lines:?}"
    );
    assert!(!std::fs::read_to_string(&moved)
        .unwrap()
        .contains("127.0.36.200"));
}
