//! The shard's timer wheel: one bucket per second of wall time, each a
//! list of timers; stale timers (a renewed or deleted mapping) are checked
//! and skipped when they fire, so re-arming never searches.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::Engine;
use crate::types::{DeleteReason, ExternalEndpoint, Millis};

/// What a timer other than a mapping's expiry does when it fires.
#[derive(Debug, Clone, Copy)]
pub(super) enum Timer {
    /// An external port's reuse delay may have ended (§15).
    Cool { port: ExternalEndpoint },
    /// A subscriber may have been idle long enough to give back its blocks.
    Idle { subscriber: IpAddr },
}

/// A timer's second as a slot notes it: Unix seconds fit 32 bits until
/// 2106; later ones (a lifetime of a century) all note the last, which
/// still tells the armed timer from a stale one, as both sides saturate.
fn armed_second(second: u64) -> u32 {
    u32::try_from(second).unwrap_or(u32::MAX)
}

/// Timers by the second they are due.
#[derive(Default)]
pub(super) struct TimerWheel {
    buckets: BTreeMap<u64, Bucket>,
}

/// The timers of one second. Mapping expiries, one per mapping, are most
/// of them and are kept apart at 8 bytes each, as (slot, generation) (a
/// [`Timer`] takes 20, for the subscriber address of [`Timer::Idle`]).
#[derive(Default)]
pub(super) struct Bucket {
    expiries: Vec<(u32, u32)>,
    others: Vec<Timer>,
}

impl TimerWheel {
    fn bucket(&mut self, at: Millis) -> &mut Bucket {
        // Rounded up to the next second.
        self.buckets.entry(at.div_ceil(1000)).or_default()
    }

    /// Arms `timer` for `at`.
    pub(super) fn schedule(&mut self, at: Millis, timer: Timer) {
        self.bucket(at).others.push(timer);
    }

    /// Arms the expiry of the mapping in `slot` (of `generation`) for `at`.
    fn schedule_expiry(&mut self, at: Millis, slot: u32, generation: u32) {
        self.bucket(at).expiries.push((slot, generation));
    }

    /// When the earliest bucket is due.
    pub(super) fn next_deadline(&self) -> Option<Millis> {
        self.buckets.keys().next().map(|s| s * 1000)
    }

    /// Takes up to `budget` timers of the earliest bucket if it is due at
    /// `now`, with its second: the whole bucket when it holds no more, else
    /// a part, the rest staying due.
    pub(super) fn pop_due(&mut self, now: Millis, budget: usize) -> Option<(u64, Bucket)> {
        let mut entry = self.buckets.first_entry()?;
        if entry.key() * 1000 > now {
            return None;
        }
        let second = *entry.key();
        let b = entry.get_mut();
        if b.expiries.len() + b.others.len() <= budget {
            return Some(entry.remove_entry());
        }
        let n = budget.min(b.expiries.len());
        let expiries = b.expiries.split_off(b.expiries.len() - n);
        let m = (budget - n).min(b.others.len());
        let others = b.others.split_off(b.others.len() - m);
        Some((second, Bucket { expiries, others }))
    }
}

/// Timers run by one [`Engine::handle_timeout`] at most. A storm of them
/// (a million mappings made or renewed in the same few seconds, as clients
/// do after a restart's ANNOUNCE, all expiring or re-arming together) is
/// worked off a slice at a time, and the shard answers requests between
/// slices instead of stalling for the whole storm: a timer costs a µs or
/// two, so a slice is a few ms.
pub const TIMER_BUDGET: usize = 2048;

impl Engine {
    /// The next instant [`Engine::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        if !self.unsettled.is_empty() {
            return Some(0); // idle holds to start (see `start_idle_holds`)
        }
        match (self.timers.next_deadline(), self.outbox.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires mappings, ends reuse delays, releases idle blocks, and queues
    /// due unsolicited messages: at most [`TIMER_BUDGET`] timers a call;
    /// when more are due, [`Engine::poll_timeout`] says so (a deadline
    /// already past), and the caller comes back after other work.
    pub fn handle_timeout(&mut self, now: Millis) {
        self.start_idle_holds(now);
        let mut budget = TIMER_BUDGET;
        while budget > 0 {
            let Some((second, due)) = self.timers.pop_due(now, budget) else {
                break;
            };
            budget -= due.expiries.len() + due.others.len();
            for (slot, generation) in due.expiries {
                self.expire(now, second, slot, generation);
            }
            for timer in due.others {
                self.fire(now, timer);
            }
        }
        while let Some(pending) = self.outbox.pop_due(now) {
            self.send_pending(now, pending);
        }
    }

    /// Arms the expiry of the mapping in `slot` for `expires_ms`, unless
    /// its timer is armed for that second or earlier already (that one
    /// re-arms when it fires, see [`Engine::fire`]).
    pub(super) fn arm_expiry(&mut self, slot: u32, generation: u32, expires_ms: Millis) {
        let second = armed_second(expires_ms.div_ceil(1000));
        let armed = self.table.expiry_armed(slot, generation);
        if armed.is_some_and(|a| a == 0 || a > second) {
            self.timers.schedule_expiry(expires_ms, slot, generation);
            self.table.set_expiry_armed(slot, second);
        }
    }

    /// Runs the expiry timer of bucket `second` for the mapping in `slot`
    /// (§15).
    fn expire(&mut self, now: Millis, second: u64, slot: u32, generation: u32) {
        // Only the timer the slot is armed for counts: another one was
        // superseded by an earlier expiry.
        let armed = self.table.expiry_armed(slot, generation);
        if armed.is_none_or(|a| a != armed_second(second)) {
            return;
        }
        self.table.set_expiry_armed(slot, 0);
        if self.table.expired(slot, generation, now) {
            self.remove(now, slot, DeleteReason::Expired);
        } else if let Some(m) = self.table.get(slot) {
            // Renewed since: the expiry moved later.
            if m.counts_against_quota() {
                let expires = m.expires_ms;
                self.arm_expiry(slot, generation, expires);
            }
        }
    }

    /// Runs one of the other timers.
    fn fire(&mut self, now: Millis, timer: Timer) {
        match timer {
            Timer::Cool { port } => self.end_reuse_delay(now, port),
            Timer::Idle { subscriber } => self.release_if_idle(now, subscriber),
        }
    }
}
