//! The nftables backend: pcpd owns one table (`ip <name>`); mappings are
//! elements of nftables maps, never one rule per mapping, and every batch
//! is one atomic nf_tables transaction, sent over in-process netlink
//! (`nfnetlink.rs`; `nft -f -` only sets up the table and chains, and is
//! the fallback writer). `nftables/script.rs` builds a batch's
//! transaction, `nftables/listing.rs` reads the table back.
//!
//! ```text
//! table ip pcpd
//!   map dnat4   ext addr . proto . ext port -> int addr . int port       MAP, static: inbound DNAT
//!   map snat4   int addr . proto . int port -> ext addr . ext port       MAP: outbound from the mapped port (§11.1)
//!   map peer4   int addr . proto . int port . remote . rport -> ext addr . ext port   PEER (§12)
//!   map subs    subscriber -> ext addr . port range                     port-block SNAT of ordinary traffic
//!   set filtered4 / filter4   RFC 6887 §13.3 FILTER: mappings with filters / allowed remotes
//!   chain filter_in  (prerouting, before DNAT)  drop what a FILTER does not allow
//!   chain dnat_in    (prerouting, dstnat)       dnat via @dnat4
//!   chain snat_out   (postrouting, srcnat)      snat via @peer4, then @snat4, then @subs
//! ```
//!
//! Mapping elements carry a kernel timeout of their remaining lifetime plus
//! a safety net of hours, so the kernel drops them even if pcpd is gone,
//! never before pcpd itself does, and a renewal that only moves the
//! expiry costs no kernel operation. A batch is folded per element (created and
//! deleted in one batch: nothing written) into a few messages of many
//! elements. On kernels that update elements in place (6.12+), a removed
//! element with a timeout is expired rather than deleted (`script.rs`):
//! deletes make the kernel wait a grace period. Other deletes are written
//! as "add the element as it was, then delete it", which is idempotent in
//! one transaction: an element the kernel already timed out does not fail
//! the batch. A failed batch is
//! rolled back in pcpd's own view and retried change by change, so each
//! change gets its own result.
//!
//! Several shards share the table: [`NftablesDataplane::split`] hands each
//! shard the elements of its own subscribers (`pcp_engine::shard_of`), so
//! no two shards ever write the same element.

use foldhash::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pcp_engine::{
    shard_of, Block, ExternalEndpoint, InternalEndpoint, MappingKey, MappingKind, Millis,
    RemoteEndpoint,
};
use serde_json::Value;

use crate::compact::Compact;
use crate::conntrack::{Conntrack, Endpoint, Forget};
use crate::nfnetlink::{ElemOp, NftLink};
use crate::KeyedTable;
use pcp_engine::keyed::Keyed;

mod listing;
mod script;
mod text;
use crate::pinholes::{self, FirewallRules};
use crate::{ApplyError, Change, Dataplane, Entry, Key, ReconcilePlan, Reconciled};
use listing::parse_listing;
use script::Script;
use text::{concat, Part};
pub(crate) use text::{parts, Text};

/// How long an element removed by expiring it (netlink, `script.rs`) may
/// still be in the kernel's set: its expiration is one jiffy (10 ms at
/// HZ=100), and the set's garbage collection may not have run. Adding the
/// same element again within this time waits it out, on the dataplane's
/// own thread, since the kernel refuses an element whose key is held with
/// another value.
const EXPIRY_SETTLE: Duration = Duration::from_millis(25);

/// The kernel's tick (one jiffy) plus a millisecond: how long an element
/// whose expiration was moved to now may still match. Measured from
/// /proc/timer_list's jiffies over 50 ms (once, when the backend opens);
/// 10 ms (HZ=100, the longest tick) plus the margin when that is not
/// readable.
fn kernel_tick() -> Duration {
    fn jiffies() -> Option<u64> {
        let t = std::fs::read_to_string("/proc/timer_list").ok()?;
        t.lines()
            .find_map(|l| l.strip_prefix("jiffies: "))?
            .trim()
            .parse()
            .ok()
    }
    let margin = Duration::from_millis(1);
    let slowest = Duration::from_millis(10) + margin;
    let started = Instant::now();
    let Some(a) = jiffies() else { return slowest };
    std::thread::sleep(Duration::from_millis(50));
    let Some(b) = jiffies() else { return slowest };
    let hz = (b.saturating_sub(a)) as f64 / started.elapsed().as_secs_f64();
    // The nearest of the kernel's choices (100, 250, 300, 1000).
    let nearest = [100.0, 250.0, 300.0, 1000.0]
        .into_iter()
        .min_by(|a: &f64, b: &f64| (a - hz).abs().total_cmp(&(b - hz).abs()));
    match nearest {
        Some(h) if hz >= 50.0 => Duration::from_secs_f64(1.0 / h) + margin,
        _ => slowest,
    }
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}

/// How often a busy dataplane reads conntrack's events into its flow
/// index between removals (which read them anyway).
const EVENTS_EVERY: Duration = Duration::from_millis(10);

/// Seconds added to a mapping's kernel timeout so pcpd expires it first.
const GRACE_SECS: u64 = 30;

/// How far past its mapping's expiry a kernel element lives: the safety
/// net that lets the kernel drop elements by itself if pcpd is gone, far
/// enough out that a renewal which only moves the expiry costs no kernel
/// operation (pcpd removes expired mappings itself). A renewal past the
/// element's own expiry (minus the grace) rewrites it.
const SAFETY_SECS: u64 = 6 * 3600;

/// One element pcpd put in one of its maps or sets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Elem {
    pub(crate) set: &'static str,
    pub(crate) key: Text,
    /// The value of a map element, without its timeout.
    pub(crate) value: Option<Text>,
}

/// The elements of one mapping. One of these per mapping is most of the
/// backend's memory, so an entry pcpd installed keeps only the entry, kept
/// compactly (`compact.rs`): its elements follow from it
/// ([`Installed::elements`]).
#[derive(Debug, Clone)]
enum Installed {
    /// An entry pcpd installed, and when the kernel drops its elements by
    /// itself.
    Ours {
        entry: Compact,
        kernel_expires_ms: Millis,
    },
    /// Elements read back from the kernel (after a restart of pcpd).
    ReadBack(Box<ReadBack>),
}

/// Elements read back from the kernel, grouped by mapping.
#[derive(Debug, Clone)]
struct ReadBack {
    /// The mapping they were grouped under.
    key: Key,
    /// The subscriber the elements belong to (`None`: filters read back
    /// without their mapping).
    owner: Option<IpAddr>,
    elems: Vec<Elem>,
}

impl Keyed for Installed {
    type Key = Key;
    fn key(&self) -> Key {
        match self {
            Installed::Ours { entry, .. } => entry.key(),
            Installed::ReadBack(r) => r.key,
        }
    }
}

impl Installed {
    /// The mapping's elements in the kernel.
    fn elements(&self) -> std::borrow::Cow<'_, [Elem]> {
        match self {
            Installed::Ours { entry, .. } => NftablesDataplane::elems_for(&entry.entry())
                .map(|(v, _, _)| std::borrow::Cow::Owned(v))
                .unwrap_or_default(),
            Installed::ReadBack(r) => std::borrow::Cow::Borrowed(&r.elems),
        }
    }

    /// The entry, when pcpd installed it.
    fn entry(&self) -> Option<Entry> {
        match self {
            Installed::Ours { entry, .. } => Some(entry.entry()),
            Installed::ReadBack(_) => None,
        }
    }

    /// The subscriber the elements belong to.
    fn owner(&self) -> Option<IpAddr> {
        match self {
            Installed::Ours { entry, .. } => Some(entry.internal_addr()),
            Installed::ReadBack(r) => r.owner,
        }
    }

    /// Whether the kernel's elements carry a timeout (those read back are
    /// taken to).
    fn timed(&self) -> bool {
        match self {
            Installed::Ours {
                kernel_expires_ms, ..
            } => *kernel_expires_ms != Millis::MAX,
            Installed::ReadBack(_) => true,
        }
    }
}

/// A subscriber's port blocks and the `subs` value installed for them.
#[derive(Debug, Clone, Default)]
struct PortSets {
    blocks: Vec<Block>,
    value: Option<String>,
}

/// What to put back when a batch fails.
enum Undo {
    Mapping(Key, Option<Installed>),
    /// A renewal that touched no element: the expiry pcpd had noted.
    Expiry(Key, Millis),
    PortSets(Ipv4Addr, Option<PortSets>),
}

/// Mappings made real in the kernel's nftables.
pub struct NftablesDataplane {
    table: String,
    nft: String,
    firewall: FirewallRules,
    /// ctnetlink, opened on first use (flows of removed mappings).
    conntrack: Option<Conntrack>,
    conntrack_complained: bool,
    /// When conntrack's events were last read into the flow index.
    flows_read: Instant,
    /// nf_tables over netlink, opened on first use; `None` with
    /// `netlink` false: every batch goes through `nft -f`.
    link: Option<NftLink>,
    netlink: bool,
    /// A transaction's element operations (kept: a thousand changes make
    /// a few hundred kB, which a fresh allocation would map and fault in
    /// every time).
    ops: Vec<ElemOp>,
    /// Transactions committed over netlink and through `nft -f`.
    transactions: (u64, u64),
    /// Elements removed over netlink by expiring them, until when the
    /// kernel may still hold them (see [`EXPIRY_SETTLE`]).
    expiring: HashMap<script::ElemId, Instant>,
    /// Removed mappings' flows to flush, and from when, oldest first.
    removing: std::collections::VecDeque<(Instant, Forget)>,
    /// The kernel's tick, plus a margin ([`kernel_tick`]).
    jiffy: Duration,
    /// Whether the kernel updates an existing element's timeout and
    /// expiration when it is added again (Linux 6.12 and later; before,
    /// such an add succeeds and changes nothing): only then is a removal
    /// written as an expiry and a renewal as an in-place update.
    expire_in_place: bool,
    installed: KeyedTable<Installed>,
    ports: HashMap<Ipv4Addr, PortSets>,
}

fn proto_name(p: u8) -> Option<&'static str> {
    match p {
        6 => Some("tcp"),
        17 => Some("udp"),
        _ => None,
    }
}

pub(crate) fn proto_number(p: &str) -> Option<u8> {
    match p {
        "tcp" => Some(6),
        "udp" => Some(17),
        _ => None,
    }
}

fn v4(addr: IpAddr) -> Result<Ipv4Addr, ApplyError> {
    match addr.to_canonical() {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(a) => Err(ApplyError::Refused(format!(
            "{a}: the nftables backend translates IPv4 (NAT44) only"
        ))),
    }
}

fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

impl NftablesDataplane {
    /// Opens (creating if needed) tables `ip <table>` and `ip6 <table>`
    /// and learns what they hold, so the daemon can reconcile. `nft` is the
    /// nft binary; `firewall` says which prefixes the firewall part
    /// protects and how (see [`crate::pinholes`]).
    pub fn open(table: &str, nft: &str, firewall: FirewallRules) -> Result<Self, ApplyError> {
        if table.is_empty()
            || !table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(ApplyError::Refused(format!(
                "table name {table:?}: letters, digits and _ only"
            )));
        }
        let mut dp = NftablesDataplane {
            table: table.to_string(),
            nft: nft.to_string(),
            firewall,
            conntrack: None,
            conntrack_complained: false,
            flows_read: Instant::now(),
            link: None,
            netlink: true,
            transactions: (0, 0),
            expiring: HashMap::default(),
            ops: Vec::new(),
            removing: Default::default(),
            jiffy: kernel_tick(),
            expire_in_place: kernel_at_least(6, 12),
            installed: KeyedTable::default(),
            ports: HashMap::default(),
        };
        dp.run(&dp.skeleton())?;
        dp.load()?;
        Ok(dp)
    }

    /// An empty dataplane on the same table, with the same settings and
    /// what was learnt of the kernel (for [`NftablesDataplane::split`]).
    fn sibling(&self) -> Self {
        NftablesDataplane {
            table: self.table.clone(),
            nft: self.nft.clone(),
            firewall: self.firewall.clone(),
            conntrack: None,
            conntrack_complained: false,
            flows_read: Instant::now(),
            link: None,
            netlink: self.netlink,
            transactions: (0, 0),
            expiring: HashMap::default(),
            ops: Vec::new(),
            removing: Default::default(),
            jiffy: self.jiffy,
            expire_in_place: self.expire_in_place,
            installed: KeyedTable::default(),
            ports: HashMap::default(),
        }
    }

    /// Splits what the table holds among `shards` shards by subscriber
    /// (`pcp_engine::shard_of`), so each shard owns its elements. Orphans
    /// (filters read back without their mapping) go to shard 0, which
    /// removes them when it reconciles.
    pub fn split(self, shards: usize) -> Vec<NftablesDataplane> {
        let n = shards.max(1);
        let mut parts: Vec<NftablesDataplane> = (0..n).map(|_| self.sibling()).collect();
        for v in self.installed {
            let s = v.owner().map_or(0, |o| shard_of(o, n));
            parts[s].installed.insert(v);
        }
        for (sub, p) in self.ports {
            parts[shard_of(IpAddr::V4(sub), n)].ports.insert(sub, p);
        }
        parts
    }

    /// The table, maps, sets and rules; idempotent (elements are kept).
    fn skeleton(&self) -> String {
        let t = &self.table;
        format!(
            "add table ip {t}\n\
             add map ip {t} dnat4 {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; flags timeout; }}\n\
             add map ip {t} snat4 {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; flags timeout; }}\n\
             add map ip {t} peer4 {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service : ipv4_addr . inet_service; flags timeout; }}\n\
             add map ip {t} subs {{ type ipv4_addr : interval ipv4_addr . inet_service; }}\n\
             add set ip {t} filtered4 {{ type ipv4_addr . inet_proto . inet_service; flags timeout; }}\n\
             add set ip {t} filter4 {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service; flags interval, timeout; }}\n\
             add chain ip {t} filter_in {{ type filter hook prerouting priority dstnat - 10; policy accept; }}\n\
             add chain ip {t} dnat_in {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             add chain ip {t} snat_out {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             flush chain ip {t} filter_in\n\
             flush chain ip {t} dnat_in\n\
             flush chain ip {t} snat_out\n\
             add rule ip {t} filter_in meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @filtered4 ip daddr . meta l4proto . th dport . ip saddr . th sport != @filter4 drop\n\
             add rule ip {t} dnat_in meta l4proto {{ tcp, udp }} dnat ip to ip daddr . meta l4proto . th dport map @dnat4\n\
             add rule ip {t} snat_out meta l4proto {{ tcp, udp }} snat ip to ip saddr . meta l4proto . th sport . ip daddr . th dport map @peer4\n\
             add rule ip {t} snat_out meta l4proto {{ tcp, udp }} snat ip to ip saddr . meta l4proto . th sport map @snat4\n\
             add rule ip {t} snat_out meta l4proto {{ tcp, udp }} snat ip to ip saddr map @subs\n{}{}",
            pinholes::skeleton(t, &self.firewall, false),
            pinholes::skeleton(t, &self.firewall, true),
        )
    }

    fn run(&self, script: &str) -> Result<(), ApplyError> {
        let mut child = Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ApplyError::Unavailable(format!("{}: {e}", self.nft)))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| ApplyError::Unavailable(format!("nft stdin: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| ApplyError::Unavailable(format!("nft: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err
                .lines()
                .find(|l| l.contains("Error"))
                .unwrap_or(err.trim());
            Err(ApplyError::Refused(first.to_string()))
        }
    }

    /// Whether element changes go over netlink (the default) or, with
    /// `false`, through `nft -f` like the table's skeleton (the bench
    /// compares both).
    pub fn set_netlink(&mut self, on: bool) {
        self.netlink = on;
        if !on {
            self.link = None;
        }
    }

    /// Element transactions committed so far: (over netlink, through
    /// `nft -f`).
    pub fn transactions(&self) -> (u64, u64) {
        self.transactions
    }

    /// Runs one transaction: over netlink when every element is in a set
    /// of plain concatenations, else as nft text. `Ok(true)`: it removed
    /// elements by expiring them (see [`NftablesDataplane::removals`]).
    fn commit(&mut self, script: &Script) -> Result<bool, ApplyError> {
        let mut ops = std::mem::take(&mut self.ops);
        if !self.netlink || script.ops(&mut ops).is_none() {
            self.ops = ops;
            self.transactions.1 += 1;
            return self.run(&script.render(&self.table)).map(|()| false);
        }
        self.transactions.0 += 1;
        if self.link.is_none() {
            match NftLink::open() {
                Ok(l) => self.link = Some(l),
                Err(e) => {
                    self.ops = ops;
                    tracing::warn!(
                        "nf_tables netlink: {e}; element changes go through {}",
                        self.nft
                    );
                    self.netlink = false;
                    self.transactions = (self.transactions.0 - 1, self.transactions.1 + 1);
                    return self.run(&script.render(&self.table)).map(|()| false);
                }
            }
        }
        let now = Instant::now();
        self.expiring.retain(|_, until| *until > now);
        if let Some(until) = script.added().filter_map(|k| self.expiring.get(k)).max() {
            std::thread::sleep(until.saturating_duration_since(now));
        }
        let table = &self.table;
        let result = self.link.as_mut().map_or(Ok(()), |l| l.apply(table, &ops));
        ops.clear();
        self.ops = ops;
        if let Err(e) = result {
            // A socket in an unknown state is not reused.
            self.link = None;
            return Err(ApplyError::Refused(format!("nf_tables: {e}")));
        }
        let until = Instant::now() + EXPIRY_SETTLE;
        let mut expired = false;
        for k in script.expired() {
            self.expiring.insert(k.clone(), until);
            expired = true;
        }
        Ok(expired)
    }

    /// Reads the tables' elements back (after a restart of pcpd).
    fn load(&mut self) -> Result<(), ApplyError> {
        let mut items = Vec::new();
        for family in ["ip", "ip6"] {
            let out = Command::new(&self.nft)
                .args(["-j", "list", "table", family, &self.table])
                .output()
                .map_err(|e| ApplyError::Unavailable(format!("{}: {e}", self.nft)))?;
            if !out.status.success() {
                return Err(ApplyError::Unavailable(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
            let json: Value = serde_json::from_slice(&out.stdout)
                .map_err(|e| ApplyError::Unavailable(format!("nft -j list: {e}")))?;
            if let Some(Value::Array(list)) = json.get("nftables") {
                items.extend(list.iter().cloned());
            }
        }
        (self.installed, self.ports) = parse_listing(&serde_json::json!({ "nftables": items }));
        Ok(())
    }

    /// The elements of one mapping, the timeout text they carry, and when
    /// the kernel will drop them.
    fn elems_for(e: &Entry) -> Result<(Vec<Elem>, Option<u64>, Millis), ApplyError> {
        let proto = proto_name(e.protocol).ok_or_else(|| {
            ApplyError::Refused(format!(
                "protocol {} is not NATed by nftables here",
                e.protocol
            ))
        })?;
        let now = now_ms();
        let (timeout, kernel_expires_ms) = if e.expires_ms == Millis::MAX {
            (None, Millis::MAX)
        } else {
            let secs = e.expires_ms.saturating_sub(now).div_ceil(1000) + SAFETY_SECS;
            (Some(secs), now + secs * 1000)
        };
        if e.firewall {
            return Ok((pinholes::elems(e, proto)?, timeout, kernel_expires_ms));
        }
        let internal = v4(e.internal_addr)?;
        let mut elems = Vec::new();
        match e.kind {
            MappingKind::Peer {
                remote_addr,
                remote_port,
            } => {
                let remote = v4(remote_addr)?;
                elems.push(Elem {
                    set: "peer4",
                    key: concat(&[
                        Part::V4(internal),
                        Part::Word(proto),
                        Part::Port(e.internal_port),
                        Part::V4(remote),
                        Part::Port(remote_port),
                    ]),
                    value: Some(concat(&[
                        Part::V4(e.external_addr),
                        Part::Port(e.external_port),
                    ])),
                });
            }
            MappingKind::Map | MappingKind::Static => {
                let filters = pinholes::filter_texts(&e.filters, false);
                for i in 0..e.port_count {
                    let ext_port = e.external_port.wrapping_add(i);
                    let int_port = e.internal_port.wrapping_add(i);
                    let ext = concat(&[
                        Part::V4(e.external_addr),
                        Part::Word(proto),
                        Part::Port(ext_port),
                    ]);
                    elems.push(Elem {
                        set: "dnat4",
                        key: ext.clone(),
                        value: Some(concat(&[Part::V4(internal), Part::Port(int_port)])),
                    });
                    // §11.1: outbound traffic from the mapped endpoint
                    // leaves from the mapping's external endpoint.
                    elems.push(Elem {
                        set: "snat4",
                        key: concat(&[Part::V4(internal), Part::Word(proto), Part::Port(int_port)]),
                        value: Some(concat(&[Part::V4(e.external_addr), Part::Port(ext_port)])),
                    });
                    if !filters.is_empty() {
                        elems.push(Elem {
                            set: "filtered4",
                            key: ext.clone(),
                            value: None,
                        });
                        for f in &filters {
                            elems.push(Elem {
                                set: "filter4",
                                key: format!("{ext} . {f}").into(),
                                value: None,
                            });
                        }
                    }
                }
            }
        }
        Ok((elems, timeout, kernel_expires_ms))
    }

    /// The installed entry under `key`, if `entry` differs from it only by
    /// an expiry the installed elements still outlive (by the grace): a
    /// renewal that needs no kernel operation.
    fn expiry_only(&mut self, key: &Key, entry: &Entry) -> Option<&mut Compact> {
        let Some(Installed::Ours {
            entry: prev,
            kernel_expires_ms,
        }) = self.installed.get_mut(key)
        else {
            return None;
        };
        (prev.same_but_expiry(entry)
            && entry.expires_ms != Millis::MAX
            && entry.expires_ms.saturating_add(GRACE_SECS * 1000) <= *kernel_expires_ms)
            .then_some(prev)
    }

    /// Writes one change's nft statements and updates pcpd's view of the
    /// table; returns how to undo the update if the transaction fails.
    fn stage(
        &mut self,
        change: &Change,
        out: &mut Script,
        flows: &mut Forget,
    ) -> Result<Vec<Undo>, ApplyError> {
        match change {
            Change::Upsert(entry) => {
                let key = entry.key();
                if let Some(prev) = self.expiry_only(&key, entry) {
                    let old = prev.set_expires_ms(entry.expires_ms);
                    return Ok(vec![Undo::Expiry(key, old)]);
                }
                let (elems, timeout, kernel_expires_ms) = Self::elems_for(entry)?;
                let prev = self.installed.insert(Installed::Ours {
                    entry: Compact::of(entry),
                    kernel_expires_ms,
                });
                if let Some(old) = &prev {
                    let timed = self.expire_in_place && old.timed();
                    for el in old.elements().iter() {
                        out.delete(el, timed);
                        if !elems.contains(el) {
                            gone_flows(el, flows);
                        }
                    }
                }
                for el in elems {
                    out.add(el, timeout);
                }
                Ok(vec![Undo::Mapping(key, prev)])
            }
            Change::Remove(Key::SubscriberBlock {
                subscriber,
                external_addr,
                first_port,
            }) => self.stage_port_set(*subscriber, *external_addr, *first_port, None, out),
            Change::Remove(key) => match self.installed.remove(key) {
                Some(old) => {
                    let timed = self.expire_in_place && old.timed();
                    for el in old.elements().iter() {
                        out.delete(el, timed);
                        gone_flows(el, flows);
                    }
                    Ok(vec![Undo::Mapping(*key, Some(old))])
                }
                None => Ok(Vec::new()),
            },
            Change::AddBlock { subscriber, block } => {
                self.stage_port_set(*subscriber, block.addr, block.first, Some(*block), out)
            }
            Change::RemoveBlock { subscriber, block } => {
                self.stage_port_set(*subscriber, block.addr, block.first, None, out)
            }
        }
    }

    /// Adds or removes one port block of a subscriber and rewrites its
    /// `subs` element: one SNAT range per subscriber (a map key holds one
    /// value), its lowest block extended by contiguous ones.
    fn stage_port_set(
        &mut self,
        subscriber: IpAddr,
        addr: Ipv4Addr,
        first: u16,
        add: Option<Block>,
        out: &mut Script,
    ) -> Result<Vec<Undo>, ApplyError> {
        let sub = v4(subscriber)?;
        let prev = self.ports.get(&sub).cloned();
        let mut now = prev.clone().unwrap_or_default();
        let held = now.blocks.len();
        now.blocks.retain(|b| !(b.addr == addr && b.first == first));
        if add.is_none() && now.blocks.len() == held {
            return Ok(Vec::new()); // removing a block it does not hold
        }
        now.blocks.extend(add);
        let value = snat_range(&mut now.blocks);
        if value != now.value {
            if let Some(old) = &now.value {
                out.delete(
                    &Elem {
                        set: "subs",
                        key: sub.to_string().into(),
                        value: Some(old.as_str().into()),
                    },
                    false,
                );
            }
            if let Some(v) = &value {
                out.add(
                    Elem {
                        set: "subs",
                        key: sub.to_string().into(),
                        value: Some(v.as_str().into()),
                    },
                    None,
                );
            }
        }
        now.value = value;
        if now.blocks.is_empty() {
            self.ports.remove(&sub);
        } else {
            self.ports.insert(sub, now);
        }
        Ok(vec![Undo::PortSets(sub, prev)])
    }

    /// What the batch's removals still need before anyone is told of them,
    /// and from when ([`Dataplane::settle`] does it). An element removed
    /// by expiring it (netlink) still matches until the kernel's next
    /// tick: a pinhole still lets packets in, a DNAT element still
    /// translates a packet that would leave a new conntrack entry behind.
    /// So the removed mappings' conntrack entries are flushed once that
    /// tick has passed, and the batch holds from then on. Returns when
    /// the batch holds (`None`: now). `expired`: its transactions removed
    /// elements by expiring them.
    fn removals(&mut self, flows: Forget, expired: bool) -> Option<Instant> {
        let at = expired.then(|| Instant::now() + self.jiffy);
        if at.is_some() || !flows.is_empty() {
            self.removing
                .push_back((at.unwrap_or_else(Instant::now), flows));
        }
        at
    }

    /// Removes the conntrack entries of `flows` (ctnetlink); a failure is
    /// reported once, the mappings themselves are gone already.
    fn forget_flows(&mut self, flows: &Forget) {
        if flows.is_empty() {
            return;
        }
        self.with_conntrack(|c, mapped| c.forget(flows, mapped).map(drop));
    }

    /// Runs `work` on the ctnetlink socket (opened on first use) with the
    /// test of a mapped external endpoint; a failure is reported once and
    /// the socket, in an unknown state, is not reused.
    fn with_conntrack(
        &mut self,
        work: impl FnOnce(&mut Conntrack, &dyn Fn(&Endpoint) -> bool) -> std::io::Result<()>,
    ) {
        if self.conntrack.is_none() {
            match Conntrack::open() {
                Ok(c) => self.conntrack = Some(c),
                Err(e) => return self.conntrack_failed(&e),
            }
        }
        let (installed, removing) = (&self.installed, &self.removing);
        let mapped = |e: &Endpoint| mapped(installed, removing, e);
        if let Some(Err(e)) = self.conntrack.as_mut().map(|c| work(c, &mapped)) {
            self.conntrack = None;
            self.conntrack_failed(&e);
        }
    }

    /// Keeps the conntrack flow index up to date, at most every
    /// [`EVENTS_EVERY`]: the events queued since (so the kernel need not
    /// drop any), and a dump when the index is not trusted (the first
    /// batch, normally the reconcile at start). ctnetlink is opened here on
    /// first use.
    fn learn_flows(&mut self) {
        // A removal reads them itself first; otherwise reading every few
        // ms keeps the socket from overflowing without a syscall per batch.
        if self.conntrack.is_some() && self.flows_read.elapsed() < EVENTS_EVERY {
            return;
        }
        self.flows_read = Instant::now();
        // After a failure, only a removal tries ctnetlink again.
        if self.conntrack.is_some() || !self.conntrack_complained {
            self.with_conntrack(|c, mapped| c.resync(mapped));
        }
    }

    fn conntrack_failed(&mut self, e: &std::io::Error) {
        if !self.conntrack_complained {
            self.conntrack_complained = true;
            tracing::error!(
                "ctnetlink: {e}; flows of removed mappings keep their conntrack entries until they time out"
            );
        }
    }

    fn undo(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            match u {
                Undo::Mapping(_, Some(v)) => {
                    self.installed.insert(v);
                }
                Undo::Mapping(k, None) => {
                    self.installed.remove(&k);
                }
                Undo::Expiry(k, ms) => {
                    if let Some(Installed::Ours { entry, .. }) = self.installed.get_mut(&k) {
                        entry.set_expires_ms(ms);
                    }
                }
                Undo::PortSets(s, Some(p)) => {
                    self.ports.insert(s, p);
                }
                Undo::PortSets(s, None) => {
                    self.ports.remove(&s);
                }
            }
        }
    }

    /// True when what is installed under the change's key is what the
    /// change would install (compared element by element, so entries read
    /// back from the kernel count too).
    fn is_current(&self, change: &Change) -> bool {
        match change {
            Change::Upsert(e) => {
                let Some(have) = self.installed.get(&e.key()) else {
                    return false;
                };
                if have.entry().as_ref() == Some(e) {
                    return true;
                }
                let Ok((mut want, _, _)) = Self::elems_for(e) else {
                    return false;
                };
                let mut got = have.elements().into_owned();
                want.sort();
                got.sort();
                want == got
            }
            Change::AddBlock { subscriber, block } => {
                let Ok(sub) = v4(*subscriber) else {
                    return false;
                };
                self.ports
                    .get(&sub)
                    .is_some_and(|p| p.blocks.contains(block))
            }
            Change::Remove(_) | Change::RemoveBlock { .. } => false,
        }
    }
}

/// Whether `e` is the external endpoint of an installed MAP or static
/// mapping, or of one whose flows are yet to be flushed: the flows the
/// conntrack index keeps.
fn mapped(
    installed: &KeyedTable<Installed>,
    removing: &std::collections::VecDeque<(Instant, Forget)>,
    e: &Endpoint,
) -> bool {
    let (IpAddr::V4(addr), protocol, port) = *e else {
        return false;
    };
    installed
        .get(&Key::Inbound(ExternalEndpoint {
            addr,
            protocol,
            port,
        }))
        .is_some()
        || removing.iter().any(|(_, f)| f.external.contains(e))
}

/// The flows an element stood for, once it is gone: a DNAT element's
/// external endpoint, a PEER's five-tuple (see [`crate::conntrack`]).
/// Pinholes need nothing: their flows are checked on every packet.
fn gone_flows(el: &Elem, flows: &mut Forget) {
    let endpoint = |a: &str, p: &str, port: &str| -> Option<(IpAddr, u8, u16)> {
        Some((a.parse().ok()?, proto_number(p)?, port.parse().ok()?))
    };
    let mut parts = text::parts(&el.key);
    let mut next = || parts.next().unwrap_or_default();
    match el.set {
        "dnat4" => {
            if let Some(e) = endpoint(next(), next(), next()) {
                flows.external.insert(e);
            }
        }
        "peer4" => {
            let (int, p, iport, r, rport) = (next(), next(), next(), next(), next());
            if let (Some(i), Some(r)) = (endpoint(int, p, iport), endpoint(r, p, rport)) {
                flows.peers.insert((i, r));
            }
        }
        _ => {}
    }
}

/// The SNAT target of a subscriber's blocks: address . first-last of the
/// longest contiguous run from its lowest block.
fn snat_range(blocks: &mut [Block]) -> Option<String> {
    blocks.sort_by_key(|b| b.first);
    let first = *blocks.first()?;
    let mut last = first.last();
    for b in blocks.iter().skip(1) {
        if b.addr == first.addr && u32::from(b.first) == u32::from(last) + 1 {
            last = b.last();
        }
    }
    Some(format!("{} . {}-{}", first.addr, first.first, last))
}

impl Dataplane for NftablesDataplane {
    fn apply(&mut self, changes: &[Change]) -> Vec<Result<(), ApplyError>> {
        let (results, holds_at) = self.apply_early(changes);
        if let Some(at) = holds_at {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
        self.settle();
        results
    }

    fn apply_early(
        &mut self,
        changes: &[Change],
    ) -> (Vec<Result<(), ApplyError>>, Option<Instant>) {
        self.learn_flows();
        if changes.is_empty() {
            return (Vec::new(), None);
        }
        // One transaction for the whole batch.
        let mut script = Script::default();
        let mut undo = Vec::new();
        let mut flows = Forget::default();
        let mut results: Vec<Result<(), ApplyError>> = Vec::with_capacity(changes.len());
        for c in changes {
            match self.stage(c, &mut script, &mut flows) {
                Ok(u) => {
                    undo.extend(u);
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let committed = if script.is_empty() {
            Ok(false)
        } else {
            self.commit(&script)
        };
        if let Ok(expired) = committed {
            return (results, self.removals(flows, expired));
        }
        // The batch failed as a whole: forget it, then apply change by
        // change so each gets its own result and the good ones still land.
        self.undo(undo);
        let mut flows = Forget::default();
        let mut expired = false;
        let results = changes
            .iter()
            .zip(results)
            .map(|(c, prior)| {
                prior?;
                let mut one = Script::default();
                let mut these = Forget::default();
                let undo = self.stage(c, &mut one, &mut these)?;
                if !one.is_empty() {
                    match self.commit(&one) {
                        Ok(e) => expired |= e,
                        Err(e) => {
                            self.undo(undo);
                            return Err(e);
                        }
                    }
                }
                flows.absorb(these);
                Ok(())
            })
            .collect();
        (results, self.removals(flows, expired))
    }

    fn idle(&mut self) {
        self.learn_flows();
    }

    fn settle(&mut self) {
        let now = Instant::now();
        let mut flows = Forget::default();
        while self.removing.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, f)) = self.removing.pop_front() {
                flows.absorb(f);
            }
        }
        if flows.is_empty() || crate::conntrack::tracks_nothing() {
            return;
        }
        self.forget_flows(&flows);
    }

    fn installed(&self) -> Vec<(Key, Option<Entry>)> {
        let mut v: Vec<(Key, Option<Entry>)> = self
            .installed
            .iter()
            .map(|i| (i.key(), i.entry()))
            .collect();
        for (sub, p) in &self.ports {
            for b in &p.blocks {
                v.push((
                    Key::SubscriberBlock {
                        subscriber: IpAddr::V4(*sub),
                        external_addr: b.addr,
                        first_port: b.first,
                    },
                    None,
                ));
            }
        }
        v
    }

    fn reconcile(&mut self, desired: Vec<Change>) -> Reconciled {
        let installed = self.installed().into_iter().map(|(k, _)| k);
        ReconcilePlan::new(installed, desired, |c| self.is_current(c)).apply(self)
    }

    fn name(&self) -> &'static str {
        "nftables"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_groups_elements_by_mapping_and_owner() {
        let json: Value = serde_json::from_str(
            r#"{"nftables":[
            {"map":{"name":"dnat4","elem":[[{"elem":{"val":{"concat":["192.0.2.1","tcp",80]},"timeout":60}},{"concat":["100.64.0.9",8080]}]]}},
            {"map":{"name":"snat4","elem":[[{"elem":{"val":{"concat":["100.64.0.9","tcp",8080]},"timeout":60}},{"concat":["192.0.2.1",80]}]]}},
            {"set":{"name":"filter4","elem":[{"concat":["192.0.2.1","tcp",80,{"prefix":{"addr":"10.0.0.0","len":8}},{"range":[0,65535]}]},
                                             {"concat":["192.0.2.1","udp",99,"11.1.2.3",443]}]}},
            {"map":{"name":"subs","elem":[["100.64.0.9",{"concat":["192.0.2.1",{"range":[1024,1535]}]}]]}}
            ]}"#,
        )
        .unwrap();
        let (installed, ports) = parse_listing(&json);
        let k = Key::Inbound(ExternalEndpoint {
            addr: Ipv4Addr::new(192, 0, 2, 1),
            protocol: 6,
            port: 80,
        });
        let Some(Installed::ReadBack(g)) = installed.get(&k) else {
            panic!("read back");
        };
        assert_eq!(g.owner, Some("100.64.0.9".parse().unwrap()));
        assert_eq!(g.elems.len(), 3);
        assert!(g
            .elems
            .iter()
            .any(|e| &*e.key == "192.0.2.1 . tcp . 80 . 10.0.0.0/8 . 0-65535"));
        // A filter without its mapping is an orphan.
        let orphan = Key::Inbound(ExternalEndpoint {
            addr: Ipv4Addr::new(192, 0, 2, 1),
            protocol: 17,
            port: 99,
        });
        assert_eq!(installed.get(&orphan).and_then(Installed::owner), None);
        let p = &ports[&Ipv4Addr::new(100, 64, 0, 9)];
        assert_eq!(p.blocks[0].len, 512);
        assert_eq!(p.value.as_deref(), Some("192.0.2.1 . 1024-1535"));
    }
}
