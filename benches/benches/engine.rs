//! Engine benches: MAP create+delete and renew per second on one core, with
//! 1 k, 100 k and 1 M live mappings, and resident bytes per mapping; then
//! an expiry storm: the 1 M mappings, all due in the same second, expired
//! by `handle_timeout` a slice at a time (the longest call is what a shard
//! stalls for).
//!
//! Run: `cargo bench -p pcp-benches --bench engine`. Bytes per mapping and
//! the storm are printed (bytes from /proc/self/statm) as they happen.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pcp_engine::{BlockAllocator, Compiled, Engine, EngineConfig};
use pcp_wire::{MapData, Nonce, OpData, Options, Request};

const T0: u64 = 1_767_225_600_000;
const PER_SUBSCRIBER: u32 = 16;

fn config() -> EngineConfig {
    serde_yaml::from_str(
        r#"
pools:
  big:
    prefixes: [198.18.0.0/15]
    block_size: 512
    mode: dynamic
profiles:
  bench: { max_mappings: 64, max_blocks: 2, rate_per_sec: 1000000000, burst: 1000000000 }
subscribers:
  - prefixes: [100.64.0.0/10]
    pool: big
    profile: bench
"#,
    )
    .expect("bench config")
}

fn subscriber(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i / PER_SUBSCRIBER))
}

fn request(i: u32, lifetime: u32) -> Vec<u8> {
    let req = Request {
        lifetime,
        client_addr: subscriber(i),
        data: OpData::Map(MapData {
            nonce: Nonce([7; 12]),
            protocol: 6,
            internal_port: 10_000 + (i % PER_SUBSCRIBER) as u16,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::NONE,
    };
    let mut buf = vec![0u8; 60];
    req.emit(&mut buf).expect("fits");
    buf
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

struct Filled {
    engine: Engine,
    /// (source, renewal request) for a sample spread over the table.
    renew: Vec<(SocketAddr, Vec<u8>)>,
}

fn fill(n: u32) -> Filled {
    let cfg = config();
    let shared = Arc::new(BlockAllocator::new(&cfg));
    let compiled = Arc::new(Compiled::new(cfg, &shared).expect("valid"));
    let before = rss_bytes();
    let mut engine = Engine::new(compiled, shared, 0, T0, 1);
    let mut out = [0u8; 1100];
    for i in 0..n {
        let src = SocketAddr::new(subscriber(i), 5000);
        engine
            .handle(T0, src, &request(i, 86_400), &mut out)
            .expect("answered");
        assert_eq!(out[3], 0, "mapping {i} granted");
        while engine.poll_event().is_some() {}
    }
    let after = rss_bytes();
    eprintln!(
        "engine: {n} mappings, {} subscribers: {:.0} resident bytes per mapping",
        n.div_ceil(PER_SUBSCRIBER),
        (after.saturating_sub(before)) as f64 / f64::from(n)
    );
    let renew = (0..4096u32)
        .map(|k| {
            let i = (k * 7919) % n;
            (SocketAddr::new(subscriber(i), 5000), request(i, 86_400))
        })
        .collect();
    Filled { engine, renew }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    for n in [1_000u32, 100_000, 1_000_000] {
        let mut f = fill(n);
        let mut out = [0u8; 1100];
        let mut k = 0usize;
        group.bench_function(format!("renew/{n}"), |b| {
            b.iter(|| {
                let (src, req) = &f.renew[k % f.renew.len()];
                k += 1;
                let r = f.engine.handle(T0, *src, black_box(req), &mut out);
                while f.engine.poll_event().is_some() {}
                r
            })
        });
        // Create a fresh mapping and delete it: the table size stays n.
        let extra_create: Vec<Vec<u8>> = (0..4096u32)
            .map(|k| {
                let mut r = request(k * PER_SUBSCRIBER, 3600);
                r[40..42].copy_from_slice(&(20_000 + (k % 1000) as u16).to_be_bytes());
                r
            })
            .collect();
        let extra_delete: Vec<Vec<u8>> = extra_create
            .iter()
            .map(|r| {
                let mut d = r.clone();
                d[4..8].copy_from_slice(&0u32.to_be_bytes());
                d
            })
            .collect();
        let mut j = 0usize;
        group.throughput(Throughput::Elements(2));
        group.bench_function(format!("create+delete/{n}"), |b| {
            b.iter_batched(
                || {
                    j += 1;
                    j % extra_create.len()
                },
                |idx| {
                    let src = SocketAddr::new(subscriber(idx as u32 * PER_SUBSCRIBER), 5000);
                    f.engine.handle(T0, src, &extra_create[idx], &mut out);
                    f.engine.handle(T0, src, &extra_delete[idx], &mut out);
                    while f.engine.poll_event().is_some() {}
                },
                BatchSize::SmallInput,
            )
        });
        group.throughput(Throughput::Elements(1));
        if n == 1_000_000 {
            storm(&mut f.engine);
        }
        drop(f);
    }
    group.finish();
}

/// Every mapping `fill` made has the same lifetime from the same instant:
/// all expire in one second. Times each `handle_timeout` call until none
/// is due.
fn storm(engine: &mut Engine) {
    let due = T0 + 86_401_000;
    let before = engine.mapping_count();
    let (mut calls, mut longest, started) = (0u32, Duration::ZERO, Instant::now());
    while engine.poll_timeout().is_some_and(|t| t <= due) {
        let t = Instant::now();
        engine.handle_timeout(due);
        while engine.poll_event().is_some() {}
        longest = longest.max(t.elapsed());
        calls += 1;
    }
    eprintln!(
        "engine: expiry storm: {} of {before} mappings expired in {calls} calls of at most {} timers; longest call {:.2} ms, all {:.0} ms",
        before - engine.mapping_count(),
        pcp_engine::TIMER_BUDGET,
        longest.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
