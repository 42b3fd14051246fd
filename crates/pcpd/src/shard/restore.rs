//! A shard's start: recovered records into the engine, a fresh snapshot,
//! and the dataplane reconciled with the result (add missing, remove
//! strays), all before the shard answers anything.

use std::net::IpAddr;
use std::ops::AddAssign;
use std::path::Path;

use pcp_dataplane::{Change, Dataplane};
use pcp_engine::{shard_of, Block, Engine, Event, Holder, Mapping, Millis, StateItem};
use pcp_store::{Journal, Record, StoreError};

use super::now_ms;

/// Recovered state for one shard.
#[derive(Default)]
pub struct Restore {
    /// Blocks (subscriber, block, since).
    pub blocks: Vec<(IpAddr, Block, Millis)>,
    /// Mappings.
    pub mappings: Vec<Mapping>,
    /// Allocation history.
    pub history: Vec<Holder>,
}

impl Restore {
    /// Splits what was loaded among `n` shards by the subscriber that owns
    /// each record now (the shard count may have changed).
    pub fn split(state: pcp_store::Loaded, n: usize) -> Vec<Restore> {
        let mut out: Vec<Restore> = (0..n).map(|_| Restore::default()).collect();
        for (_, (subscriber, block, since)) in state.blocks {
            out[shard_of(subscriber, n)]
                .blocks
                .push((subscriber, block, since));
        }
        for (_, m) in state.mappings {
            out[shard_of(m.internal_addr, n)].mappings.push(m);
        }
        for h in state.history {
            out[shard_of(h.internal_addr, n)].history.push(h);
        }
        out
    }
}

/// What a shard restored.
#[derive(Debug, Default, Clone, Copy)]
pub struct RestoreReport {
    /// Mappings restored.
    pub mappings: usize,
    /// Mappings dropped (expired, or refused by the current configuration).
    pub dropped: usize,
    /// Blocks restored.
    pub blocks: usize,
    /// Blocks refused by the current configuration.
    pub blocks_dropped: usize,
    /// Dataplane entries installed by reconcile.
    pub installed: usize,
    /// Stray dataplane entries removed by reconcile.
    pub removed: usize,
    /// Reconcile changes the dataplane refused.
    pub failed: usize,
}

impl AddAssign for RestoreReport {
    fn add_assign(&mut self, r: RestoreReport) {
        self.mappings += r.mappings;
        self.dropped += r.dropped;
        self.blocks += r.blocks;
        self.blocks_dropped += r.blocks_dropped;
        self.installed += r.installed;
        self.removed += r.removed;
        self.failed += r.failed;
    }
}

/// One record of the engine's state, as a snapshot holds it.
pub(super) fn record_of(item: StateItem<'_>) -> Record {
    match item {
        StateItem::Block(subscriber, block, since) => Record::Block {
            subscriber,
            block,
            since,
        },
        StateItem::Mapping(m) => Record::Mapping(m.into_stored()),
        StateItem::History(h) => Record::History(h.clone()),
    }
}

/// The engine's whole state as records, taken at once (at start, and
/// for a snapshot the shard waits for), moved by `offset` ms into wall
/// time (see clock.rs).
pub(super) fn state_records(engine: &Engine, offset: i64) -> Vec<Record> {
    // Sized once: a million records.
    let mut v: Vec<Record> = Vec::with_capacity(
        engine.mapping_count() + engine.subscriber_count() + engine.history().count(),
    );
    let mut cursor = engine.state_cursor();
    while engine.state_slice(&mut cursor, usize::MAX, |item| v.push(record_of(item))) {}
    if offset != 0 {
        v.iter_mut().for_each(|r| r.shift(offset));
    }
    v
}

/// Restores a shard's state into its engine, writes a fresh snapshot, and
/// reconciles the dataplane with the result.
pub(super) fn restore(
    engine: &mut Engine,
    dataplane: &mut dyn Dataplane,
    recovered: Restore,
    state_dir: &Path,
    index: usize,
    generation: u64,
) -> Result<(Journal, RestoreReport), StoreError> {
    let now = now_ms();
    let mut report = RestoreReport::default();
    for (subscriber, block, since) in recovered.blocks {
        if engine.restore_block(now, subscriber, block, since) {
            report.blocks += 1;
        } else {
            report.blocks_dropped += 1;
        }
    }
    for m in recovered.mappings {
        if engine.restore_mapping(now, m) {
            report.mappings += 1;
        } else {
            report.dropped += 1;
        }
    }
    for h in recovered.history {
        engine.restore_history(h);
    }
    while engine.poll_event().is_some() {}
    let records = state_records(engine, crate::clock::wall_offset_ms());
    let journal = pcp_store::write_snapshot(state_dir, index, generation, records)?;
    // Reconcile: what the engine holds is what must be installed.
    let mut desired: Vec<Change> = Vec::new();
    for (subscriber, block, _) in engine.blocks() {
        desired.push(Change::AddBlock { subscriber, block });
    }
    for m in engine.mappings() {
        Change::from_event(&Event::MappingCreated(m.clone()), &mut desired);
    }
    let done = dataplane.reconcile(desired);
    report.installed = done.installed;
    report.removed = done.removed;
    report.failed = done.failed;
    if done.failed > 0 {
        // The mappings stay in the engine; a renewal retries them.
        tracing::error!(
            shard = index,
            "dataplane {}: reconcile: {} of {} changes failed",
            dataplane.name(),
            done.failed,
            done.installed + done.removed
        );
    }
    Ok((journal, report))
}
