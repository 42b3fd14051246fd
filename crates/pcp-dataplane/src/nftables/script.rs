//! One nf_tables transaction being built from a batch of changes, and its
//! two renderings: netlink element operations (the default,
//! [`crate::nfnetlink`]) and `nft -f` text (the fallback, and the writer
//! the bench compares against).

// Keys here are pcpd's own elements and mappings, hashed per element
// per batch: foldhash (randomly seeded) rather than SipHash.
use foldhash::HashMap;
use std::collections::hash_map::Entry;
use std::fmt::Write as _;

use super::Elem;
use crate::nfnetlink::{self, ElemOp};
use crate::pinholes;

/// Elements per nft statement.
const CHUNK: usize = 1024;

/// Sets with `flags interval` (FILTER's remote prefixes and port ranges):
/// their elements carry a first and a last key.
const INTERVAL_SETS: [&str; 3] = ["filter4", "pinfilter4", "pinfilter6"];
/// Maps whose values are ranges (the port-block SNAT map).
const RANGE_VALUES: [&str; 1] = ["subs"];

/// One transaction being built. Each element touched keeps its state
/// before the batch and after it, so a batch that creates and deletes the
/// same mapping writes nothing, and the text is a few statements with many
/// elements each (nft parses one statement per set far faster than one
/// per element).
#[derive(Default)]
pub(super) struct Script {
    touched: HashMap<ElemId, Touched>,
}

/// An element touched by the batch.
struct Touched {
    /// When it was first touched (elements are written in that order).
    seq: usize,
    /// Its kernel copy carries a timeout: over netlink, removing it only
    /// moves its expiration to now (see [`Script::ops`]).
    timed: bool,
    /// The element before the batch.
    before: Option<Elem>,
    /// After it, with its kernel timeout in seconds (`None`: none).
    after: Option<(Elem, Option<u64>)>,
}

/// An element's set and key.
pub(super) type ElemId = (&'static str, super::Text);

/// The expiration given to an element that is removed by expiring it: the
/// kernel's smallest (it rounds up to one jiffy).
const EXPIRE_NOW_MS: u64 = 1;
/// The timeout that comes with it (the kernel wants one longer).
const EXPIRING_TIMEOUT_MS: u64 = 1000;

impl Script {
    /// Removes an element that is installed now; `timed`: its kernel copy
    /// carries a timeout.
    pub(super) fn delete(&mut self, el: &Elem, timed: bool) {
        let timed = timed && !INTERVAL_SETS.contains(&el.set);
        let seq = self.touched.len();
        self.touched
            .entry((el.set, el.key.clone()))
            .and_modify(|t| {
                t.after = None;
                t.timed |= timed;
            })
            .or_insert_with(|| Touched {
                seq,
                timed,
                before: Some(el.clone()),
                after: None,
            });
    }

    pub(super) fn add(&mut self, el: Elem, timeout: Option<u64>) {
        let seq = self.touched.len();
        match self.touched.entry((el.set, el.key.clone())) {
            Entry::Occupied(mut t) => t.get_mut().after = Some((el, timeout)),
            Entry::Vacant(v) => {
                v.insert(Touched {
                    seq,
                    timed: false,
                    before: None,
                    after: Some((el, timeout)),
                });
            }
        }
    }

    /// The touched elements in the order they were first touched.
    fn in_order(&self) -> Vec<&Touched> {
        let mut all: Vec<&Touched> = self.touched.values().collect();
        all.sort_unstable_by_key(|t| t.seq);
        all
    }

    /// The phases of the transaction: elements to put back as they were
    /// (text only), to delete, to add, and to expire (netlink only).
    fn phases(&self, expire: bool) -> [Vec<(&Elem, Option<u64>)>; 4] {
        let (mut old, mut gone, mut new) = (Vec::new(), Vec::new(), Vec::new());
        let mut expiring = Vec::new();
        for t in self.in_order() {
            match &t.before {
                Some(b) if expire && t.after.is_none() && t.timed => {
                    expiring.push((b, None));
                }
                Some(b)
                    if expire
                        && t.timed
                        && t.after
                            .as_ref()
                            .is_some_and(|(a, to)| a == b && to.is_some()) => {}
                Some(b) => {
                    old.push((b, None));
                    gone.push((b, None));
                }
                None => {}
            }
            if let Some((a, timeout)) = &t.after {
                new.push((a, *timeout));
            }
        }
        [old, gone, new, expiring]
    }

    /// The elements this transaction adds.
    pub(super) fn added(&self) -> impl Iterator<Item = &ElemId> {
        self.touched
            .iter()
            .filter(|(_, t)| t.after.is_some())
            .map(|(k, _)| k)
    }

    /// The elements this transaction removes by expiring them (netlink).
    pub(super) fn expired(&self) -> impl Iterator<Item = &ElemId> {
        self.touched
            .iter()
            .filter(|(_, t)| t.timed && t.after.is_none())
            .map(|(k, _)| k)
    }

    /// The transaction as netlink element operations, grouped per set
    /// within each phase; `None` when an element's text does not encode
    /// (never for what pcpd writes; `nft -f` then reports it).
    ///
    /// An element with a kernel timeout that goes away is not deleted: it
    /// is re-added with its expiration moved to now (an update the kernel
    /// makes in place, 6.12 and later). The kernel never matches an expired
    /// element, so it stops forwarding within a jiffy, and its garbage
    /// collection frees it; a delete instead makes the transaction wait
    /// for an RCU grace period (~10 ms here, whatever its size). Adding
    /// "as it is" first is not needed: an update of an element the kernel
    /// has already dropped adds one that is expired.
    pub(super) fn ops(&self, ops: &mut Vec<ElemOp>) -> Option<()> {
        ops.clear();
        for (phase, mut list) in self.phases(true).into_iter().enumerate() {
            // One message per set: grouped (stably) before encoding.
            list.sort_by_key(|(el, _)| (pinholes::family(el.set) == "ip6", el.set));
            for (el, timeout) in list {
                let add = phase != 1;
                let (key, key_end) = if INTERVAL_SETS.contains(&el.set) {
                    let (lo, hi) = nfnetlink::encode_range(&el.key)?;
                    (lo, Some(hi))
                } else {
                    (nfnetlink::encode(&el.key)?, None)
                };
                let expiration_ms = (phase == 3).then_some(EXPIRE_NOW_MS);
                let data = match (&el.value, add) {
                    (Some(v), true) if RANGE_VALUES.contains(&el.set) => {
                        let (lo, hi) = nfnetlink::encode_range(v)?;
                        Some(lo.concat(&hi)?)
                    }
                    (Some(v), true) => Some(nfnetlink::encode(v)?),
                    _ => None,
                };
                ops.push(ElemOp {
                    ipv6: pinholes::family(el.set) == "ip6",
                    set: el.set,
                    add,
                    key,
                    key_end,
                    data,
                    // An expiration comes with a timeout longer than it.
                    timeout_ms: match expiration_ms {
                        Some(_) => Some(EXPIRING_TIMEOUT_MS),
                        None => timeout.map(|s| s * 1000),
                    },
                    expiration_ms,
                });
            }
        }
        Some(())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.touched.is_empty()
    }

    /// The nft text: elements that go away are first added as they are
    /// then deleted ("add, then delete" is idempotent even when the kernel
    /// has already timed an element out), then the new ones are added
    /// (renewals are deleted and re-added so their timeout restarts).
    pub(super) fn render(&self, table: &str) -> String {
        let value = |el: &Elem| {
            el.value
                .as_deref()
                .map(|v| format!(" : {v}"))
                .unwrap_or_default()
        };
        let [old, gone, new, _] = self.phases(false);
        let old = old
            .into_iter()
            .map(|(b, _)| (b.set, format!("{}{}", b.key, value(b))));
        let gone = gone.into_iter().map(|(b, _)| (b.set, b.key.to_string()));
        let new = new.into_iter().map(|(a, timeout)| {
            let t = timeout
                .map(|s| format!(" timeout {s}s"))
                .unwrap_or_default();
            (a.set, format!("{}{t}{}", a.key, value(a)))
        });
        let phases: [(&str, Vec<(&str, String)>); 3] = [
            ("add", old.collect()),
            ("delete", gone.collect()),
            ("add", new.collect()),
        ];
        let mut out = String::new();
        for (verb, list) in phases {
            let mut by_set: Vec<(&str, Vec<String>)> = Vec::new();
            for (set, text) in list {
                match by_set.iter_mut().find(|(s, _)| *s == set) {
                    Some((_, v)) => v.push(text),
                    None => by_set.push((set, vec![text])),
                }
            }
            for (set, elems) in by_set {
                for chunk in elems.chunks(CHUNK) {
                    let _ = writeln!(
                        out,
                        "{verb} element {} {table} {set} {{ {} }}",
                        pinholes::family(set),
                        chunk.join(", ")
                    );
                }
            }
        }
        out
    }
}
