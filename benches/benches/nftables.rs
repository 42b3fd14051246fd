//! The nftables backend against the kernel: element changes per second
//! in batches of 1..10,000, and the cost of one batch, for both ways the
//! backend writes elements, side by side in the same run: in-process
//! netlink (the default) and `nft -f` (one process per batch). Needs root
//! and nft; it runs in a network namespace of its own so nothing touches
//! the host's ruleset.
//!
//! Baseline, measured in the same run: one `nft -f -` transaction that
//! changes nothing (the cost of starting nft and one netlink round trip).
//! Run: `cargo bench -p pcp-benches --bench nftables` (as root);
//! `-- netlink` or `-- nft` runs one backend only (for a profile).

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use pcp_dataplane::{Change, Dataplane, Entry, FirewallRules, NftablesDataplane};
use pcp_engine::MappingKind;

fn entry(i: u32, expires_ms: u64) -> Entry {
    Entry {
        kind: MappingKind::Map,
        external_addr: Ipv4Addr::new(192, 0, 2, (i / 60_000) as u8 + 1),
        external_port: 1024 + (i % 60_000) as u16,
        port_count: 1,
        protocol: 6,
        firewall: false,
        internal_addr: IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i)),
        internal_port: 8080,
        filters: Box::default(),
        expires_ms,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // Re-run ourselves inside a fresh network namespace.
    if std::env::var_os("PCPD_BENCH_IN_NETNS").is_none() {
        let me = std::env::current_exe().expect("own path");
        let status = Command::new("unshare")
            .arg("--net")
            .arg(me)
            .args(std::env::args().skip(1))
            .env("PCPD_BENCH_IN_NETNS", "1")
            .status()
            .expect("unshare (util-linux) runs; the bench needs root");
        std::process::exit(status.code().unwrap_or(1));
    }
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    let mut netlink = NftablesDataplane::open("pcpdbench_nl", "nft", FirewallRules::default())
        .expect("nft works (root)");
    let mut text = NftablesDataplane::open("pcpdbench_nft", "nft", FirewallRules::default())
        .expect("nft works (root)");
    text.set_netlink(false);
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
        + 3_600_000;

    let rounds = 5;
    let baseline = median(
        (0..rounds * 4)
            .map(|_| {
                let t = Instant::now();
                let status = Command::new("nft")
                    .args(["-f", "/dev/null"])
                    .status()
                    .expect("nft");
                assert!(status.success());
                t.elapsed()
            })
            .collect(),
    );
    println!(
        "baseline: one empty nft transaction {:.2} ms",
        baseline.as_secs_f64() * 1e3
    );
    println!("| batch | backend | add: ms/batch | add: changes/s | renew: ms/batch | delete: ms/batch (transaction) | delete: changes/s (transaction) | delete: ms until it holds | add batch / baseline |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a == "netlink" || a == "nft")
        .collect();
    for batch in [1u32, 10, 100, 1_000, 10_000] {
        for (name, dp) in [("netlink", &mut netlink), ("nft -f", &mut text)] {
            if !only.is_empty() && !only.iter().any(|o| name.starts_with(o.as_str())) {
                continue;
            }
            let (a, n, (d, held)) = measure(dp, batch, rounds, far);
            println!(
                "| {batch} | {name} | {:.3} | {:.0} | {:.3} | {:.3} | {:.0} | {:.3} | {:.2}x |",
                a.as_secs_f64() * 1e3,
                f64::from(batch) / a.as_secs_f64(),
                n.as_secs_f64() * 1e3,
                d.as_secs_f64() * 1e3,
                f64::from(batch) / d.as_secs_f64(),
                held.as_secs_f64() * 1e3,
                a.as_secs_f64() / baseline.as_secs_f64(),
            );
        }
    }
    let (nl, _) = netlink.transactions();
    assert!(
        nl > 0 || (!only.is_empty() && !only.iter().any(|o| o == "netlink")),
        "the netlink backend wrote over netlink"
    );
}

/// Median times of `rounds` batches of `batch` adds, expiry-only
/// renewals and deletes (the transaction, and until the removal holds:
/// an expired element matches until the kernel's next tick, which the
/// daemon's dataplane thread overlaps with the next transactions).
fn measure(
    dp: &mut NftablesDataplane,
    batch: u32,
    rounds: u32,
    far: u64,
) -> (Duration, Duration, (Duration, Duration)) {
    let (mut adds, mut renews, mut dels) = (Vec::new(), Vec::new(), Vec::new());
    let mut helds = Vec::new();
    for r in 0..rounds {
        let ups: Vec<Change> = (0..batch)
            .map(|i| Change::Upsert(entry(r * 20_000 + i, far)))
            .collect();
        let t = Instant::now();
        assert!(dp.apply(&ups).iter().all(Result::is_ok));
        adds.push(t.elapsed());
        // Renewals that only move the expiry (by a minute): inside the
        // elements' safety net, no kernel operation.
        let renew: Vec<Change> = (0..batch)
            .map(|i| Change::Upsert(entry(r * 20_000 + i, far + 60_000)))
            .collect();
        let t = Instant::now();
        assert!(dp.apply(&renew).iter().all(Result::is_ok));
        renews.push(t.elapsed());
        let rms: Vec<Change> = (0..batch)
            .map(|i| Change::Remove(entry(r * 20_000 + i, far).key()))
            .collect();
        let t = Instant::now();
        let (results, holds_at) = dp.apply_early(&rms);
        dels.push(t.elapsed());
        assert!(results.iter().all(Result::is_ok));
        if let Some(at) = holds_at {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
        dp.settle();
        helds.push(t.elapsed());
    }
    (median(adds), median(renews), (median(dels), median(helds)))
}
