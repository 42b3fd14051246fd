//! Who held which port block until when, for "who had external IP:port at
//! time T" (RFC 6302): bounded by age and count (dynamic pools only;
//! deterministic ones are computed, RFC 7422).

use std::collections::VecDeque;
use std::net::IpAddr;

use crate::alloc::Block;
use crate::config::EngineConfig;
use crate::types::{Holder, Millis};

/// Past holdings, oldest first.
#[derive(Default)]
pub(super) struct History {
    records: VecDeque<Holder>,
    /// Records ever pushed: the last record is number `pushed - 1`, the
    /// first `pushed - len` (a snapshot's cursor counts this way, since
    /// old records leave from the front while it goes; `slices.rs`).
    pushed: u64,
}

impl History {
    /// Records that `subscriber` held `block` from `since` until `now`,
    /// dropping what is past retention or over the count limit.
    pub(super) fn record(
        &mut self,
        cfg: &EngineConfig,
        now: Millis,
        subscriber: IpAddr,
        block: Block,
        since: Millis,
    ) {
        let retention = cfg.history_retention_secs * 1000;
        while self.records.len() >= cfg.history_max_records.max(1)
            || self
                .records
                .front()
                .is_some_and(|h| h.to_ms.unwrap_or(0) + retention < now)
        {
            self.records.pop_front();
        }
        self.records.push_back(Holder {
            internal_addr: subscriber,
            block,
            from_ms: Some(since),
            to_ms: Some(now),
        });
        self.pushed += 1;
    }

    /// Puts back a record read from durable state.
    pub(super) fn restore(&mut self, holder: Holder) {
        self.records.push_back(holder);
        self.pushed += 1;
    }

    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    /// Records ever pushed.
    pub(super) fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Record number `n` (counted as [`History::pushed`] counts), if it is
    /// still kept.
    pub(super) fn get_pushed(&self, n: u64) -> Option<&Holder> {
        let first = self.pushed - self.records.len() as u64;
        self.records
            .get(usize::try_from(n.checked_sub(first)?).ok()?)
    }

    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = &Holder> {
        self.records.iter()
    }
}
