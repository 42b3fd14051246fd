//! Reading pcpd's table back from `nft -j list table` (after a restart):
//! the elements, grouped by the mapping they belong to.

use foldhash::HashMap;
use std::net::Ipv4Addr;

use serde_json::Value;

use super::*;

/// nft's JSON for a key or value, as the text nft reads.
fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) => {
            if let Some(Value::Array(parts)) = o.get("concat") {
                parts.iter().map(render).collect::<Vec<_>>().join(" . ")
            } else if let Some(p) = o.get("prefix") {
                format!("{}/{}", render(&p["addr"]), render(&p["len"]))
            } else if let Some(r) = o.get("range") {
                format!("{}-{}", render(&r[0]), render(&r[1]))
            } else if let Some(e) = o.get("elem") {
                render(&e["val"])
            } else {
                v.to_string()
            }
        }
        _ => v.to_string(),
    }
}

/// Rebuilds pcpd's view of its table from `nft -j list table`: elements
/// are grouped by the mapping they belong to (inbound by external
/// endpoint, PEER by five-tuple) with the subscriber that owns them.
pub(super) fn parse_listing(json: &Value) -> (KeyedTable<Installed>, HashMap<Ipv4Addr, PortSets>) {
    let mut installed: HashMap<Key, ReadBack> = HashMap::default();
    let mut ports: HashMap<Ipv4Addr, PortSets> = HashMap::default();
    let empty = Vec::new();
    for item in json["nftables"].as_array().unwrap_or(&empty) {
        let Some(obj) = item.get("map").or_else(|| item.get("set")) else {
            continue;
        };
        let set: &'static str = match obj["name"].as_str() {
            Some("dnat4") => "dnat4",
            Some("snat4") => "snat4",
            Some("peer4") => "peer4",
            Some("subs") => "subs",
            Some("filtered4") => "filtered4",
            Some("filter4") => "filter4",
            Some(name) => match pinholes::SETS.iter().find(|s| **s == name) {
                Some(s) => s,
                None => continue,
            },
            None => continue,
        };
        for el in obj["elem"].as_array().unwrap_or(&empty) {
            // Map elements are [key, value]; set elements are the key.
            let (key, value) = match el.as_array() {
                Some(kv) if kv.len() == 2 => (render(&kv[0]), Some(render(&kv[1]))),
                _ => (render(el), None),
            };
            let parts: Vec<&str> = key.split(" . ").collect();
            let vparts: Vec<&str> = value
                .as_deref()
                .map_or(Vec::new(), |v| v.split(" . ").collect());
            let inbound = |a: &str, p: &str, port: &str| -> Option<Key> {
                Some(Key::Inbound(ExternalEndpoint {
                    addr: a.parse().ok()?,
                    protocol: proto_number(p)?,
                    port: port.parse().ok()?,
                }))
            };
            let (group, owner) = match (set, parts.as_slice(), vparts.as_slice()) {
                (s, p, _) if pinholes::SETS.contains(&s) => match pinholes::parse(s, p) {
                    Some((k, owner)) => (Some(k), owner),
                    None => (None, None),
                },
                ("dnat4", [a, p, port], [int, _]) => (inbound(a, p, port), int.parse().ok()),
                ("snat4", [int, p, _], [a, port]) => (inbound(a, p, port), int.parse().ok()),
                ("filtered4", [a, p, port], _) => (inbound(a, p, port), None),
                ("filter4", [a, p, port, ..], _) => (inbound(a, p, port), None),
                ("peer4", [int, p, iport, r, rport], _) => {
                    let key = (|| {
                        Some(Key::Peer(MappingKey {
                            internal: InternalEndpoint {
                                addr: int.parse().ok()?,
                                protocol: proto_number(p)?,
                                port: iport.parse().ok()?,
                            },
                            remote: Some(RemoteEndpoint {
                                addr: r.parse().ok()?,
                                port: rport.parse().ok()?,
                            }),
                        }))
                    })();
                    (key, int.parse().ok())
                }
                ("subs", [sub], [a, range]) => {
                    let block = (|| {
                        let (lo, hi) = range.split_once('-')?;
                        let (lo, hi): (u16, u16) = (lo.parse().ok()?, hi.parse().ok()?);
                        Some((
                            sub.parse::<Ipv4Addr>().ok()?,
                            Block {
                                addr: a.parse().ok()?,
                                first: lo,
                                len: hi.checked_sub(lo)?.checked_add(1)?,
                            },
                        ))
                    })();
                    if let Some((sub, block)) = block {
                        ports.insert(
                            sub,
                            PortSets {
                                blocks: vec![block],
                                value,
                            },
                        );
                    }
                    continue;
                }
                _ => continue,
            };
            let Some(group) = group else { continue };
            let r = installed.entry(group).or_insert_with(|| ReadBack {
                key: group,
                owner: None,
                elems: Vec::new(),
            });
            r.owner = r.owner.or(owner);
            r.elems.push(Elem {
                set,
                key: key.into(),
                value: value.map(Into::into),
            });
        }
    }
    let installed = installed
        .into_values()
        .map(|r| Installed::ReadBack(Box::new(r)))
        .collect();
    (installed, ports)
}
