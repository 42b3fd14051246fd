//! Whether each shard can make its state durable, for readiness
//! (`/readyz`), the `pcpd_state_writable` gauge and the operator's log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// One shard's health.
#[derive(Debug, Default)]
struct ShardHealth {
    broken: AtomicBool,
    reason: Mutex<String>,
}

/// Every shard's health, shared with the admin API.
#[derive(Debug, Default)]
pub struct Health {
    shards: Vec<ShardHealth>,
}

impl Health {
    /// All healthy, for `n` shards.
    pub fn new(n: usize) -> Self {
        Health {
            shards: (0..n).map(|_| ShardHealth::default()).collect(),
        }
    }

    /// Shard `i` cannot write its state, because of `reason`.
    pub fn set_broken(&self, i: usize, reason: String) {
        if let Some(s) = self.shards.get(i) {
            *s.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
            s.broken.store(true, Ordering::Release);
        }
    }

    /// Shard `i` writes its state again.
    pub fn set_ok(&self, i: usize) {
        if let Some(s) = self.shards.get(i) {
            s.broken.store(false, Ordering::Release);
        }
    }

    /// The first problem, as "shard N: reason", if any shard has one.
    pub fn problem(&self) -> Option<String> {
        self.shards.iter().enumerate().find_map(|(i, s)| {
            s.broken.load(Ordering::Acquire).then(|| {
                let reason = s.reason.lock().unwrap_or_else(|p| p.into_inner());
                format!("shard {i}: {reason}")
            })
        })
    }
}
