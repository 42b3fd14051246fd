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

    let baseline_rounds = 20;
    let baseline = median(
        (0..baseline_rounds)
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
    println!("| batch | backend | add: ms/batch | add: changes/s | add: CPU µs/change | renew: ms/batch | delete: ms/batch (transaction) | delete: changes/s (transaction) | delete: CPU µs/change | delete: ms until it holds | add batch / baseline |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a == "netlink" || a == "nft")
        .collect();
    for batch in [1u32, 10, 100, 1_000, 10_000] {
        for (name, dp) in [("netlink", &mut netlink), ("nft -f", &mut text)] {
            if !only.is_empty() && !only.iter().any(|o| name.starts_with(o.as_str())) {
                continue;
            }
            // Medians of more rounds where a round is short: the machine
            // is shared and one round's wall time is noisy.
            let rounds = if batch >= 10_000 { 5 } else { 11 };
            let m = measure(dp, batch, rounds, far);
            let per_change = |t: Duration| t.as_secs_f64() * 1e6 / f64::from(batch);
            println!(
                "| {batch} | {name} | {:.3} | {:.0} | {:.2} | {:.3} | {:.3} | {:.0} | {:.2} | {:.3} | {:.2}x |",
                m.add.as_secs_f64() * 1e3,
                f64::from(batch) / m.add.as_secs_f64(),
                per_change(m.add_cpu),
                m.renew.as_secs_f64() * 1e3,
                m.delete.as_secs_f64() * 1e3,
                f64::from(batch) / m.delete.as_secs_f64(),
                per_change(m.delete_cpu),
                m.held.as_secs_f64() * 1e3,
                m.add.as_secs_f64() / baseline.as_secs_f64(),
            );
        }
    }
    let (nl, _) = netlink.transactions();
    assert!(
        nl > 0 || (!only.is_empty() && !only.iter().any(|o| o == "netlink")),
        "the netlink backend wrote over netlink"
    );
}

/// Medians over the rounds of one batch size.
struct Measured {
    add: Duration,
    /// CPU time of one batch of adds: this thread's (with netlink, the
    /// kernel's work on the transaction is done in its send) and that of
    /// the `nft` processes it ran.
    add_cpu: Duration,
    renew: Duration,
    delete: Duration,
    delete_cpu: Duration,
    held: Duration,
}

/// This thread's CPU time plus that of the child processes it waited for.
fn cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    use nix::time::{clock_gettime, ClockId};
    let own =
        clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from);
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_micros(t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64)
    };
    let children = getrusage(UsageWho::RUSAGE_CHILDREN)
        .map_or(Duration::ZERO, |u| tv(u.user_time()) + tv(u.system_time()));
    own + children
}

/// Median times of `rounds` batches of `batch` adds, expiry-only
/// renewals and deletes (the transaction, and until the removal holds:
/// an expired element matches until the kernel's next tick, which the
/// daemon's dataplane thread overlaps with the next transactions).
fn measure(dp: &mut NftablesDataplane, batch: u32, rounds: u32, far: u64) -> Measured {
    let (mut adds, mut renews, mut dels) = (Vec::new(), Vec::new(), Vec::new());
    let (mut add_cpu, mut del_cpu, mut helds) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let ups: Vec<Change> = (0..batch)
            .map(|i| Change::Upsert(entry(r * 20_000 + i, far)))
            .collect();
        let (t, c) = (Instant::now(), cpu());
        assert!(dp.apply(&ups).iter().all(Result::is_ok));
        adds.push(t.elapsed());
        add_cpu.push(cpu().saturating_sub(c));
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
        let (t, c) = (Instant::now(), cpu());
        let (results, holds_at) = dp.apply_early(&rms);
        dels.push(t.elapsed());
        del_cpu.push(cpu().saturating_sub(c));
        assert!(results.iter().all(Result::is_ok));
        if let Some(at) = holds_at {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
        dp.settle();
        helds.push(t.elapsed());
    }
    Measured {
        add: median(adds),
        add_cpu: median(add_cpu),
        renew: median(renews),
        delete: median(dels),
        delete_cpu: median(del_cpu),
        held: median(helds),
    }
}
