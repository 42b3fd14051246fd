//! The shard's state read in slices, so that a snapshot of a large shard
//! is taken a few thousand records at a time between batches instead of
//! all at once (issue 15 item 2: compaction never stalls a shard).
//!
//! A snapshot taken this way is fuzzy: a record visited late may hold a
//! change made after the snapshot began. The daemon starts the next
//! journal where the snapshot begins, so every such change is also
//! journaled after it, and a replay (snapshot, then journal, later records
//! winning by key) ends in the same state. What a cursor must guarantee is
//! that every record present when it was made, and not removed since, is
//! visited at least once, whatever the batches between two slices do:
//!
//! * **mappings** by slot number, upward: a mapping never changes slot
//!   (`table.rs`), and a slot freed and reused behind the cursor holds a
//!   mapping made later, which is journaled;
//! * **blocks** by subscriber record, from the last position down: a
//!   removal moves the last record into the hole (`keyed.rs`), so a record
//!   moves either between visited positions or into one not yet visited
//!   (visited twice, which a replay by key does not mind);
//! * **history** by how many records were ever pushed: records that age
//!   out meanwhile are skipped, records pushed later are journaled. History
//!   is a list, not keyed, so none is visited twice.

use std::net::IpAddr;

use super::Engine;
use crate::alloc::Block;
use crate::types::{Holder, Mapping, Millis};

/// Where a snapshot taken in slices stands ([`Engine::state_slice`]).
#[derive(Debug, Clone)]
pub struct StateCursor {
    /// History records ever pushed up to which the history is visited,
    /// and where it ends (what was there when the cursor was made).
    history: (u64, u64),
    /// Subscriber positions below this are still to be visited.
    subscribers: usize,
    /// The next mapping slot to visit.
    slot: u32,
}

/// One record of the state, as a snapshot holds it.
#[derive(Debug)]
pub enum StateItem<'a> {
    /// A subscriber holds a block since a time.
    Block(IpAddr, Block, Millis),
    /// A live mapping.
    Mapping(Mapping),
    /// A past holding.
    History(&'a Holder),
}

impl Engine {
    /// A cursor over the whole state as it is now.
    pub fn state_cursor(&self) -> StateCursor {
        let (pushed, len) = (self.history.pushed(), self.history.len() as u64);
        StateCursor {
            history: (pushed - len, pushed),
            subscribers: self.subscribers.len(),
            slot: 0,
        }
    }

    /// Gives `visit` up to about `budget` more records (a subscriber's
    /// blocks are not split) and moves the cursor past them. Returns
    /// whether records remain.
    pub fn state_slice(
        &self,
        cursor: &mut StateCursor,
        budget: usize,
        mut visit: impl FnMut(StateItem<'_>),
    ) -> bool {
        let mut left = budget;
        // History first: its oldest records age out while we go.
        let (next, end) = &mut cursor.history;
        *next = (*next).max(self.history.pushed() - self.history.len() as u64);
        while *next < *end && left > 0 {
            match self.history.get_pushed(*next) {
                Some(h) => visit(StateItem::History(h)),
                None => break,
            }
            *next += 1;
            left -= 1;
        }
        cursor.subscribers = cursor.subscribers.min(self.subscribers.len());
        while cursor.subscribers > 0 && left > 0 {
            cursor.subscribers -= 1;
            if let Some(s) = self.subscribers.at(cursor.subscribers) {
                for (b, since) in &s.blocks {
                    visit(StateItem::Block(s.addr, *b, *since));
                }
                left = left.saturating_sub(s.blocks.len().max(1));
            }
        }
        let slots = self.table.slot_count();
        while cursor.slot < slots && left > 0 {
            if let Some(m) = self.table.get(cursor.slot) {
                visit(StateItem::Mapping(m));
            }
            cursor.slot += 1;
            left -= 1;
        }
        cursor.history.0 < cursor.history.1 || cursor.subscribers > 0 || cursor.slot < slots
    }
}
