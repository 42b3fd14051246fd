//! Maps keyed by external endpoint, in [`SEGMENTS`] tables chosen by port.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use crate::keyed::SEGMENTS;
use crate::types::ExternalEndpoint;

/// pcpd picks external ports (at random, RFC 6888 REQ-13), so subscribers
/// cannot aim at a bucket: foldhash, randomly seeded.
type PortHasher = foldhash::fast::RandomState;

/// A map keyed by external endpoint, in [`SEGMENTS`] tables chosen by
/// port, each growing on its own (as `keyed::PositionIndex` does): no
/// insert rehashes more than a 32nd of it. One table doubling at half a
/// million entries took a shard tens of ms (the external ports in use
/// under a flood of creates; the ports in their reuse delay under an
/// expiry storm: 57 ms in the engine bench's).
pub(super) struct PortMap<V> {
    segments: Box<[HashMap<ExternalEndpoint, V, PortHasher>; SEGMENTS]>,
}

impl<V> Default for PortMap<V> {
    fn default() -> Self {
        PortMap {
            segments: Box::new(std::array::from_fn(|_| HashMap::default())),
        }
    }
}

impl<V> PortMap<V> {
    fn segment(&self, k: &ExternalEndpoint) -> &HashMap<ExternalEndpoint, V, PortHasher> {
        &self.segments[usize::from(k.port) % SEGMENTS]
    }

    fn segment_mut(
        &mut self,
        k: &ExternalEndpoint,
    ) -> &mut HashMap<ExternalEndpoint, V, PortHasher> {
        &mut self.segments[usize::from(k.port) % SEGMENTS]
    }

    pub(super) fn get(&self, k: &ExternalEndpoint) -> Option<&V> {
        self.segment(k).get(k)
    }

    pub(super) fn contains_key(&self, k: &ExternalEndpoint) -> bool {
        self.segment(k).contains_key(k)
    }

    pub(super) fn insert(&mut self, k: ExternalEndpoint, v: V) -> Option<V> {
        self.segment_mut(&k).insert(k, v)
    }

    pub(super) fn entry(&mut self, k: ExternalEndpoint) -> Entry<'_, ExternalEndpoint, V> {
        self.segment_mut(&k).entry(k)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::Entry;

    use super::PortMap;
    use crate::types::ExternalEndpoint;

    /// Every port lands in its own segment and is found there again.
    #[test]
    fn endpoints_are_found_in_their_segment() {
        let mut m: PortMap<u32> = PortMap::default();
        let at = |port| ExternalEndpoint {
            addr: std::net::Ipv4Addr::new(192, 0, 2, 1),
            protocol: 6,
            port,
        };
        for port in 0..1000u16 {
            assert_eq!(m.insert(at(port), u32::from(port)), None);
        }
        *m.entry(at(7)).or_insert(0) += 100;
        assert_eq!(m.get(&at(7)), Some(&107));
        assert!(m.contains_key(&at(999)) && !m.contains_key(&at(1000)));
        let removed = match m.entry(at(999)) {
            Entry::Occupied(e) => Some(e.remove()),
            Entry::Vacant(_) => None,
        };
        assert_eq!(removed, Some(999));
        assert!(m.get(&at(999)).is_none());
        let sizes: Vec<usize> = m.segments.iter().map(|s| s.len()).collect();
        assert!(sizes.iter().all(|n| (30..=32).contains(n)), "{sizes:?}");
    }
}
