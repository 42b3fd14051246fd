//! The state a start begins from: the local journal and snapshots
//! (RFC 6887 §8.5: the epoch continues when state was recovered; otherwise
//! a new epoch starts and clients are told), or none in cluster mode; and
//! `--discard-state`, which a failed start takes back.

use std::path::PathBuf;

use crate::config::Config;
use crate::{clock, shard};

/// State recovered from the state directory (RFC 6887 §8.5: the epoch
/// continues when state was recovered; otherwise a new epoch starts and
/// clients are told).
pub(crate) struct Recovered {
    pub(crate) restores: Vec<shard::Restore>,
    pub(crate) epoch_start: u64,
    pub(crate) recovered: bool,
    pub(crate) records: u64,
    pub(crate) started: std::time::Instant,
    pub(crate) now: u64,
    /// Where `--discard-state` moved the state, until the start succeeds.
    pub(crate) discarded: Option<PathBuf>,
}

impl Recovered {
    /// Cluster mode: each partition's state comes from etcd once owned, and
    /// the epoch is the cluster's (set by the node task).
    pub(crate) fn in_etcd() -> Recovered {
        let now = clock::now_ms();
        Recovered {
            restores: Vec::new(),
            epoch_start: now,
            recovered: true,
            records: 0,
            started: std::time::Instant::now(),
            now,
            discarded: None,
        }
    }

    /// Puts state moved aside by `--discard-state` back, after a start
    /// that failed before answering anyone.
    pub(crate) fn undo_discard(&self, state_dir: &std::path::Path) {
        let Some(aside) = &self.discarded else { return };
        match pcp_store::undiscard(state_dir, aside) {
            Ok(()) => tracing::warn!(
                "the start failed: the discarded state is back in {}",
                state_dir.display()
            ),
            Err(e) => tracing::error!(
                "the start failed and the discarded state could not be put back \
                 from {}: {e}",
                aside.display()
            ),
        }
    }
}

pub(crate) fn load_state(cfg: &Config, discard_state: bool) -> anyhow::Result<Recovered> {
    let now = clock::now_ms();
    let discarded = if discard_state {
        pcp_store::discard(&cfg.state_dir, now)?
    } else {
        None
    };
    if let Some(aside) = &discarded {
        tracing::warn!(
            "state moved aside to {}; starting a new epoch",
            aside.display()
        );
    }
    let started = std::time::Instant::now();
    let state = pcp_store::load(&cfg.state_dir)?;
    for w in &state.warnings {
        tracing::warn!("{w}");
    }
    let recovered = state.epoch_start.is_some();
    let epoch_start = match state.epoch_start {
        Some(start) => start,
        None => {
            pcp_store::write_epoch(&cfg.state_dir, now)?;
            now
        }
    };
    let records = state.records;
    Ok(Recovered {
        restores: shard::Restore::split(state, cfg.shard_count()),
        epoch_start,
        recovered,
        records,
        started,
        now,
        discarded,
    })
}
