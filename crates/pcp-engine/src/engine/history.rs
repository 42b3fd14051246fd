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
    }

    /// Puts back a record read from durable state.
    pub(super) fn restore(&mut self, holder: Holder) {
        self.records.push_back(holder);
    }

    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = &Holder> {
        self.records.iter()
    }
}
