//! Overload shedding. Each receive cycle reads up to [`STAGE`] datagrams
//! (the kernel drops what does not fit its socket buffer, at random), but
//! answers at most [`BUDGET`]. When more than that is waiting, what is
//! answered is chosen by [`Priority`]: renewals of existing mappings first,
//! then everything else that is valid (creates, deletes, ANNOUNCE), and
//! garbage (unparsable, refused options, not a subscriber) last; the rest
//! is dropped and counted (`pcpd_drops_total{reason="overload_<class>"}`).
//! RFC 6887 §8.2 lets a server drop under overload; clients retransmit
//! (§8.1.1). Reading four times what is answered costs far less than
//! answering (no journal, no allocation), so up to four times the shard's
//! capacity the choice is pcpd's, not the kernel's.

use pcp_engine::Priority;

use super::replies::{Peer, REPLY_SLOTS};
use super::{Sockets, State, MAX_DATAGRAM};

/// Datagrams read per cycle at most.
pub(super) const STAGE: usize = 8 * REPLY_SLOTS;
/// Datagrams answered per cycle at most (two group commits).
pub(super) const BUDGET: usize = 2 * REPLY_SLOTS;

struct Staged {
    peer: Peer,
    len: u16,
    priority: Priority,
}

/// The datagrams of one cycle, owned by this shard.
pub(super) struct Stage {
    /// `STAGE` buffers, on the heap (too large for a stack).
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    staged: Vec<Staged>,
    order: Vec<usize>,
}

impl Stage {
    pub(super) fn new() -> Self {
        Stage {
            bufs: vec![[0u8; MAX_DATAGRAM]; STAGE],
            staged: Vec::with_capacity(STAGE),
            order: Vec::with_capacity(STAGE),
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.staged.len() == STAGE
    }

    pub(super) fn len(&self) -> usize {
        self.staged.len()
    }

    /// Keeps a datagram (at most [`MAX_DATAGRAM`] octets) for this cycle.
    pub(super) fn push(&mut self, peer: Peer, datagram: &[u8]) {
        let i = self.staged.len();
        let len = datagram.len().min(MAX_DATAGRAM);
        self.bufs[i][..len].copy_from_slice(&datagram[..len]);
        self.staged.push(Staged {
            peer,
            len: len as u16,
            priority: Priority::Create,
        });
    }

    /// Answers what the budget allows, highest priority first when there
    /// is more than that, and drops the rest; then settles and sends.
    pub(super) fn answer(&mut self, st: &mut State, sockets: &Sockets) {
        self.order.clear();
        self.order.extend(0..self.staged.len());
        if self.staged.len() > BUDGET {
            for (i, s) in self.staged.iter_mut().enumerate() {
                s.priority = st
                    .engine
                    .priority(s.peer.src, &self.bufs[i][..usize::from(s.len)]);
            }
            // Stable: arrival order within a class.
            let staged = &self.staged;
            self.order.sort_by_key(|&i| staged[i].priority);
            for &i in &self.order[BUDGET..] {
                let reason = match staged[i].priority {
                    Priority::Renewal => "overload_renewal",
                    Priority::Create => "overload_create",
                    Priority::Garbage => "overload_garbage",
                };
                st.metrics.drop_io(reason);
            }
            self.order.truncate(BUDGET);
        }
        for &i in &self.order {
            let s = &self.staged[i];
            super::recv::handle_one(st, sockets, s.peer, &self.bufs[i][..usize::from(s.len)]);
        }
        super::recv::flush(st, sockets);
        self.staged.clear();
    }
}
