//! Durable state (issue 6): nothing acknowledged is lost to kill -9, the
//! epoch continues (RFC 6887 §8.5), damaged state stops start-up.
#![allow(missing_docs)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pcp_wire::{Response, ResultCode};

/// A tiny deterministic generator, seeded from the clock (printed).
struct Rng(u64);
impl Rng {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[test]
fn acknowledged_mappings_survive_kill_9_and_the_epoch_continues() {
    let ip = Ipv4Addr::new(127, 0, 0, 18);
    let dir = temp_dir("crash");
    let mut cfg = config_for(ip, &dir);
    no_rate_limit(&mut cfg);
    let mut d = Daemon::start_in(dir, ip, cfg);
    let server = d.pcp_addr();
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let first_epoch: Arc<Mutex<Option<(u32, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    // 3 loaders x 200 subscribers (127.18.t.x), up to 40 mappings each.
    for t in 0..3u8 {
        let (acked, stop, first_epoch) = (acked.clone(), stop.clone(), first_epoch.clone());
        loaders.push(std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut i: u32 = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && i < 8000 {
                let subscriber = Ipv4Addr::new(127, 18, t, (i % 200) as u8 + 1);
                let internal_port = 2000 + (i / 200) as u16;
                let mut nonce = [t; 12];
                nonce[4..8].copy_from_slice(&i.to_be_bytes());
                i += 1;
                if let Some((ResultCode::Success, external, epoch)) =
                    map_from(subscriber, internal_port, nonce, server)
                {
                    acked.lock().unwrap().push(Acked {
                        subscriber,
                        internal_port,
                        nonce,
                        external,
                    });
                    first_epoch
                        .lock()
                        .unwrap()
                        .get_or_insert((epoch, Instant::now()));
                }
            }
        }));
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(200 + rng.next(600)));
        let before = acked.lock().unwrap().len();
        d.kill9_and_restart();
        eprintln!("round {round}: killed with {before} mappings acknowledged");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 300,
        "enough load to mean something: {}",
        acked.len()
    );
    // Every mapping whose success reply was received is still there, with
    // the same external endpoint: a renewal with its nonce returns it.
    all_present(&d, &acked);
    // The epoch did not reset: it counts from the first start.
    let (e0, t0) = first_epoch.lock().unwrap().expect("a reply");
    let (_, _, e1) = map_from(
        acked[0].subscriber,
        acked[0].internal_port,
        acked[0].nonce,
        server,
    )
    .unwrap();
    let elapsed = t0.elapsed().as_secs() as u32;
    assert!(
        e1 + 2 >= e0 + elapsed && e1 <= e0 + elapsed + 2,
        "epoch {e0} then {e1} after {elapsed} s"
    );
}

#[test]
fn damaged_state_stops_start_up_and_discard_state_starts_a_new_epoch() {
    let ip = Ipv4Addr::new(127, 0, 0, 19);
    let dir = temp_dir("damaged");
    let cfg = config_for(ip, &dir);
    let mut d = Daemon::start_in(dir.clone(), ip, cfg.clone());
    for port in [100, 101, 102] {
        let r = Response::parse(&d.pcp_exchange(&map_request(1, port, 3600, &[])).unwrap())
            .unwrap()
            .result;
        assert_eq!(r, ResultCode::Success);
    }
    std::thread::sleep(Duration::from_millis(1500));
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // Damage the first record of the journal that holds them.
    let state = dir.join("state");
    let journal = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "journal"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&journal).unwrap();
    assert!(bytes.len() > 100, "the journal holds the records");
    bytes[16 + 9] ^= 0x55;
    std::fs::write(&journal, &bytes).unwrap();
    std::mem::forget(d); // keep the directory: the next daemons use it
    let err = match Daemon::try_start(dir.clone(), ip, cfg.clone(), &[]) {
        Ok(_) => panic!("pcpd started on damaged state"),
        Err(e) => e,
    };
    assert!(err.contains("damaged at byte 16"), "{err}");
    assert!(
        err.contains("--discard-state") && err.contains("truncate -s 16"),
        "{err}"
    );
    // The documented way out: a fresh epoch, the old files kept aside.
    let d = Daemon::try_start(dir.clone(), ip, cfg, &["--discard-state"]).unwrap();
    let r = d
        .pcp_exchange(&announce_request(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        .unwrap();
    let epoch = pcp_wire::ResponseHeader::parse(&r).unwrap().epoch;
    assert!(
        epoch <= 2,
        "a new epoch starts at zero (RFC 6887 §8.5): {epoch}"
    );
    assert!(std::fs::read_dir(&state).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("discarded-")));
}

/// `journal_renewal_slack` (default 2): a mapping is journaled with an
/// expiry two lifetimes past the one granted, so renewals that only move
/// the expiry within that cost no journal commit; one that goes further
/// is written. After kill -9 the mapping holds at least what the client
/// was last told (RFC 6887 §15: the lifetime is the server's promise).
#[test]
fn renewals_within_the_journaled_expiry_write_nothing_and_survive_kill_9() {
    let ip = Ipv4Addr::new(127, 0, 0, 20);
    let dir = temp_dir("slack");
    let mut cfg = config_for(ip, &dir);
    no_rate_limit(&mut cfg);
    let mut d = Daemon::start_in(dir, ip, cfg);
    let commits = |d: &Daemon| {
        metric(&d.metrics_text(), "pcpd_journal_commit_seconds_count").expect("commit histogram")
    };
    let wall_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let sub = Ipv4Addr::new(127, 20, 0, 1);
    let map = |d: &Daemon, lifetime: u32| {
        let (result, granted) = pcp_map_granted(d, sub, 6, 4000, lifetime, 7);
        assert_eq!(result, ResultCode::Success);
        wall_ms() + u64::from(granted) * 1000
    };
    let created = wall_ms();
    map(&d, 600);
    let before = commits(&d);
    let mut told = 0;
    for _ in 0..50 {
        told = map(&d, 600);
    }
    assert_eq!(
        commits(&d),
        before,
        "50 renewals within the journaled expiry made a journal commit"
    );
    d.kill9_and_restart();
    let expires = journaled_expiry(&d, sub);
    assert!(
        expires >= told,
        "after kill -9 the mapping expires at {expires}, before the {told} the client was told"
    );
    assert!(
        expires <= created + 3 * 600_000 + 2000,
        "journaled at {expires}: more than two lifetimes of slack past {created} + 600 s"
    );
    // A renewal past the journaled expiry is written before its reply.
    let before = commits(&d);
    let told = map(&d, 3600);
    assert!(
        commits(&d) > before,
        "a renewal past the journaled expiry was not written"
    );
    d.kill9_and_restart();
    assert!(journaled_expiry(&d, sub) >= told);
}

/// The expiry (ms since the epoch) of `sub`'s one mapping, from the admin API.
fn journaled_expiry(d: &Daemon, sub: Ipv4Addr) -> u64 {
    let (s, body) = call("GET", &d.url("/v1/mappings"), Some(TOKEN_READ), None);
    assert_eq!(s, 200, "{body}");
    let items = body["items"].as_array().expect("a list");
    let mine: Vec<_> = items
        .iter()
        .filter(|m| m["internal_addr"] == sub.to_string())
        .collect();
    assert_eq!(mine.len(), 1, "{body}");
    mine[0]["expires_ms"].as_u64().expect("expires_ms")
}
