//! A real etcd cluster (three members on loopback, Debian's etcd-server)
//! and pcpd nodes in cluster mode, for tests/cluster.rs. Every process is
//! started here, in its own temporary directory, and killed on drop.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, Acked, Daemon};

/// Loopback addresses of the three members.
pub const MEMBERS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 0, 41),
    Ipv4Addr::new(127, 0, 0, 42),
    Ipv4Addr::new(127, 0, 0, 43),
];

pub struct Etcd {
    pub dir: PathBuf,
    children: Vec<Option<Child>>,
    rt: tokio::runtime::Runtime,
}

fn initial_cluster() -> String {
    MEMBERS
        .iter()
        .enumerate()
        .map(|(i, ip)| format!("e{i}=http://{ip}:2380"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Etcd {
    /// Three fresh members; waits (bounded) until the cluster has a leader.
    pub fn start(name: &str) -> Etcd {
        let mut e = Etcd::stopped(name);
        e.restart_all();
        e
    }

    /// The cluster's directory and addresses, no member running yet.
    pub fn stopped(name: &str) -> Etcd {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Etcd {
            dir: common::temp_dir(&format!("etcd-{name}")),
            children: vec![None, None, None],
            rt,
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        MEMBERS
            .iter()
            .map(|ip| format!("http://{ip}:2379"))
            .collect()
    }

    /// Starts (or restarts, on its data) member `i`.
    pub fn start_member(&mut self, i: usize) {
        let ip = MEMBERS[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("e{i}.log")))
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(self.dir.join(format!("e{i}")))
            .args(["--listen-client-urls", &format!("http://{ip}:2379")])
            .args(["--advertise-client-urls", &format!("http://{ip}:2379")])
            .args(["--listen-peer-urls", &format!("http://{ip}:2380")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:2380"),
            ])
            .args(["--initial-cluster", &initial_cluster()])
            .args(["--initial-cluster-token", "pcpd-test"])
            .args(["--initial-cluster-state", "new"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd runs (Debian package etcd-server; .ci/prereqs installs it)");
        self.children[i] = Some(child);
    }

    /// SIGKILL of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop_all(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }

    pub fn restart_all(&mut self) {
        for i in 0..3 {
            if self.children[i].is_none() {
                self.start_member(i);
            }
        }
        self.wait_healthy(Duration::from_secs(30));
    }

    fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.rt.block_on(async {
                let opts = etcd_client::ConnectOptions::new()
                    .with_timeout(Duration::from_secs(1))
                    .with_require_leader(true);
                let mut c = etcd_client::Client::connect(self.endpoints(), Some(opts))
                    .await
                    .ok()?;
                c.put("/health-check", "1", None).await.ok()
            });
            if ok.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The cluster's current revision (every write bumps it).
    pub fn revision(&self) -> i64 {
        self.rt.block_on(async {
            let mut c = etcd_client::Client::connect(self.endpoints(), None)
                .await
                .unwrap();
            let r = c.get("/", None).await.unwrap();
            r.header().unwrap().revision()
        })
    }

    /// Replaces partition `p`'s ownership key with one of an intruder
    /// (its own lease), as a new owner's claim would.
    pub fn steal(&self, prefix: &str, partition: &str) {
        self.rt.block_on(async {
            let mut c = etcd_client::Client::connect(self.endpoints(), None)
                .await
                .unwrap();
            let lease = c.lease_grant(60, None).await.unwrap().id();
            let key = format!("{prefix}/owner/{partition}");
            c.delete(key.as_str(), None).await.unwrap();
            let opts = etcd_client::PutOptions::new().with_lease(lease);
            c.put(key.as_str(), "intruder", Some(opts)).await.unwrap();
        })
    }

    /// Every key under `prefix` with its value.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.rt.block_on(async {
            let mut c = etcd_client::Client::connect(self.endpoints(), None)
                .await
                .unwrap();
            let r = c
                .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .unwrap();
            r.kvs()
                .iter()
                .map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec()))
                .collect()
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Node addresses: a, b, c.
pub fn node_ip(node: &str) -> Ipv4Addr {
    match node {
        "a" => Ipv4Addr::new(127, 0, 0, 51),
        "b" => Ipv4Addr::new(127, 0, 0, 52),
        _ => Ipv4Addr::new(127, 0, 0, 53),
    }
}

/// Partition p0 (subscribers 127.1.0.0/16, prefers a) and p1 (127.2.0.0/16,
/// prefers b), cut from the default pool 192.0.2.0/24.
pub fn cluster_config(
    node: &str,
    dir: &std::path::Path,
    etcd: &Etcd,
    prefix: &str,
) -> serde_yaml::Value {
    let mut v = common::config_for(node_ip(node), dir);
    common::no_rate_limit(&mut v);
    v["cluster"] = serde_yaml::to_value(serde_json::json!({
        "node": node,
        "etcd": { "endpoints": etcd.endpoints(), "prefix": prefix, "timeout_ms": 1500 },
        "lease_ttl_secs": 3,
        "margin_ms": 1000,
        "partitions": [
            { "name": "p0", "subscribers": ["127.1.0.0/16"], "pool": "default",
              "external": ["192.0.2.0/25"], "prefer": ["a"] },
            { "name": "p1", "subscribers": ["127.2.0.0/16"], "pool": "default",
              "external": ["192.0.2.128/25"], "prefer": ["b"] },
        ],
    }))
    .unwrap();
    v
}

pub fn start_node(name: &str, node: &str, etcd: &Etcd, prefix: &str) -> Daemon {
    start_node_with(name, node, etcd, prefix, |_| {})
}

/// [`start_node`] with the configuration edited first.
pub fn start_node_with(
    name: &str,
    node: &str,
    etcd: &Etcd,
    prefix: &str,
    edit: impl FnOnce(&mut serde_yaml::Value),
) -> Daemon {
    let dir = common::temp_dir(&format!("{name}-{node}"));
    let mut cfg = cluster_config(node, &dir, etcd, prefix);
    edit(&mut cfg);
    Daemon::start_in(dir, node_ip(node), cfg)
}

/// The node's `GET /v1/cluster`.
pub fn cluster_status(d: &Daemon) -> serde_json::Value {
    let (status, body) = common::call("GET", &d.url("/v1/cluster"), Some(common::TOKEN_READ), None);
    assert_eq!(status, 200, "{body}");
    body
}

/// Whether `d` owns `partition` and answers for it.
pub fn owns(d: &Daemon, partition: &str) -> bool {
    let url = d.url(&format!("/v1/cluster/partitions/{partition}/health"));
    common::status_of(&url) == 200
}

/// Waits until `d` owns `partition`; returns how long it took.
pub fn wait_owns(d: &Daemon, partition: &str, within: Duration) -> Duration {
    let started = Instant::now();
    while !owns(d, partition) {
        assert!(
            started.elapsed() < within,
            "{partition} not owned within {within:?}: {}",
            cluster_status(d)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// Subscriber `i` of partition `p` (0 or 1).
pub fn subscriber(p: u8, i: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 1 + p, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// One MAP (TCP, 3600 s) from `subscriber`'s own address; bounded wait.
pub fn map_once(
    subscriber: Ipv4Addr,
    internal_port: u16,
    nonce: [u8; 12],
    server: SocketAddr,
) -> Option<(pcp_wire::ResultCode, (IpAddr, u16), u32)> {
    common::map_from(subscriber, internal_port, nonce, server)
}

pub fn nonce_of(s: Ipv4Addr, port: u16) -> [u8; 12] {
    let mut n = [7u8; 12];
    n[..4].copy_from_slice(&s.octets());
    n[4..6].copy_from_slice(&port.to_be_bytes());
    n
}

/// A request that got no success: what it asked, and the last answer.
pub type Unacked = ((Ipv4Addr, u16), Option<pcp_wire::ResultCode>);

/// Creates a mapping for each (subscriber, port) against the server
/// `target` names at the time (as routing would), on `threads` threads,
/// retrying a request without an answer up to `tries` times. Returns the
/// acknowledged ones and every other outcome.
pub fn create_all(
    jobs: Vec<(Ipv4Addr, u16)>,
    target: impl Fn(Ipv4Addr) -> SocketAddr + Sync,
    threads: usize,
    tries: u32,
) -> (Vec<Acked>, Vec<Unacked>) {
    let chunks: Vec<Vec<(Ipv4Addr, u16)>> = {
        let mut c = vec![Vec::new(); threads];
        for (i, j) in jobs.into_iter().enumerate() {
            c[i % threads].push(j);
        }
        c
    };
    let target = &target;
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    let mut acked = Vec::new();
                    let mut other = Vec::new();
                    for (sub, port) in chunk {
                        let nonce = nonce_of(sub, port);
                        let mut last = None;
                        for _ in 0..tries {
                            match map_once(sub, port, nonce, target(sub)) {
                                Some((pcp_wire::ResultCode::Success, ext, _)) => {
                                    acked.push(Acked {
                                        subscriber: sub,
                                        internal_port: port,
                                        nonce,
                                        external: ext,
                                    });
                                    last = Some(pcp_wire::ResultCode::Success);
                                    break;
                                }
                                Some((code, _, _)) => {
                                    last = Some(code);
                                    break;
                                }
                                None => last = None,
                            }
                        }
                        if last != Some(pcp_wire::ResultCode::Success) {
                            other.push(((sub, port), last));
                        }
                    }
                    (acked, other)
                })
            })
            .collect();
        let mut acked = Vec::new();
        let mut other = Vec::new();
        for h in handles {
            let (a, o) = h.join().unwrap();
            acked.extend(a);
            other.extend(o);
        }
        (acked, other)
    })
}

/// RFC 6887 §8.5: the client's check of a new Epoch Time against the
/// previous one (times in seconds). True when the server kept state.
pub fn epoch_valid(prev_server: u32, curr_server: u32, client_delta: u64) -> bool {
    let (prev, curr) = (i64::from(prev_server), i64::from(curr_server));
    if curr < prev - 1 {
        return false;
    }
    let server_delta = curr - prev;
    let client_delta = client_delta as i64;
    !(client_delta + 2 < server_delta - server_delta / 16
        || server_delta + 2 < client_delta - client_delta / 16)
}

/// Decoded `state/` records under `prefix`: (partition, record).
pub fn state_records(etcd: &Etcd, prefix: &str) -> Vec<(String, pcp_store::Record)> {
    etcd.get_prefix(&format!("{prefix}/state/"))
        .into_iter()
        .map(|(k, v)| {
            let partition = k
                .strip_prefix(&format!("{prefix}/state/"))
                .and_then(|r| r.split('/').next())
                .unwrap()
                .to_string();
            let rec =
                pcp_store::decode_record(&v).unwrap_or_else(|| panic!("{k}: undecodable value"));
            (partition, rec)
        })
        .collect()
}

/// Mappings an admin API lists (up to 10 000).
pub fn api_mappings(d: &Daemon) -> Vec<serde_json::Value> {
    let (status, body) = common::call(
        "GET",
        &d.url("/v1/mappings?limit=10000"),
        Some(common::TOKEN_READ),
        None,
    );
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().unwrap().clone()
}

/// Every acknowledged mapping renews on `d` with the same external
/// endpoint (a request without an answer is sent again, up to 5 times).
pub fn all_renew(d: &Daemon, acked: &[Acked]) {
    common::all_present_retrying(d, acked, 5)
}
