//! One nf_tables transaction being built from a batch of changes, and its
//! two renderings: netlink element operations (the default,
//! [`crate::nfnetlink`]) and `nft -f` text (the fallback, and the writer
//! the bench compares against).

// Keys here are pcpd's own elements and mappings, hashed per element
// per batch: foldhash (randomly seeded) rather than SipHash.
use foldhash::{HashMap, HashSet};
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
    order: Vec<ElemId>,
    touched: HashMap<ElemId, Touched>,
    /// Elements in `touched` whose kernel copy carries a timeout: over
    /// netlink, removing one only moves its expiration to now (see
    /// [`Script::ops`]).
    timed: HashSet<ElemId>,
}

/// An element before the batch, and after it with its kernel timeout in
/// seconds (`None`: none).
type Touched = (Option<Elem>, Option<(Elem, Option<u64>)>);

/// An element's set and key.
pub(super) type ElemId = (&'static str, String);

/// The expiration given to an element that is removed by expiring it: the
/// kernel's smallest (it rounds up to one jiffy).
const EXPIRE_NOW_MS: u64 = 1;
/// The timeout that comes with it (the kernel wants one longer).
const EXPIRING_TIMEOUT_MS: u64 = 1000;

impl Script {
    /// Removes an element that is installed now; `timed`: its kernel copy
    /// carries a timeout.
    pub(super) fn delete(&mut self, el: &Elem, timed: bool) {
        let k = (el.set, el.key.clone());
        if timed && !INTERVAL_SETS.contains(&el.set) {
            self.timed.insert(k.clone());
        }
        match self.touched.get_mut(&k) {
            Some(t) => t.1 = None,
            None => {
                self.order.push(k.clone());
                self.touched.insert(k, (Some(el.clone()), None));
            }
        }
    }

    /// Installs an element with a kernel timeout in seconds (`None`: none).
    pub(super) fn add(&mut self, el: Elem, timeout: Option<u64>) {
        let k = (el.set, el.key.clone());
        match self.touched.get_mut(&k) {
            Some(t) => t.1 = Some((el, timeout)),
            None => {
                self.order.push(k.clone());
                self.touched.insert(k, (None, Some((el, timeout))));
            }
        }
    }

    /// The phases of the transaction, in order: elements that go away
    /// added as they are, then deleted, then the new ones added (see
    /// [`Script::render`]); with `expire`, timed elements that go away
    /// are in a fourth list instead (expired), and timed elements added
    /// again as they were, with a timeout, are only added (updated).
    fn phases(&self, expire: bool) -> [Vec<(&Elem, Option<u64>)>; 4] {
        let (mut old, mut gone, mut new) = (Vec::new(), Vec::new(), Vec::new());
        let mut expiring = Vec::new();
        for k in &self.order {
            let Some((before, after)) = self.touched.get(k) else {
                continue;
            };
            match before {
                Some(b) if expire && after.is_none() && self.timed.contains(k) => {
                    expiring.push((b, None));
                }
                // The same element with a new timeout: the add updates it
                // in place (kernel 6.12 and later; see `NftablesDataplane::expire_in_place`).
                Some(b)
                    if expire
                        && self.timed.contains(k)
                        && after.as_ref().is_some_and(|(a, t)| a == b && t.is_some()) => {}
                Some(b) => {
                    old.push((b, None));
                    gone.push((b, None));
                }
                None => {}
            }
            if let Some((a, timeout)) = after {
                new.push((a, *timeout));
            }
        }
        [old, gone, new, expiring]
    }

    /// The elements this transaction adds.
    pub(super) fn added(&self) -> impl Iterator<Item = &ElemId> {
        self.order
            .iter()
            .filter(|k| self.touched.get(*k).is_some_and(|t| t.1.is_some()))
    }

    /// The elements this transaction removes by expiring them (netlink).
    pub(super) fn expired(&self) -> impl Iterator<Item = &ElemId> {
        self.order.iter().filter(|k| {
            self.timed.contains(*k) && self.touched.get(*k).is_some_and(|t| t.1.is_none())
        })
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
    pub(super) fn ops(&self) -> Option<Vec<ElemOp>> {
        let mut ops = Vec::new();
        for (phase, list) in self.phases(true).into_iter().enumerate() {
            let at = ops.len();
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
                        Some([lo, hi].concat())
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
            ops[at..].sort_by_key(|o| (o.ipv6, o.set));
        }
        Some(ops)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.order.is_empty()
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
        let gone = gone.into_iter().map(|(b, _)| (b.set, b.key.clone()));
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
