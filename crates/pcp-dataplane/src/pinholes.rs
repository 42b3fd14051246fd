//! The firewall half of the nftables backend: pinholes for subscribers of
//! firewall classes (RFC 6887 §3, "the mapping is the identity"), behind
//! the "no unsolicited inbound" policy of a stateful firewall (RFC 6092).
//! IPv6 lives in `table ip6 <name>`, IPv4 firewall classes in the NAT
//! table `ip <name>`; the sets and the chain are the same in both:
//!
//! ```text
//! set fw_protected{4,6}   the firewall classes' prefixes (interval)
//! set pin{4,6}            int addr . proto . port            MAP, static: open to anyone
//! set pinf{4,6}           int addr . proto . port            MAP with FILTER (§13.3) ...
//! set pinfilter{4,6}      int addr . proto . port . remote prefix . remote ports   ... and who may come in
//! set fwpeer{4,6}         int addr . proto . port . remote . rport   PEER (§12): exactly that peer
//! chain fw_forward (forward, priority filter - 10)
//!     not to a protected prefix, or from one        -> accept (not inbound)
//!     ct direction reply, ct state related          -> accept (flows the inside began; their ICMP errors)
//!     matches a pinhole, a FILTER, a PEER           -> mark, accept
//!     anything else                                 -> drop (unsolicited: drop), or left to
//!                                                      the operator's policy (unsolicited: mark)
//! ```
//!
//! A flow that came in through a pinhole is checked against the sets on
//! every packet (it is `ct direction original`), so deleting or expiring
//! the pinhole stops a flow that is already running, TCP or UDP, without
//! touching conntrack. Elements carry the same kernel timeout as NAT
//! mappings (lifetime plus grace): the kernel never closes a hole before
//! pcpd does, and closes it by itself if pcpd is gone.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use pcp_engine::{InternalEndpoint, MappingKey, MappingKind, RemoteEndpoint};

use crate::nftables::{proto_number, Elem};
use crate::{ApplyError, Entry, Key};

/// What happens to unsolicited inbound traffic toward firewall classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unsolicited {
    /// pcpd drops it (the safe default: a firewall class is protected as
    /// soon as pcpd runs).
    #[default]
    Drop,
    /// pcpd only marks what its pinholes let in (`meta mark | mark`) and
    /// accepts nothing else itself; the operator's own forward policy, at a
    /// later priority, decides (and must drop what is not marked).
    Mark,
}

/// The firewall part of the table: who is protected and how.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirewallRules {
    /// Prefixes of the firewall classes (IPv6 and IPv4).
    pub protected: Vec<IpNet>,
    /// Drop, or only mark.
    pub unsolicited: Unsolicited,
    /// The mark bits set on traffic a pinhole lets in.
    pub mark: u32,
}

/// The sets of the firewall part; those ending in `6` are in the ip6 table.
pub(crate) const SETS: [&str; 8] = [
    "pin4",
    "pinf4",
    "pinfilter4",
    "fwpeer4",
    "pin6",
    "pinf6",
    "pinfilter6",
    "fwpeer6",
];

/// The nft family a set of pcpd's is in.
pub(crate) fn family(set: &str) -> &'static str {
    if set.ends_with('6') {
        "ip6"
    } else {
        "ip"
    }
}

/// The sets and chain of one family (`4` or `6`), idempotent: elements are
/// kept, the protected prefixes and the rules are rewritten.
pub(crate) fn skeleton(table: &str, rules: &FirewallRules, v6: bool) -> String {
    let (fam, n, addr, ty) = if v6 {
        ("ip6", 6, "ip6", "ipv6_addr")
    } else {
        ("ip", 4, "ip", "ipv4_addr")
    };
    let t = table;
    let mut s = format!(
        "add table {fam} {t}\n\
         add set {fam} {t} fw_protected{n} {{ type {ty}; flags interval; auto-merge; }}\n\
         add set {fam} {t} pin{n} {{ type {ty} . inet_proto . inet_service; flags timeout; }}\n\
         add set {fam} {t} pinf{n} {{ type {ty} . inet_proto . inet_service; flags timeout; }}\n\
         add set {fam} {t} pinfilter{n} {{ type {ty} . inet_proto . inet_service . {ty} . inet_service; flags interval, timeout; }}\n\
         add set {fam} {t} fwpeer{n} {{ type {ty} . inet_proto . inet_service . {ty} . inet_service; flags timeout; }}\n\
         add chain {fam} {t} fw_forward {{ type filter hook forward priority filter - 10; policy accept; }}\n\
         flush chain {fam} {t} fw_forward\n\
         flush set {fam} {t} fw_protected{n}\n"
    );
    let prefixes: Vec<String> = rules
        .protected
        .iter()
        .filter(|p| matches!(p, IpNet::V6(_)) == v6)
        .map(|p| p.trunc().to_string())
        .collect();
    if prefixes.is_empty() {
        // No firewall class of this family: no chain on the forward path
        // (a NAT-only node pays nothing per packet). The sets stay, empty.
        s += &format!("delete chain {fam} {t} fw_forward\n");
        return s;
    }
    s += &format!(
        "add element {fam} {t} fw_protected{n} {{ {} }}\n",
        prefixes.join(", ")
    );
    let mark = format!("meta mark set meta mark | {:#x} accept", rules.mark);
    let tuple = format!("{addr} daddr . meta l4proto . th dport");
    let r = |rule: &str| format!("add rule {fam} {t} fw_forward {rule}\n");
    s += &r(&format!("{addr} daddr != @fw_protected{n} accept"));
    s += &r(&format!("{addr} saddr @fw_protected{n} accept"));
    s += &r("ct direction reply accept");
    s += &r("ct state related accept");
    s += &r(&format!(
        "meta l4proto {{ tcp, udp }} {tuple} @pin{n} {mark}"
    ));
    s += &r(&format!(
        "meta l4proto {{ tcp, udp }} {tuple} @pinf{n} {tuple} . {addr} saddr . th sport @pinfilter{n} {mark}"
    ));
    s += &r(&format!(
        "meta l4proto {{ tcp, udp }} {tuple} . {addr} saddr . th sport @fwpeer{n} {mark}"
    ));
    if rules.unsolicited == Unsolicited::Drop {
        s += &r("drop");
    }
    s
}

/// The elements of one pinhole or PEER permit.
pub(crate) fn elems(e: &Entry, proto: &str) -> Result<Vec<Elem>, ApplyError> {
    let internal = e.internal_addr.to_canonical();
    // The sets of the internal address's family (see SETS).
    let [pin, pinf, pinfilter, fwpeer] = if internal.is_ipv6() {
        ["pin6", "pinf6", "pinfilter6", "fwpeer6"]
    } else {
        ["pin4", "pinf4", "pinfilter4", "fwpeer4"]
    };
    let mut out = Vec::new();
    if let MappingKind::Peer {
        remote_addr,
        remote_port,
    } = e.kind
    {
        let remote = remote_addr.to_canonical();
        if remote.is_ipv6() != internal.is_ipv6() {
            return Err(ApplyError::Refused(format!(
                "{remote}: a PEER's remote is of its internal address's family (RFC 6887 §8.1)"
            )));
        }
        out.push(Elem {
            set: fwpeer,
            key: format!(
                "{internal} . {proto} . {} . {remote} . {remote_port}",
                e.internal_port
            )
            .into(),
            value: None,
        });
        return Ok(out);
    }
    let filters = filter_texts(&e.filters, internal.is_ipv6());
    for i in 0..e.port_count {
        let port = e.internal_port.wrapping_add(i);
        let hole: crate::nftables::Text = format!("{internal} . {proto} . {port}").into();
        if filters.is_empty() {
            out.push(Elem {
                set: pin,
                key: hole,
                value: None,
            });
            continue;
        }
        out.push(Elem {
            set: pinf,
            key: hole.clone(),
            value: None,
        });
        for f in &filters {
            out.push(Elem {
                set: pinfilter,
                key: format!("{hole} . {f}").into(),
                value: None,
            });
        }
    }
    Ok(out)
}

/// The mapping a listed element of a firewall set belongs to, and its
/// subscriber (`None` for a FILTER's remote, which names no owner alone).
pub(crate) fn parse(set: &str, parts: &[&str]) -> Option<(Key, Option<IpAddr>)> {
    let addr = |a: &str| a.parse::<IpAddr>().ok();
    let endpoint = |a: &str, p: &str, port: &str| -> Option<InternalEndpoint> {
        Some(InternalEndpoint {
            addr: addr(a)?,
            protocol: proto_number(p)?,
            port: port.parse().ok()?,
        })
    };
    let base = set.trim_end_matches(['4', '6']);
    match (base, parts) {
        ("pin" | "pinf", [a, p, port]) => Some((Key::Pinhole(endpoint(a, p, port)?), addr(a))),
        ("pinfilter", [a, p, port, ..]) => Some((Key::Pinhole(endpoint(a, p, port)?), None)),
        ("fwpeer", [a, p, port, r, rport]) => {
            let key = MappingKey {
                internal: endpoint(a, p, port)?,
                remote: Some(RemoteEndpoint {
                    addr: addr(r)?,
                    port: rport.parse().ok()?,
                }),
            };
            Some((Key::Peer(key), addr(a)))
        }
        _ => None,
    }
}

/// The FILTER remotes (RFC 6887 §13.3) of one family as set elements
/// (`prefix . ports`), without those another one already covers: the
/// kernel refuses overlapping intervals in a concatenated set, and §13.3
/// lets a client send nested prefixes. Addresses are masked to their
/// prefix and written as nft lists them, so a read-back compares equal.
pub(crate) fn filter_texts(filters: &[(IpAddr, u8, u16)], v6: bool) -> Vec<String> {
    let width: u8 = if v6 { 128 } else { 32 };
    let full: u128 = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    let mask = |len: u8| {
        full.checked_shl(u32::from(width - len))
            .map_or(0, |m| m & full)
    };
    let list: Vec<(u128, u8, u16)> = filters
        .iter()
        .filter_map(|(a, len, port)| {
            let bits = match (a.to_canonical(), v6) {
                (IpAddr::V4(a), false) => u128::from(u32::from(a)),
                (IpAddr::V6(a), true) => u128::from(a),
                _ => return None,
            };
            let len = (*len).min(width);
            Some((bits & mask(len), len, *port))
        })
        .collect();
    let covers = |outer: &(u128, u8, u16), inner: &(u128, u8, u16)| {
        outer.1 <= inner.1
            && inner.0 & mask(outer.1) == outer.0
            && (outer.2 == 0 || outer.2 == inner.2)
    };
    let mut out = Vec::new();
    for (i, f) in list.iter().enumerate() {
        let covered = list
            .iter()
            .enumerate()
            .any(|(j, g)| j != i && covers(g, f) && (!covers(f, g) || j < i));
        if covered {
            continue;
        }
        let addr = if v6 {
            Ipv6Addr::from(f.0).to_string()
        } else {
            Ipv4Addr::from(f.0 as u32).to_string()
        };
        let addr = if f.1 == width {
            addr
        } else {
            format!("{addr}/{}", f.1)
        };
        let ports = if f.2 == 0 {
            "0-65535".to_string()
        } else {
            f.2.to_string()
        };
        out.push(format!("{addr} . {ports}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_filters_collapse_to_the_outer_one_in_both_families() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let f = filter_texts(
            &[
                (a("10.1.2.3"), 32, 443),
                (a("10.9.9.9"), 8, 0),
                (a("10.0.0.0"), 8, 0),
                (a("192.0.2.77"), 24, 0),
                (a("198.51.100.1"), 32, 53),
                (a("2001:db8::1"), 128, 0),
            ],
            false,
        );
        assert_eq!(
            f,
            [
                "10.0.0.0/8 . 0-65535",
                "192.0.2.0/24 . 0-65535",
                "198.51.100.1 . 53"
            ]
        );
        let f = filter_texts(
            &[
                (a("2001:db8:1:2::9"), 64, 0),
                (a("2001:db8:1:2::7"), 128, 80),
                (a("2001:db8:eee::7"), 128, 0),
                (a("10.0.0.1"), 32, 0),
            ],
            true,
        );
        assert_eq!(
            f,
            ["2001:db8:1:2::/64 . 0-65535", "2001:db8:eee::7 . 0-65535"]
        );
    }

    #[test]
    fn drop_or_only_mark_what_pinholes_let_in() {
        let mut rules = FirewallRules {
            protected: vec![
                "2001:db8:f00::/64".parse().unwrap(),
                "198.18.0.0/24".parse().unwrap(),
            ],
            unsolicited: Unsolicited::Drop,
            mark: 0x10_0000,
        };
        let v6 = skeleton("pcpd", &rules, true);
        assert!(v6.contains("add element ip6 pcpd fw_protected6 { 2001:db8:f00::/64 }"));
        assert!(!v6.contains("198.18.0.0"), "each family its own prefixes");
        assert!(v6.contains("@pin6 meta mark set meta mark | 0x100000 accept"));
        assert!(v6.ends_with("add rule ip6 pcpd fw_forward drop\n"), "{v6}");
        rules.unsolicited = Unsolicited::Mark;
        let v4 = skeleton("pcpd", &rules, false);
        assert!(v4.contains("add element ip pcpd fw_protected4 { 198.18.0.0/24 }"));
        assert!(
            !v4.contains(" drop"),
            "mark mode leaves the verdict to the operator: {v4}"
        );
        // A family without firewall classes has no chain on the forward path.
        rules.protected.truncate(1);
        let v4 = skeleton("pcpd", &rules, false);
        assert!(v4.ends_with("delete chain ip pcpd fw_forward\n"), "{v4}");
        assert!(!v4.contains("add rule"), "{v4}");
    }

    #[test]
    fn a_pinhole_is_one_element_per_port_and_its_filters() {
        let e = Entry {
            kind: MappingKind::Map,
            external_addr: Ipv4Addr::UNSPECIFIED,
            external_port: 6000,
            port_count: 2,
            protocol: 17,
            firewall: true,
            internal_addr: "2001:db8:f00::1".parse().unwrap(),
            internal_port: 6000,
            filters: vec![("2001:db8:eee::7".parse().unwrap(), 128, 0)].into(),
            expires_ms: 0,
        };
        let got: Vec<(&str, String)> = elems(&e, "udp")
            .unwrap()
            .into_iter()
            .map(|e| (e.set, e.key.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("pinf6", "2001:db8:f00::1 . udp . 6000".to_string()),
                (
                    "pinfilter6",
                    "2001:db8:f00::1 . udp . 6000 . 2001:db8:eee::7 . 0-65535".to_string()
                ),
                ("pinf6", "2001:db8:f00::1 . udp . 6001".to_string()),
                (
                    "pinfilter6",
                    "2001:db8:f00::1 . udp . 6001 . 2001:db8:eee::7 . 0-65535".to_string()
                ),
            ]
        );
        for (set, key) in &got {
            let parts: Vec<&str> = key.split(" . ").collect();
            let (k, _) = parse(set, &parts).unwrap();
            assert!(matches!(k, Key::Pinhole(i) if i.protocol == 17));
        }
        assert_eq!(family("pinfilter6"), "ip6");
        assert_eq!(family("fwpeer4"), "ip");
    }
}
