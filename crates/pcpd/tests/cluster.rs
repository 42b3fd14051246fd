//! pcpd as a cluster on etcd (issue 14, docs/architecture.md "Cluster"):
//! three real etcd members on loopback and several real pcpd processes,
//! each on its own loopback address. Runs with the `cluster` feature (the
//! README's test command enables it); etcd comes from Debian's
//! etcd-server, installed by .ci/prereqs, and a missing etcd fails loudly.
#![cfg(feature = "cluster")]

mod cluster_support;
mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_support::*;
use common::{Acked, Daemon};
use pcp_store::Record;
use pcp_wire::ResultCode;

/// The tests share loopback addresses and ports: one at a time.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const TTL: Duration = Duration::from_secs(3);

fn jobs(p: u8, subscribers: std::ops::Range<u32>, ports: &[u16]) -> Vec<(Ipv4Addr, u16)> {
    subscribers
        .flat_map(|i| ports.iter().map(move |port| (subscriber(p, i), *port)))
        .collect()
}

/// Both nodes up, each owning its preferred partition.
fn two_nodes(name: &str, etcd: &Etcd, prefix: &str) -> (Daemon, Daemon) {
    let a = start_node(name, "a", etcd, prefix);
    let b = start_node(name, "b", etcd, prefix);
    wait_owns(&a, "p0", Duration::from_secs(15));
    wait_owns(&b, "p1", Duration::from_secs(15));
    (a, b)
}

#[test]
fn two_nodes_share_one_pool_without_holding_any_port_or_block_twice() {
    let _g = alone();
    let etcd = Etcd::start("share");
    let prefix = "/pcpd/share";
    let (a, b) = two_nodes("share", &etcd, prefix);
    let (pa, pb) = (a.pcp_addr(), b.pcp_addr());
    let mut work = jobs(0, 0..1000, &[80, 443]);
    work.extend(jobs(1, 0..1000, &[80, 443]));
    let (acked, other) = create_all(work, |s| if s.octets()[1] == 1 { pa } else { pb }, 8, 3);
    assert!(
        other.is_empty(),
        "{} requests not acknowledged, e.g. {:?}",
        other.len(),
        &other[..other.len().min(3)]
    );
    assert_eq!(acked.len(), 4000);

    // From etcd: every mapping once, its port inside a block of its own
    // subscriber, every block inside its partition's external prefix.
    let records = state_records(&etcd, prefix);
    let mut blocks: HashMap<IpAddr, Vec<pcp_engine::Block>> = HashMap::new();
    let mut block_keys = HashSet::new();
    for (part, r) in &records {
        if let Record::Block {
            subscriber, block, ..
        } = r
        {
            assert!(
                block_keys.insert((block.addr, block.first)),
                "block {block:?} held twice"
            );
            let in_p0 = block.addr.octets()[3] < 128;
            assert_eq!(
                in_p0,
                part == "p0",
                "{block:?} of {part} is outside the partition's prefix"
            );
            blocks.entry(*subscriber).or_default().push(*block);
        }
    }
    let mut external = HashSet::new();
    let mut n = 0;
    for (_, r) in &records {
        if let Record::Mapping(m) = r {
            n += 1;
            assert!(
                external.insert((m.external_addr, m.protocol, m.external_port)),
                "{m:?}: external port held twice"
            );
            let inside = blocks[&m.internal_addr]
                .iter()
                .any(|b| b.addr == m.external_addr && b.contains(m.external_port));
            assert!(inside, "{m:?} is outside its subscriber's blocks");
        }
    }
    assert_eq!(n, 4000, "etcd holds every acknowledged mapping");

    // From both admin APIs: each node lists its own partition's mappings,
    // and the two lists never share an external port.
    let mut seen = HashSet::new();
    for (d, second_octet) in [(&a, 1u8), (&b, 2u8)] {
        let list = api_mappings(d);
        assert_eq!(list.len(), 2000);
        for m in list {
            let internal: Ipv4Addr = m["internal_addr"].as_str().unwrap().parse().unwrap();
            assert_eq!(
                internal.octets()[1],
                second_octet,
                "a node lists only its partitions"
            );
            let ext = (
                m["external_addr"].as_str().unwrap().to_string(),
                m["external_port"].as_u64().unwrap(),
            );
            assert!(seen.insert(ext.clone()), "{ext:?} listed by both nodes");
        }
    }
    for a_ in &acked {
        let ext = (a_.external.0.to_string(), u64::from(a_.external.1));
        assert!(seen.contains(&ext), "{a_:?} acknowledged but not listed");
    }
    let status = cluster_status(&a);
    assert_eq!(status["partitions"][0]["owner"], "a");
    assert_eq!(status["partitions"][1]["owner"], "b");
    assert_eq!(status["partitions"][0]["mappings"], 2000);
}

/// A load of creations for partition p0 in the background, sent to the
/// node routing points at (`to_b`), until `stop`.
fn p0_load(
    a: SocketAddr,
    b: SocketAddr,
    to_b: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    first: u32,
) -> std::thread::JoinHandle<(Vec<Acked>, u32)> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut refused = 0;
        let next = AtomicU32::new(first);
        while !stop.load(Ordering::Acquire) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let (sub, port) = (subscriber(0, i), 8080);
            let nonce = nonce_of(sub, port);
            let server = if to_b.load(Ordering::Acquire) { b } else { a };
            match map_once(sub, port, nonce, server) {
                Some((ResultCode::Success, ext, _)) => acked.push(Acked {
                    subscriber: sub,
                    internal_port: port,
                    nonce,
                    external: ext,
                }),
                Some(_) => refused += 1,
                None => {}
            }
        }
        (acked, refused)
    })
}

#[test]
fn kill9_of_a_node_under_load_moves_its_partitions_with_every_mapping() {
    let _g = alone();
    let etcd = Etcd::start("kill9");
    let prefix = "/pcpd/kill9";
    let (mut a, b) = two_nodes("kill9", &etcd, prefix);
    let (pa, pb) = (a.pcp_addr(), b.pcp_addr());
    let (mut acked, other) = create_all(jobs(0, 0..500, &[22]), |_| pa, 8, 3);
    assert!(other.is_empty(), "{other:?}");
    // The §8.5 baseline: one client's last epoch from a, and when.
    let probe = acked[0];
    let (code, _, epoch_a) =
        map_once(probe.subscriber, probe.internal_port, probe.nonce, pa).unwrap();
    assert_eq!(code, ResultCode::Success);
    let seen_a = Instant::now();

    let to_b = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let load = p0_load(pa, pb, to_b.clone(), stop.clone(), 1000);
    std::thread::sleep(Duration::from_millis(700));
    a.child.kill().unwrap();
    let killed = Instant::now();
    a.child.wait().unwrap();
    let took = wait_owns(&b, "p0", TTL + Duration::from_secs(2));
    to_b.store(true, Ordering::Release); // routing follows (BGP, VIP)
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    let (during, _) = load.join().unwrap();
    eprintln!(
        "p0 owned by b {took:?} after a was killed ({} acknowledged under load)",
        during.len()
    );
    assert!(killed.elapsed() >= took);
    assert!(during.len() > 10, "the load ran");
    acked.extend(during);

    // Every mapping the dead node acknowledged renews on the survivor with
    // the same external address and port…
    all_renew(&b, &acked);
    // …and the client's epoch check passes: state was kept (§8.5).
    let (code, ext, epoch_b) =
        map_once(probe.subscriber, probe.internal_port, probe.nonce, pb).unwrap();
    assert_eq!((code, ext), (ResultCode::Success, probe.external));
    let client_delta = seen_a.elapsed().as_secs();
    assert!(
        epoch_valid(epoch_a, epoch_b, client_delta),
        "epoch {epoch_a} then {epoch_b} after {client_delta} s: the client would think state was lost"
    );
    let status = cluster_status(&b);
    assert_eq!(status["partitions"][0]["state"], "active");
    // At least every acknowledged one: a request committed just before the
    // kill may never have had its reply sent.
    let held = status["partitions"][0]["mappings"].as_u64().unwrap() as usize;
    assert!(
        held >= acked.len() && held <= acked.len() + 64,
        "{held} held, {} acknowledged",
        acked.len()
    );
}

/// Points `to_b` at whichever node's health endpoint says it owns p0, as
/// a BGP speaker following the partition's health would.
fn follow_p0(
    a: &Daemon,
    b: &Daemon,
    to_b: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let urls = [
        a.url("/v1/cluster/partitions/p0/health"),
        b.url("/v1/cluster/partitions/p0/health"),
    ];
    std::thread::spawn(move || {
        while !stop.load(Ordering::Acquire) {
            for (i, url) in urls.iter().enumerate() {
                // A stopped node does not answer at all (status 0).
                if common::status_of(url) == 200 {
                    to_b.store(i == 1, Ordering::Release);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

#[test]
fn planned_handover_under_load_loses_no_acknowledged_request() {
    let _g = alone();
    let etcd = Etcd::start("handover");
    let prefix = "/pcpd/handover";
    let (a, b) = two_nodes("handover", &etcd, prefix);
    let (pa, pb) = (a.pcp_addr(), b.pcp_addr());
    let (mut acked, other) = create_all(jobs(0, 0..300, &[22]), |_| pa, 8, 3);
    assert!(other.is_empty(), "{other:?}");

    // 1. The operator hands p0 from a to b while clients keep asking
    //    (and retransmit what got no answer, §8.1.1).
    let to_b = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let follow = follow_p0(&a, &b, to_b.clone(), stop.clone());
    let load = p0_load(pa, pb, to_b.clone(), stop.clone(), 1000);
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = common::call(
        "POST",
        &a.url("/v1/cluster/partitions/p0/handover"),
        Some(common::TOKEN_WRITE),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let took = wait_owns(&b, "p0", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(4)); // past failback: it stays on b
    assert!(
        owns(&b, "p0") && !owns(&a, "p0"),
        "a handed-over partition stays where it was sent"
    );
    stop.store(true, Ordering::Release);
    let (during, refused) = load.join().unwrap();
    follow.join().unwrap();
    eprintln!(
        "API handover took {took:?}; {} acknowledged under load, {refused} refused",
        during.len()
    );
    assert_eq!(refused, 0, "a planned handover refuses nothing");
    assert!(during.len() > 10, "the load ran");
    acked.extend(during);
    all_renew(&b, &acked);

    // 2. SIGTERM of b (a rolling upgrade): both partitions go to a.
    let stop = Arc::new(AtomicBool::new(false));
    let follow = follow_p0(&a, &b, to_b.clone(), stop.clone());
    let load = p0_load(pa, pb, to_b.clone(), stop.clone(), 5000);
    std::thread::sleep(Duration::from_millis(500));
    let mut b = b;
    b.signal("TERM");
    wait_owns(&a, "p0", Duration::from_secs(5));
    wait_owns(&a, "p1", Duration::from_secs(5));
    let exit = b.child.wait().unwrap();
    assert!(exit.success(), "b stopped cleanly: {exit}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    let (during, refused) = load.join().unwrap();
    follow.join().unwrap();
    eprintln!(
        "SIGTERM handover: {} acknowledged under load, {refused} refused",
        during.len()
    );
    assert_eq!(refused, 0, "a planned handover refuses nothing");
    acked.extend(during);
    all_renew(&a, &acked);
}

#[test]
fn etcd_member_loss_is_invisible_and_quorum_loss_refuses_then_recovers() {
    let _g = alone();
    let mut etcd = Etcd::start("quorum");
    let prefix = "/pcpd/quorum";
    // Losing etcd's leader stops writes for an election, 1-3 s with etcd's
    // defaults (election timeout 1 s) on a loaded machine. What
    // operations.md says to run with those defaults rides through it:
    // lease TTL 10 s, etcd timeout 4 s (each attempt given up after 1 s).
    let ride_through = |c: &mut serde_yaml::Value| {
        c["cluster"]["lease_ttl_secs"] = 10.into();
        c["cluster"]["etcd"]["timeout_ms"] = 4000.into();
    };
    let a = start_node_with("quorum", "a", &etcd, prefix, ride_through);
    let b = start_node_with("quorum", "b", &etcd, prefix, ride_through);
    wait_owns(&a, "p0", Duration::from_secs(15));
    wait_owns(&b, "p1", Duration::from_secs(15));
    let (pa, pb) = (a.pcp_addr(), b.pcp_addr());
    let route = |s: Ipv4Addr| if s.octets()[1] == 1 { pa } else { pb };

    // One member of three killed while requests run: none fails.
    let work: Vec<_> = jobs(0, 0..400, &[22])
        .into_iter()
        .chain(jobs(1, 0..400, &[22]))
        .collect();
    // Clients retransmit for as long as an election may take (§8.1.1).
    let (acked, other) = std::thread::scope(|s| {
        let load = s.spawn(|| create_all(work, route, 4, 12));
        std::thread::sleep(Duration::from_millis(300));
        etcd.kill(0);
        load.join().unwrap()
    });
    assert!(
        other.is_empty(),
        "{} requests failed with a member down, e.g. {:?}\na: {}\nb: {}",
        other.len(),
        &other[..other.len().min(3)],
        std::fs::read_to_string(a.dir.join("stderr.log")).unwrap_or_default(),
        std::fs::read_to_string(b.dir.join("stderr.log")).unwrap_or_default(),
    );
    assert_eq!(acked.len(), 800);

    // Every member stopped: once the lease is no longer certain, creates
    // get NO_RESOURCES (short lifetime, §7.4).
    etcd.stop_all();
    // While the lease is still certain (at least a second: keep-alives go
    // every TTL/3, certainty lasts TTL − margin), a renewal that needs no
    // write is answered from memory.
    let first = acked
        .iter()
        .find(|x| x.subscriber.octets()[1] == 1)
        .unwrap();
    let renewed = map_once(first.subscriber, first.internal_port, first.nonce, pa);
    assert_eq!(
        renewed.map(|(code, ext, _)| (code, ext)),
        Some((ResultCode::Success, first.external)),
        "a renewal without a write, etcd down, lease still certain"
    );
    // While the lease is still certain, a create reaches the engine and its
    // write fails (after the etcd timeout): NO_RESOURCES, and the shard
    // knows its writes fail until one succeeds again.
    let failed = subscriber(0, 1999);
    let _ = create_all(vec![(failed, 22)], route, 1, 1);
    // Certainty ends at most TTL − margin (9 s) after the last keep-alive.
    std::thread::sleep(Duration::from_secs(9));
    let (none, refused) = create_all(jobs(0, 2000..2020, &[22]), route, 2, 10);
    assert!(none.is_empty(), "nothing is acknowledged without etcd");
    assert!(
        refused
            .iter()
            .all(|(_, r)| *r == Some(ResultCode::NoResources)),
        "{refused:?}"
    );
    let (status, _) = common::call("GET", &a.url("/readyz"), None, None);
    assert_eq!(status, 503, "not ready without etcd");

    // etcd back: service resumes by itself, with no request to prompt it
    // (the failed write is retried each second), and nothing acknowledged
    // is lost.
    etcd.restart_all();
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::call("GET", &a.url("/readyz"), None, None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "a did not resume: {}",
            cluster_status(&a)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        owns(&a, "p0") && owns(&b, "p1"),
        "ownership kept: {}",
        cluster_status(&a)
    );
    let (after, other) = create_all(jobs(0, 3000..3050, &[22]), route, 2, 5);
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(after.len(), 50);
    let (p0, p1): (Vec<Acked>, Vec<Acked>) = acked
        .into_iter()
        .partition(|x| x.subscriber.octets()[1] == 1);
    all_renew(&a, &p0);
    all_renew(&b, &p1);
}

/// A PCP MAP for TCP `port` from `sub` with `lifetime` (0: delete).
fn map_datagram(sub: Ipv4Addr, port: u16, lifetime: u32) -> Vec<u8> {
    let req = pcp_wire::Request {
        lifetime,
        client_addr: IpAddr::V4(sub),
        data: pcp_wire::OpData::Map(pcp_wire::MapData {
            nonce: pcp_wire::Nonce(nonce_of(sub, port)),
            protocol: 6,
            internal_port: port,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: pcp_wire::Options::NONE,
    };
    let mut buf = vec![0u8; req.buffer_len()];
    req.emit(&mut buf).unwrap();
    buf
}

#[test]
fn a_node_paused_past_its_lease_answers_nothing_and_writes_nothing_after() {
    let _g = alone();
    let etcd = Etcd::start("pause");
    let prefix = "/pcpd/pause";
    let (a, b) = two_nodes("pause", &etcd, prefix);
    let pa = a.pcp_addr();
    let (acked, other) = create_all(jobs(0, 0..200, &[22]), |_| pa, 4, 3);
    assert!(other.is_empty(), "{other:?}");
    let before: Vec<(String, Vec<u8>)> = etcd.get_prefix(&format!("{prefix}/state/p0/"));

    a.signal("STOP");
    wait_owns(&b, "p0", TTL + Duration::from_secs(3));
    // While a sleeps, requests queue in its socket: deletes of acknowledged
    // mappings and new creations.
    let mut queued = Vec::new();
    for (i, x) in acked.iter().take(50).enumerate() {
        let s = UdpSocket::bind((x.subscriber, 0)).unwrap();
        s.send_to(&map_datagram(x.subscriber, 22, 0), pa).unwrap();
        queued.push(s);
        let new = subscriber(0, 5000 + i as u32);
        let s = UdpSocket::bind((new, 0)).unwrap();
        s.send_to(&map_datagram(new, 22, 3600), pa).unwrap();
        queued.push(s);
    }
    a.signal("CONT");
    let mut answers = Vec::new();
    for s in &queued {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 1100];
        if let Ok(n) = s.recv(&mut buf) {
            answers.push(pcp_wire::Response::parse(&buf[..n]).unwrap().result);
        }
    }
    assert!(
        answers.iter().all(|r| *r != ResultCode::Success),
        "the paused node answered success for a partition it lost: {answers:?}"
    );
    assert!(!owns(&a, "p0"), "{}", cluster_status(&a));
    // b answers for everything a had acknowledged.
    all_renew(&b, &acked);
    // An operator write on a after it resumed is refused too.
    let (status, _) = common::call(
        "POST",
        &a.url("/v1/mappings"),
        Some(common::TOKEN_WRITE),
        Some(
            serde_json::json!({"internal_addr": "127.1.9.9", "internal_port": 25, "protocol": "tcp"}),
        ),
    );
    assert_ne!(
        status, 201,
        "a static mapping made by a node that lost its partition"
    );
    std::thread::sleep(Duration::from_secs(1));
    // None of its writes landed: p0's state in etcd is what b loaded.
    let after = etcd.get_prefix(&format!("{prefix}/state/p0/"));
    assert_eq!(after, before, "the paused node's writes reached etcd");
    // a rejoins with a new lease; p0 prefers a, so b hands it back
    // (failback), and every mapping comes with it.
    wait_owns(&a, "p0", Duration::from_secs(15));
    all_renew(&a, &acked);
}

/// The same pause, made certain to break the node's keep-alive stream:
/// etcd restarts while the node sleeps, so after SIGCONT the node must open
/// a new stream, and etcd's answer to it is "lease not found" (an error, not
/// a TTL of 0). The node must take that as the loss it is and join again;
/// it once retried the stream for ever, connected in its own view and
/// absent from the cluster's.
#[test]
fn a_node_paused_while_etcd_restarts_sees_its_lease_gone_and_joins_again() {
    let _g = alone();
    let mut etcd = Etcd::start("pause-restart");
    let prefix = "/pcpd/pause-restart";
    let a = start_node("pause-restart", "a", &etcd, prefix);
    wait_owns(&a, "p0", Duration::from_secs(15));
    let pa = a.pcp_addr();
    let (acked, other) = create_all(jobs(0, 0..50, &[22]), |_| pa, 4, 3);
    assert!(other.is_empty(), "{other:?}");

    a.signal("STOP");
    etcd.stop_all();
    etcd.restart_all();
    // Nobody keeps a's lease alive now: wait (bounded) until etcd expired
    // it and a's liveness key is gone.
    let nodes = format!("{prefix}/nodes/");
    let started = Instant::now();
    while !etcd.get_prefix(&nodes).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a's lease never expired in etcd"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    a.signal("CONT");
    wait_owns(&a, "p0", Duration::from_secs(15));
    let status = cluster_status(&a);
    assert_eq!(status["nodes"], serde_json::json!(["a"]), "{status}");
    all_renew(&a, &acked);
}

#[test]
fn renewals_within_the_slack_write_nothing_and_deletes_are_written() {
    let _g = alone();
    let etcd = Etcd::start("renew");
    let prefix = "/pcpd/renew";
    let a = start_node("renew", "a", &etcd, prefix);
    wait_owns(&a, "p0", Duration::from_secs(15));
    let pa = a.pcp_addr();
    let (acked, other) = create_all(jobs(0, 0..200, &[22]), |_| pa, 4, 3);
    assert!(other.is_empty(), "{other:?}");
    let before = etcd.revision();
    for _ in 0..3 {
        all_renew(&a, &acked);
    }
    assert_eq!(
        etcd.revision(),
        before,
        "600 renewals within the stored expiry wrote to etcd"
    );
    // A delete is written, at once.
    for x in &acked[..10] {
        let s = UdpSocket::bind((x.subscriber, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(&map_datagram(x.subscriber, 22, 0), pa).unwrap();
        let mut buf = [0u8; 1100];
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(
            pcp_wire::Response::parse(&buf[..n]).unwrap().result,
            ResultCode::Success
        );
    }
    assert!(etcd.revision() > before);
    let mappings = state_records(&etcd, prefix)
        .into_iter()
        .filter(|(_, r)| matches!(r, Record::Mapping(_)))
        .count();
    assert_eq!(mappings, 190);
}

#[test]
fn a_write_after_the_ownership_key_changed_hands_is_fenced() {
    let _g = alone();
    let etcd = Etcd::start("fence");
    let prefix = "/pcpd/fence";
    let a = start_node("fence", "a", &etcd, prefix);
    wait_owns(&a, "p0", Duration::from_secs(15));
    let pa = a.pcp_addr();
    let (acked, other) = create_all(jobs(0, 0..50, &[22]), |_| pa, 4, 3);
    assert!(other.is_empty(), "{other:?}");
    let sockets: Vec<(Ipv4Addr, UdpSocket)> = (0..100)
        .map(|i| {
            let sub = subscriber(0, 1000 + i);
            (sub, UdpSocket::bind((sub, 0)).unwrap())
        })
        .collect();
    let before = etcd.get_prefix(&format!("{prefix}/state/p0/"));
    // Another owner's key replaces a's; a learns of it at its next poll,
    // but what it writes before that must not land.
    etcd.steal(prefix, "p0");
    for (sub, s) in &sockets {
        s.send_to(&map_datagram(*sub, 22, 3600), pa).unwrap();
    }
    std::thread::sleep(Duration::from_millis(700));
    let mut answers = Vec::new();
    for (_, s) in &sockets {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1100];
        if let Ok(n) = s.recv(&mut buf) {
            answers.push(pcp_wire::Response::parse(&buf[..n]).unwrap().result);
        }
    }
    assert!(
        answers.iter().all(|r| *r == ResultCode::NoResources),
        "{answers:?}\n{}",
        std::fs::read_to_string(a.dir.join("stderr.log")).unwrap_or_default()
    );
    let after = etcd.get_prefix(&format!("{prefix}/state/p0/"));
    assert_eq!(
        after, before,
        "a write of a node that no longer owns p0 landed"
    );
    let fenced = common::metric(
        &a.metrics_text(),
        "pcpd_cluster_etcd_failures_total{reason=\"fenced\"}",
    );
    eprintln!(
        "{} answered NO_RESOURCES by fencing, the rest dropped once a saw the new owner",
        answers.len()
    );
    if !answers.is_empty() {
        assert!(fenced.unwrap_or(0.0) >= 1.0, "refused, but not by fencing");
    }
    // a now knows: p0 is not its own, and it says so.
    std::thread::sleep(Duration::from_millis(600));
    assert!(!owns(&a, "p0"));
    assert_eq!(cluster_status(&a)["partitions"][0]["owner"], "intruder");
    drop(acked);
}

#[test]
fn etcd_unreachable_at_start_is_said_and_the_node_is_ready_once_it_is_up() {
    let _g = alone();
    let mut etcd = Etcd::stopped("late");
    let a = start_node("late", "a", &etcd, "/pcpd/late");
    std::thread::sleep(Duration::from_secs(2));
    let (status, body) = common::call("GET", &a.url("/readyz"), None, None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("etcd_unreachable")),
        "{body}"
    );
    let log = std::fs::read_to_string(a.dir.join("stderr.log")).unwrap();
    assert!(
        log.contains("etcd"),
        "pcpd says etcd is unreachable:\n{log}"
    );
    // Nothing is answered for a partition meanwhile.
    assert_eq!(
        map_once(
            subscriber(0, 1),
            22,
            nonce_of(subscriber(0, 1), 22),
            a.pcp_addr()
        ),
        None
    );
    etcd.restart_all();
    wait_owns(&a, "p0", Duration::from_secs(20));
    let (status, _) = common::call("GET", &a.url("/readyz"), None, None);
    assert_eq!(status, 200);
    let (code, _, _) = map_once(
        subscriber(0, 1),
        22,
        nonce_of(subscriber(0, 1), 22),
        a.pcp_addr(),
    )
    .unwrap();
    assert_eq!(code, ResultCode::Success);
}
