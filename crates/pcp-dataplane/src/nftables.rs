//! The nftables backend: pcpd owns one table (`ip <name>`); mappings are
//! elements of nftables maps, never one rule per mapping, and every batch
//! is one atomic transaction (`nft -f -`).
//!
//! ```text
//! table ip pcpd
//!   map dnat4   proto-aware DNAT: ext addr . proto . ext port -> int addr . int port   (MAP, static)
//!   map peer4   per-flow SNAT:    int addr . proto . int port . remote . rport -> ext addr . ext port (PEER)
//!   map subs    port-set SNAT:    subscriber -> ext addr . port range                  (port blocks)
//!   set filtered4 / filter4       RFC 6887 §13.3 FILTER: mappings with filters / allowed remotes
//!   chain filter_in  (prerouting, before DNAT)  drop what a FILTER does not allow
//!   chain dnat_in    (prerouting, dstnat)       dnat via @dnat4
//!   chain snat_out   (postrouting, srcnat)      snat via @peer4, then @subs
//! ```
//!
//! Mapping elements carry a kernel timeout of their remaining lifetime plus
//! a grace period, so the kernel drops them even if pcpd is gone, and never
//! before pcpd itself does. A failed batch is retried change by change so
//! each change gets its own result.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use pcp_engine::{Block, MappingKind, Millis};

use crate::{ApplyError, Change, Dataplane, Entry, Key};

/// Seconds added to a mapping's kernel timeout so pcpd expires it first.
const GRACE_SECS: u64 = 30;

/// One element pcpd put in one of its maps or sets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Elem {
    set: &'static str,
    key: String,
}

/// Map elements with their values, and set elements, of one entry.
type Elems = (Vec<(Elem, String)>, Vec<Elem>);

#[derive(Debug, Clone)]
struct Installed {
    entry: Option<Entry>,
    elems: Vec<Elem>,
}

/// Mappings made real in the kernel's nftables.
pub struct NftablesDataplane {
    table: String,
    nft: String,
    installed: HashMap<Key, Installed>,
}

fn proto_name(p: u8) -> Option<&'static str> {
    match p {
        6 => Some("tcp"),
        17 => Some("udp"),
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
    /// Opens (creating if needed) table `ip <table>` and learns what it
    /// holds, so the daemon can reconcile. `nft` is the nft binary.
    pub fn open(table: &str, nft: &str) -> Result<Self, ApplyError> {
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
            installed: HashMap::new(),
        };
        dp.run(&dp.skeleton())?;
        dp.load()?;
        Ok(dp)
    }

    /// The table, maps, sets and rules; idempotent (elements are kept).
    fn skeleton(&self) -> String {
        let t = &self.table;
        format!(
            "add table ip {t}\n\
             add map ip {t} dnat4 {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; flags timeout; }}\n\
             add map ip {t} peer4 {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service : ipv4_addr . inet_service; flags timeout; }}\n\
             add map ip {t} subs {{ type ipv4_addr : interval ipv4_addr . inet_service; flags interval; }}\n\
             add set ip {t} filtered4 {{ type ipv4_addr . inet_proto . inet_service; }}\n\
             add set ip {t} filter4 {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service; flags interval; }}\n\
             add chain ip {t} filter_in {{ type filter hook prerouting priority dstnat - 10; policy accept; }}\n\
             add chain ip {t} dnat_in {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             add chain ip {t} snat_out {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             flush chain ip {t} filter_in\n\
             flush chain ip {t} dnat_in\n\
             flush chain ip {t} snat_out\n\
             add rule ip {t} filter_in meta l4proto {{ tcp, udp }} ip daddr . meta l4proto . th dport @filtered4 ip daddr . meta l4proto . th dport . ip saddr . th sport != @filter4 drop\n\
             add rule ip {t} dnat_in meta l4proto {{ tcp, udp }} dnat ip to ip daddr . meta l4proto . th dport map @dnat4\n\
             add rule ip {t} snat_out meta l4proto {{ tcp, udp }} snat ip to ip saddr . meta l4proto . th sport . ip daddr . th dport map @peer4\n\
             add rule ip {t} snat_out meta l4proto {{ tcp, udp }} snat ip to ip saddr map @subs\n"
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

    /// Reads the table's elements back (after a restart of pcpd).
    fn load(&mut self) -> Result<(), ApplyError> {
        let out = Command::new(&self.nft)
            .args(["-j", "list", "table", "ip", &self.table])
            .output()
            .map_err(|e| ApplyError::Unavailable(format!("{}: {e}", self.nft)))?;
        if !out.status.success() {
            return Err(ApplyError::Unavailable(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        self.installed = parse_listing(&text);
        Ok(())
    }

    /// The nft element text for one mapping or port set.
    fn elems_for(change_entry: &Entry) -> Result<Elems, ApplyError> {
        let e = change_entry;
        let proto = proto_name(e.protocol).ok_or_else(|| {
            ApplyError::Refused(format!(
                "protocol {} is not NATed by nftables here",
                e.protocol
            ))
        })?;
        let internal = v4(e.internal_addr)?;
        let timeout = if e.expires_ms == Millis::MAX {
            String::new()
        } else {
            let secs = e.expires_ms.saturating_sub(now_ms()).div_ceil(1000) + GRACE_SECS;
            format!(" timeout {secs}s")
        };
        let mut maps = Vec::new();
        let mut sets = Vec::new();
        match e.kind {
            MappingKind::Peer {
                remote_addr,
                remote_port,
            } => {
                let remote = v4(remote_addr)?;
                maps.push((
                    Elem {
                        set: "peer4",
                        key: format!(
                            "{internal} . {proto} . {} . {remote} . {remote_port}",
                            e.internal_port
                        ),
                    },
                    format!("{timeout} : {} . {}", e.external_addr, e.external_port),
                ));
            }
            MappingKind::Map | MappingKind::Static => {
                for i in 0..e.port_count {
                    let ext_port = e.external_port.wrapping_add(i);
                    maps.push((
                        Elem {
                            set: "dnat4",
                            key: format!("{} . {proto} . {ext_port}", e.external_addr),
                        },
                        format!(
                            "{timeout} : {internal} . {}",
                            e.internal_port.wrapping_add(i)
                        ),
                    ));
                    if !e.filters.is_empty() {
                        sets.push(Elem {
                            set: "filtered4",
                            key: format!("{} . {proto} . {ext_port}", e.external_addr),
                        });
                        for (addr, len, port) in &e.filters {
                            let IpAddr::V4(a) = addr.to_canonical() else {
                                continue;
                            };
                            let ports = if *port == 0 {
                                "0-65535".to_string()
                            } else {
                                port.to_string()
                            };
                            sets.push(Elem {
                                set: "filter4",
                                key: format!(
                                    "{} . {proto} . {ext_port} . {a}/{len} . {ports}",
                                    e.external_addr
                                ),
                            });
                        }
                    }
                }
            }
        }
        Ok((maps, sets))
    }

    /// nft statements for one change, and the new installed state.
    fn script_for(
        &self,
        change: &Change,
        out: &mut String,
    ) -> Result<Option<(Key, Option<Installed>)>, ApplyError> {
        let t = &self.table;
        let delete = |out: &mut String, inst: &Installed| {
            for el in &inst.elems {
                let _ = writeln!(out, "delete element ip {t} {} {{ {} }}", el.set, el.key);
            }
        };
        match change {
            Change::Upsert(entry) => {
                let (maps, sets) = Self::elems_for(entry)?;
                let key = entry.key();
                if let Some(old) = self.installed.get(&key) {
                    delete(out, old);
                }
                let mut elems = Vec::new();
                for (el, value) in maps {
                    let _ = writeln!(out, "add element ip {t} {} {{ {}{value} }}", el.set, el.key);
                    elems.push(el);
                }
                for el in sets {
                    let _ = writeln!(out, "add element ip {t} {} {{ {} }}", el.set, el.key);
                    elems.push(el);
                }
                Ok(Some((
                    key,
                    Some(Installed {
                        entry: Some(entry.clone()),
                        elems,
                    }),
                )))
            }
            Change::Remove(key) => {
                if let Some(old) = self.installed.get(key) {
                    delete(out, old);
                }
                Ok(Some((*key, None)))
            }
            Change::AddPortSet { subscriber, block }
            | Change::RemovePortSet { subscriber, block } => {
                let key = Key::PortSet {
                    subscriber: *subscriber,
                    external_addr: block.addr,
                    first_port: block.first,
                };
                let sub = v4(*subscriber)?;
                let add = matches!(change, Change::AddPortSet { .. });
                // One SNAT range per subscriber (a map key holds one value):
                // its lowest block, extended by contiguous ones.
                let mut blocks: Vec<Block> = self
                    .installed
                    .keys()
                    .filter_map(|k| match k {
                        Key::PortSet {
                            subscriber: s,
                            external_addr,
                            first_port,
                        } if s == subscriber && *k != key => Some(Block {
                            addr: *external_addr,
                            first: *first_port,
                            len: block.len,
                        }),
                        _ => None,
                    })
                    .collect();
                if add {
                    blocks.push(*block);
                }
                let had = self
                    .installed
                    .keys()
                    .any(|k| matches!(k, Key::PortSet { subscriber: s, .. } if s == subscriber));
                if had {
                    let _ = writeln!(out, "delete element ip {t} subs {{ {sub} }}");
                }
                if let Some(range) = snat_range(&mut blocks) {
                    let _ = writeln!(out, "add element ip {t} subs {{ {sub} : {range} }}");
                }
                let inst = add.then(|| Installed {
                    entry: None,
                    elems: Vec::new(),
                });
                Ok(Some((key, inst)))
            }
        }
    }

    fn commit(&mut self, updates: Vec<(Key, Option<Installed>)>) {
        for (k, v) in updates {
            match v {
                Some(i) => {
                    self.installed.insert(k, i);
                }
                None => {
                    self.installed.remove(&k);
                }
            }
        }
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

/// Rebuilds the installed state from `nft -j list table` output: every
/// element becomes a key with no known entry, so reconcile rewrites it.
fn parse_listing(json: &str) -> HashMap<Key, Installed> {
    let mut out = HashMap::new();
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return out;
    };
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(map) = item.get("map").or_else(|| item.get("set")) else {
            continue;
        };
        let name = map["name"].as_str().unwrap_or_default();
        for el in map["elem"].as_array().cloned().unwrap_or_default() {
            // Map elements are [key, value]; set elements are the key.
            let key_val = if el.is_array() {
                el[0].clone()
            } else {
                el.clone()
            };
            let key_val = key_val
                .get("elem")
                .map_or(key_val.clone(), |e| e["val"].clone());
            let parts: Vec<String> = key_val["concat"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                        .collect()
                })
                .unwrap_or_else(|| {
                    vec![key_val
                        .as_str()
                        .map_or_else(|| key_val.to_string(), str::to_string)]
                });
            let parse_proto = |p: &str| match p {
                "tcp" => Some(6u8),
                "udp" => Some(17u8),
                _ => None,
            };
            let (key, set) = match (name, parts.as_slice()) {
                ("dnat4", [a, p, port]) => match (a.parse(), parse_proto(p), port.parse()) {
                    (Ok(external_addr), Some(protocol), Ok(external_port)) => (
                        Key::Inbound {
                            protocol,
                            external_addr,
                            external_port,
                        },
                        "dnat4",
                    ),
                    _ => continue,
                },
                ("peer4", [ia, p, ip, ra, rp]) => match (
                    ia.parse(),
                    parse_proto(p),
                    ip.parse(),
                    ra.parse(),
                    rp.parse(),
                ) {
                    (
                        Ok(internal_addr),
                        Some(protocol),
                        Ok(internal_port),
                        Ok(remote_addr),
                        Ok(remote_port),
                    ) => (
                        Key::Peer {
                            protocol,
                            internal_addr,
                            internal_port,
                            remote_addr,
                            remote_port,
                        },
                        "peer4",
                    ),
                    _ => continue,
                },
                ("subs", [sub]) => {
                    // Value: {"concat": [addr, {"range": [first, last]}]}.
                    let value = if el.is_array() {
                        el[1].clone()
                    } else {
                        continue;
                    };
                    let addr = value["concat"][0].as_str().and_then(|a| a.parse().ok());
                    let first = value["concat"][1]["range"][0]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok());
                    if let (Ok(subscriber), Some(external_addr), Some(first_port)) =
                        (sub.parse(), addr, first)
                    {
                        out.insert(
                            Key::PortSet {
                                subscriber,
                                external_addr,
                                first_port,
                            },
                            Installed {
                                entry: None,
                                elems: Vec::new(),
                            },
                        );
                    }
                    continue;
                }
                _ => continue, // filters: rewritten with their mappings
            };
            let elem_key = parts.join(" . ");
            out.insert(
                key,
                Installed {
                    entry: None,
                    elems: vec![Elem { set, key: elem_key }],
                },
            );
        }
    }
    out
}

impl Dataplane for NftablesDataplane {
    fn apply(&mut self, changes: &[Change]) -> Vec<Result<(), ApplyError>> {
        if changes.is_empty() {
            return Vec::new();
        }
        // One transaction for the whole batch.
        let mut script = String::new();
        let mut updates = Vec::with_capacity(changes.len());
        let mut results: Vec<Result<(), ApplyError>> = Vec::with_capacity(changes.len());
        for c in changes {
            match self.script_for(c, &mut script) {
                Ok(u) => {
                    updates.extend(u);
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if script.is_empty() || self.run(&script).is_ok() {
            self.commit(updates);
            return results;
        }
        // The batch failed as a whole: apply change by change so each gets
        // its own result and the good ones still land.
        changes
            .iter()
            .zip(results)
            .map(|(c, prior)| {
                prior?;
                let mut one = String::new();
                let update = self.script_for(c, &mut one)?;
                if !one.is_empty() {
                    self.run(&one)?;
                }
                self.commit(update.into_iter().collect());
                Ok(())
            })
            .collect()
    }

    fn installed(&self) -> Vec<(Key, Option<Entry>)> {
        self.installed
            .iter()
            .map(|(k, v)| (*k, v.entry.clone()))
            .collect()
    }

    fn name(&self) -> &'static str {
        "nftables"
    }
}
