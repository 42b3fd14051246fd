//! The nftables backend against the real kernel. Needs root and `nft`
//! (CI installs nftables and runs as root); a missing prerequisite fails
//! the test, it never skips.
#![allow(missing_docs)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use pcp_dataplane::{
    Change, Dataplane, Entry, FirewallRules, Key, NftablesDataplane, Reconciled, Unsolicited,
};
use pcp_engine::{Block, MappingKind};
use serde_json::Value;

struct Table(String);

impl Drop for Table {
    fn drop(&mut self) {
        for family in ["ip", "ip6"] {
            let _ = Command::new("nft")
                .args(["delete", "table", family, &self.0])
                .status();
        }
    }
}

fn table(name: &str) -> Table {
    let t = Table(format!("pcpdtest_{name}_{}", std::process::id()));
    for family in ["ip", "ip6"] {
        let _ = Command::new("nft")
            .args(["delete", "table", family, &t.0])
            .output();
    }
    t
}

/// Elements of one map or set as (key text, JSON element).
fn elements(table: &str, set: &str) -> Vec<Value> {
    let family = if set.ends_with('6') { "ip6" } else { "ip" };
    let out = Command::new("nft")
        .args(["-j", "list", "table", family, table])
        .output()
        .expect("nft is installed (apt-get install nftables)");
    assert!(
        out.status.success(),
        "nft list: {} (run as root)",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("map").or_else(|| i.get("set")))
        .filter(|m| m["name"] == set)
        .flat_map(|m| m["elem"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Whether `set` of `table` is empty within 200 ms: a removed element
/// with a kernel timeout is expired, not deleted (nftables/script.rs), and
/// the kernel stops listing it within a jiffy.
fn emptied(table: &str, set: &str) -> bool {
    let until = std::time::Instant::now() + std::time::Duration::from_millis(200);
    loop {
        if elements(table, set).is_empty() {
            return true;
        }
        if std::time::Instant::now() > until {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Applies `changes` and asserts every one held.
fn apply_ok(dp: &mut NftablesDataplane, changes: &[Change]) {
    let results = dp.apply(changes);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn map_entry(ext_port: u16, count: u16, lifetime_s: u64, filters: Vec<(IpAddr, u8, u16)>) -> Entry {
    Entry {
        kind: MappingKind::Map,
        external_addr: Ipv4Addr::new(192, 0, 2, 1),
        external_port: ext_port,
        port_count: count,
        protocol: 6,
        firewall: false,
        internal_addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
        internal_port: 8080,
        filters: filters.into(),
        expires_ms: now_ms() + lifetime_s * 1000,
    }
}

fn peer_entry() -> Entry {
    Entry {
        kind: MappingKind::Peer {
            remote_addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
            remote_port: 443,
        },
        external_addr: Ipv4Addr::new(192, 0, 2, 1),
        external_port: 1100,
        port_count: 1,
        protocol: 17,
        firewall: false,
        internal_addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
        internal_port: 5000,
        filters: Box::default(),
        expires_ms: now_ms() + 600_000,
    }
}

fn timeout_of(el: &Value) -> u64 {
    el[0]["elem"]["timeout"].as_u64().unwrap_or(0)
}

#[test]
fn mappings_become_map_elements_with_kernel_timeouts() {
    let t = table("elems");
    let mut dp = NftablesDataplane::open(&t.0, "nft", FirewallRules::default())
        .expect("nft works (root, nftables installed)");
    let sub = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
    let block = Block {
        addr: Ipv4Addr::new(192, 0, 2, 1),
        first: 1024,
        len: 512,
    };
    let filter = vec![(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)), 24, 0)];
    let changes = vec![
        Change::AddBlock {
            subscriber: sub,
            block,
        },
        Change::Upsert(map_entry(1050, 2, 3600, filter)),
        Change::Upsert(peer_entry()),
    ];
    assert!(dp.apply(&changes).iter().all(Result::is_ok));
    // DNAT: one element per port of the PORT_SET, timeout = lifetime + the
    // 6 h safety net (the kernel never drops it before pcpd does).
    let dnat = elements(&t.0, "dnat4");
    assert_eq!(dnat.len(), 2, "{dnat:?}");
    assert!((25200..=25201).contains(&timeout_of(&dnat[0])), "{dnat:?}");
    assert_eq!(dnat[0][1]["concat"][0], "100.64.0.1");
    // §11.1: outbound from the mapped internal ports leaves from the mapping.
    let snat = elements(&t.0, "snat4");
    assert_eq!(snat.len(), 2, "{snat:?}");
    // PEER SNAT for one five-tuple; subscriber SNAT to its block.
    assert_eq!(elements(&t.0, "peer4").len(), 1);
    let subs = elements(&t.0, "subs");
    assert_eq!(
        subs[0][1]["concat"][1]["range"],
        serde_json::json!([1024, 1535])
    );
    // FILTER (RFC 6887 §13.3): both ports are filtered, one allowed prefix each.
    assert_eq!(elements(&t.0, "filtered4").len(), 2);
    assert_eq!(elements(&t.0, "filter4").len(), 2);

    // A renewal that only moves the expiry, within the safety net, costs
    // no kernel operation: the element keeps its first timeout.
    let filter = vec![(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)), 24, 0)];
    apply_ok(
        &mut dp,
        &[Change::Upsert(map_entry(1050, 2, 7200, filter.clone()))],
    );
    assert!((25200..=25201).contains(&timeout_of(&elements(&t.0, "dnat4")[0])));
    // Past it, the element is rewritten with a new timeout.
    apply_ok(
        &mut dp,
        &[Change::Upsert(map_entry(1050, 2, 86_400, filter))],
    );
    assert!(timeout_of(&elements(&t.0, "dnat4")[0]) >= 86_400 + 21_600);
    // Other changes (the filters here) rewrite it too.
    apply_ok(
        &mut dp,
        &[Change::Upsert(map_entry(1050, 2, 86_400, Vec::new()))],
    );
    let dnat = elements(&t.0, "dnat4");
    assert_eq!(dnat.len(), 2);
    assert!(
        elements(&t.0, "filter4").is_empty(),
        "filters replaced with the mapping's current ones"
    );

    // Delete.
    let key = map_entry(1050, 2, 1, Vec::new()).key();
    apply_ok(&mut dp, &[Change::Remove(key)]);
    assert!(emptied(&t.0, "dnat4"));

    // A restarted pcpd learns what is installed, and can rewrite it.
    drop(dp);
    let mut again = NftablesDataplane::open(&t.0, "nft", FirewallRules::default()).unwrap();
    let installed: Vec<Key> = again.installed().into_iter().map(|(k, _)| k).collect();
    assert!(installed.contains(&peer_entry().key()), "{installed:?}");
    assert!(
        installed.iter().any(|k| matches!(
            k,
            Key::SubscriberBlock {
                first_port: 1024,
                ..
            }
        )),
        "{installed:?}"
    );
    apply_ok(
        &mut again,
        &[
            Change::Upsert(peer_entry()),
            Change::AddBlock {
                subscriber: sub,
                block,
            },
        ],
    );
    assert_eq!(elements(&t.0, "peer4").len(), 1);
    apply_ok(
        &mut again,
        &[Change::RemoveBlock {
            subscriber: sub,
            block,
        }],
    );
    assert!(elements(&t.0, "subs").is_empty());
}

#[test]
fn a_failed_batch_is_reported_per_change() {
    let t = table("errors");
    let mut dp = NftablesDataplane::open(&t.0, "nft", FirewallRules::default())
        .expect("nft works (root, nftables installed)");
    // Someone else put a conflicting element in our map behind our back.
    let status = Command::new("nft")
        .args([
            "add",
            "element",
            "ip",
            &t.0,
            "dnat4",
            "{ 192.0.2.1 . tcp . 1060 : 10.9.9.9 . 1 }",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let mut ipv6 = map_entry(1070, 1, 600, Vec::new());
    ipv6.internal_addr = "2001:db8::5".parse().unwrap();
    let results = dp.apply(&[
        Change::Upsert(map_entry(1050, 1, 600, Vec::new())),
        Change::Upsert(map_entry(1060, 1, 600, Vec::new())),
        Change::Upsert(ipv6),
    ]);
    assert!(results[0].is_ok(), "{results:?}");
    assert!(results[1].is_err(), "the conflicting element: {results:?}");
    assert!(
        results[2].is_err(),
        "IPv6 internal addresses are not NAT44: {results:?}"
    );
    let dnat = elements(&t.0, "dnat4");
    assert_eq!(
        dnat.len(),
        2,
        "the good change landed, the conflict is untouched: {dnat:?}"
    );
    let installed: Vec<Key> = dp.installed().into_iter().map(|(k, _)| k).collect();
    assert!(installed.contains(&map_entry(1050, 1, 1, Vec::new()).key()));
    assert!(!installed.contains(&map_entry(1060, 1, 1, Vec::new()).key()));
}

#[test]
fn deletes_are_idempotent_and_batches_see_their_own_changes() {
    let t = table("idem");
    let mut dp = NftablesDataplane::open(&t.0, "nft", FirewallRules::default())
        .expect("nft works (root, nftables installed)");
    let e = map_entry(1200, 1, 600, Vec::new());
    apply_ok(&mut dp, &[Change::Upsert(e.clone())]);
    // The kernel (or an operator) removed it behind pcpd's back.
    let status = Command::new("nft")
        .args(["flush", "map", "ip", &t.0, "dnat4"])
        .status()
        .unwrap();
    assert!(status.success());
    apply_ok(&mut dp, &[Change::Remove(e.key())]);
    assert!(emptied(&t.0, "snat4"));
    // Created and deleted in one batch: nothing is left behind.
    let f = map_entry(1201, 1, 600, Vec::new());
    apply_ok(
        &mut dp,
        &[Change::Upsert(f.clone()), Change::Remove(f.key())],
    );
    assert!(emptied(&t.0, "dnat4"));
    assert!(dp.installed().is_empty());
}

#[test]
fn a_removed_element_expires_at_once_and_its_key_can_be_taken_again() {
    let t = table("expire");
    let mut dp = NftablesDataplane::open(&t.0, "nft", FirewallRules::default())
        .expect("nft works (root, nftables installed)");
    let e = map_entry(1300, 1, 600, Vec::new());
    apply_ok(&mut dp, &[Change::Upsert(e.clone())]);
    // Removed: over netlink the element's expiration moves to now instead
    // of a delete (which waits for a grace period); the kernel no longer
    // holds it a moment later, far before its 600 s + safety net.
    apply_ok(&mut dp, &[Change::Remove(e.key())]);
    for el in elements(&t.0, "dnat4") {
        let expires = el[0]["elem"]["expires"].as_u64().unwrap_or(u64::MAX);
        assert!(
            expires <= 1,
            "a removed element still expires in {expires} s: {el}"
        );
    }
    assert!(emptied(&t.0, "dnat4"));
    assert!(emptied(&t.0, "snat4"));
    // The same external endpoint for another internal host right away: the
    // kernel would refuse the key with another value while the expired
    // element is still there; the dataplane waits that out.
    let mut other = map_entry(1300, 1, 600, Vec::new());
    other.internal_addr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
    let f = map_entry(1301, 1, 600, Vec::new());
    apply_ok(&mut dp, &[Change::Upsert(f.clone())]);
    apply_ok(&mut dp, &[Change::Remove(f.key())]);
    apply_ok(&mut dp, &[Change::Upsert(other)]);
    let mut g = map_entry(1301, 1, 600, Vec::new());
    g.internal_addr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 3));
    apply_ok(&mut dp, &[Change::Upsert(g)]);
    let dnat: Vec<String> = elements(&t.0, "dnat4")
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(dnat.len(), 2, "{dnat:?}");
    assert!(dnat.iter().any(|e| e.contains("100.64.0.2")), "{dnat:?}");
    assert!(dnat.iter().any(|e| e.contains("100.64.0.3")), "{dnat:?}");
}

#[test]
fn nested_filters_install_in_any_order() {
    // The kernel refuses overlapping intervals in a concatenated set;
    // §13.3 allows a client to send nested prefixes.
    let t = table("nested");
    let mut dp = NftablesDataplane::open(&t.0, "nft", FirewallRules::default())
        .expect("nft works (root, nftables installed)");
    let a = |s: &str| s.parse::<IpAddr>().unwrap();
    for (port, filters) in [
        (1300, vec![(a("10.0.0.0"), 8, 0), (a("10.1.2.3"), 32, 443)]),
        (1301, vec![(a("10.1.2.3"), 32, 443), (a("10.0.0.0"), 8, 0)]),
        (
            1302,
            vec![
                (a("10.1.0.0"), 16, 0),
                (a("10.0.0.0"), 8, 0),
                (a("10.0.0.0"), 8, 0),
            ],
        ),
    ] {
        let mut e = map_entry(port, 1, 600, filters);
        e.internal_port = port;
        let results = dp.apply(&[Change::Upsert(e)]);
        assert!(results.iter().all(Result::is_ok), "{port}: {results:?}");
    }
    assert_eq!(elements(&t.0, "filter4").len(), 3);
}

#[test]
fn reopened_table_is_split_by_subscriber_and_reconciled() {
    let t = table("split");
    let mut dp = NftablesDataplane::open(&t.0, "nft", FirewallRules::default())
        .expect("nft works (root, nftables installed)");
    let mut entries = Vec::new();
    for i in 0..6u8 {
        let mut e = map_entry(1400 + u16::from(i), 1, 600, Vec::new());
        e.internal_addr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 10 + i));
        if i == 0 {
            e.filters = vec![("198.51.100.0".parse().unwrap(), 24, 0)].into();
        }
        entries.push(e);
    }
    let changes: Vec<Change> = entries.iter().cloned().map(Change::Upsert).collect();
    assert!(dp.apply(&changes).iter().all(Result::is_ok));
    drop(dp);

    let parts = NftablesDataplane::open(&t.0, "nft", FirewallRules::default())
        .unwrap()
        .split(2);
    for (shard, part) in parts.iter().enumerate() {
        for (key, _) in part.installed() {
            let owner = entries.iter().find(|e| e.key() == key).unwrap();
            assert_eq!(pcp_engine::shard_of(owner.internal_addr, 2), shard);
        }
    }
    // Shard 0 reconciles with the engine's view: it still wants all of its
    // mappings but one; identical ones are not rewritten.
    let mut part0 = parts.into_iter().next().unwrap();
    let mine: Vec<Entry> = entries
        .iter()
        .filter(|e| pcp_engine::shard_of(e.internal_addr, 2) == 0)
        .cloned()
        .collect();
    let keep: Vec<Change> = mine[1..].iter().cloned().map(Change::Upsert).collect();
    let done = part0.reconcile(keep);
    assert_eq!(
        done,
        Reconciled {
            installed: 0,
            removed: 1,
            failed: 0
        }
    );
    assert_eq!(elements(&t.0, "dnat4").len(), 5);
    // The filter of the removed mapping went with it.
    assert!(!mine[0].filters.is_empty());
    assert!(elements(&t.0, "filter4").is_empty());
}

fn pinhole(addr: &str, port: u16, kind: MappingKind, filters: Vec<(IpAddr, u8, u16)>) -> Entry {
    Entry {
        kind,
        external_addr: Ipv4Addr::UNSPECIFIED,
        external_port: port,
        port_count: 1,
        protocol: 6,
        firewall: true,
        internal_addr: addr.parse().unwrap(),
        internal_port: port,
        filters: filters.into(),
        expires_ms: now_ms() + 600_000,
    }
}

#[test]
fn pinholes_are_set_elements_of_their_family_and_read_back() {
    let t = table("pinholes");
    let rules = FirewallRules {
        protected: vec![
            "2001:db8:f00::/64".parse().unwrap(),
            "198.18.0.0/24".parse().unwrap(),
        ],
        unsolicited: Unsolicited::Drop,
        mark: 0x10_0000,
    };
    let mut dp = NftablesDataplane::open(&t.0, "nft", rules.clone())
        .expect("nft works (root, nftables installed)");
    let remote: IpAddr = "2001:db8:eee::7".parse().unwrap();
    let changes = vec![
        Change::Upsert(pinhole("2001:db8:f00::1", 22, MappingKind::Map, vec![])),
        Change::Upsert(pinhole(
            "2001:db8:f00::1",
            443,
            MappingKind::Map,
            vec![(remote, 64, 0)],
        )),
        Change::Upsert(pinhole(
            "2001:db8:f00::1",
            5000,
            MappingKind::Peer {
                remote_addr: remote,
                remote_port: 9000,
            },
            vec![],
        )),
        Change::Upsert(pinhole("198.18.0.5", 25565, MappingKind::Map, vec![])),
    ];
    assert!(dp.apply(&changes).iter().all(Result::is_ok));
    assert_eq!(elements(&t.0, "pin6").len(), 1);
    assert_eq!(elements(&t.0, "pinf6").len(), 1);
    let f = elements(&t.0, "pinfilter6");
    assert_eq!(f.len(), 1);
    assert!(f[0].to_string().contains("2001:db8:eee::"), "{f:?}");
    assert_eq!(elements(&t.0, "fwpeer6").len(), 1);
    assert_eq!(elements(&t.0, "pin4").len(), 1);
    // Kernel timeouts: the lifetime plus the safety net, never shorter
    // (the kernel must not close a hole before pcpd does).
    let pin = elements(&t.0, "pin6");
    let timeout = pin[0]["elem"]["timeout"].as_u64().unwrap_or(0);
    assert!((22_200..=22_201).contains(&timeout), "{pin:?}");
    // Protected prefixes are in the sets the chain checks.
    let p6 = elements(&t.0, "fw_protected6");
    assert!(format!("{p6:?}").contains("2001:db8:f00::"), "{p6:?}");
    // A restart reads every pinhole back under its key: nothing to do.
    let again = NftablesDataplane::open(&t.0, "nft", rules).unwrap();
    let keys: Vec<Key> = again.installed().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    let mut again = again;
    let done = again.reconcile(changes.clone());
    assert_eq!(done, Reconciled::default(), "already current");
    // Removing closes each hole.
    let removes: Vec<Change> = changes
        .iter()
        .filter_map(|c| c.key())
        .map(Change::Remove)
        .collect();
    assert!(again.apply(&removes).iter().all(Result::is_ok));
    // The removals hold when apply returns (expired elements are waited
    // out), though the kernel may list them until its garbage collection.
    for set in ["pin6", "pinf6", "pinfilter6", "fwpeer6", "pin4"] {
        assert!(emptied(&t.0, set), "{set}");
    }
    // Without IPv4 firewall classes the ip table has no forward chain: a
    // NAT-only family pays nothing per forwarded packet.
    let chain = |family: &str| {
        Command::new("nft")
            .args(["list", "chain", family, &t.0, "fw_forward"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(chain("ip") && chain("ip6"));
    let v6_only = FirewallRules {
        protected: vec!["2001:db8:f00::/64".parse().unwrap()],
        ..FirewallRules::default()
    };
    NftablesDataplane::open(&t.0, "nft", v6_only).unwrap();
    assert!(!chain("ip") && chain("ip6"));
}

/// Elements of a set without their timeouts, sorted, and their timeouts.
fn plain_elements(table: &str, set: &str) -> (Vec<String>, Vec<u64>) {
    fn strip(v: &mut Value, timeouts: &mut Vec<u64>) {
        match v {
            Value::Object(o) => {
                if let Some(t) = o.remove("timeout") {
                    timeouts.push(t.as_u64().unwrap_or(0));
                }
                o.remove("expires");
                o.values_mut().for_each(|x| strip(x, timeouts));
            }
            Value::Array(a) => a.iter_mut().for_each(|x| strip(x, timeouts)),
            _ => {}
        }
    }
    let mut timeouts = Vec::new();
    let mut texts: Vec<String> = elements(table, set)
        .into_iter()
        .map(|mut el| {
            strip(&mut el, &mut timeouts);
            el.to_string()
        })
        .collect();
    texts.sort();
    timeouts.sort();
    (texts, timeouts)
}

#[test]
fn netlink_and_nft_write_the_same_elements() {
    // Two tables, the same changes: one over netlink (the default), one
    // through `nft -f`. The kernel must end up with the same elements,
    // values and timeouts in both, after every batch.
    let (a, b) = (table("netlink"), table("nfttext"));
    let mut fast = NftablesDataplane::open(&a.0, "nft", FirewallRules::default()).unwrap();
    let mut text = NftablesDataplane::open(&b.0, "nft", FirewallRules::default()).unwrap();
    text.set_netlink(false);
    let sub = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
    let block = Block {
        addr: Ipv4Addr::new(192, 0, 2, 1),
        first: 1024,
        len: 512,
    };
    // A second MAP of the subscriber, on internal ports 9000-9002.
    let second = |lifetime_s| {
        let mut e = map_entry(1060, 3, lifetime_s, Vec::new());
        e.internal_port = 9000;
        e
    };
    let filter = vec![(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)), 24, 0)];
    let batches: Vec<Vec<Change>> = vec![
        // A first block (its SNAT range) and a mapping with a FILTER (an
        // interval set: first and last key).
        vec![
            Change::AddBlock {
                subscriber: sub,
                block,
            },
            Change::Upsert(map_entry(1050, 1, 3600, filter)),
        ],
        // Mappings of a subscriber that has its block: netlink.
        vec![Change::Upsert(second(600)), Change::Upsert(peer_entry())],
        // A renewal past the safety net rewrites its elements; a delete
        // (with its FILTER); a second block extends the SNAT range.
        vec![
            Change::Upsert(second(86_400)),
            Change::Remove(map_entry(1050, 1, 1, Vec::new()).key()),
            Change::AddBlock {
                subscriber: sub,
                block: Block {
                    first: 1536,
                    ..block
                },
            },
        ],
        // Deleting again is not an error (add as it was, then delete).
        vec![
            Change::Remove(peer_entry().key()),
            Change::Remove(peer_entry().key()),
        ],
    ];
    for (i, changes) in batches.iter().enumerate() {
        let r = fast.apply(changes);
        assert!(r.iter().all(Result::is_ok), "batch {i} over netlink: {r:?}");
        let r = text.apply(changes);
        assert!(r.iter().all(Result::is_ok), "batch {i} through nft: {r:?}");
        for set in ["dnat4", "snat4", "peer4", "subs", "filtered4", "filter4"] {
            let (fa, ta) = plain_elements(&a.0, set);
            let (fb, tb) = plain_elements(&b.0, set);
            assert_eq!(fa, fb, "batch {i}, {set}");
            for (x, y) in ta.iter().zip(&tb) {
                assert!(
                    x.abs_diff(*y) <= 2,
                    "batch {i}, {set}: timeouts {ta:?} vs {tb:?}"
                );
            }
        }
    }
    assert_eq!(plain_elements(&a.0, "dnat4").0.len(), 3);
    assert!(plain_elements(&a.0, "peer4").0.is_empty());
    assert!(plain_elements(&a.0, "filter4").0.is_empty());
    assert_eq!(
        elements(&a.0, "subs")[0][1]["concat"][1]["range"],
        serde_json::json!([1024, 2047])
    );
    let (over_netlink, through_nft) = fast.transactions();
    assert_eq!(
        (over_netlink, through_nft),
        (4, 0),
        "every batch went over netlink, the FILTER ranges and SNAT blocks too"
    );
    assert_eq!(text.transactions().0, 0);
}
