//! Cluster mode: a partition's state arriving (read from etcd by the node
//! task after a claim) or leaving (handed over, or lost to another node).
//! Neither is an engine event: nothing is written back to etcd, and the
//! NAT event log is not told (no mapping began or ended).

use pcp_dataplane::Change;
use pcp_engine::{DeleteReason, Event};
use pcp_store::Record;

use super::restore::Restore;
use super::{now_ms, RestoreReport, State};

/// Installs a partition's blocks and mappings, engine then dataplane.
pub(super) fn adopt(st: &mut State, restore: Restore) -> RestoreReport {
    let now = now_ms();
    let mut report = RestoreReport::default();
    let mut changes = Vec::new();
    for (subscriber, block, since) in restore.blocks {
        if st.engine.restore_block(now, subscriber, block, since) {
            report.blocks += 1;
            changes.push(Change::AddBlock { subscriber, block });
        } else {
            report.blocks_dropped += 1;
        }
    }
    let offset = crate::clock::wall_offset_ms();
    for m in restore.mappings {
        if let Some(store) = st.effects.etcd() {
            // What etcd holds, in the wall time records are written in.
            if let Record::Mapping(wall) = shifted(Record::Mapping(m.clone()), offset) {
                store.remember(&wall);
            }
        }
        if st.engine.restore_mapping(now, m.clone()) {
            report.mappings += 1;
            Change::from_event(&Event::MappingCreated(m), &mut changes);
        } else {
            report.dropped += 1;
        }
    }
    while st.engine.poll_event().is_some() {}
    let total = changes.len();
    report.failed = st.effects.install_direct(changes);
    report.installed = total - report.failed;
    report
}

fn shifted(mut r: Record, offset: i64) -> Record {
    r.shift(offset);
    r
}

/// Drops partition `p`'s state; with `uninstall`, its kernel entries too.
pub(super) fn forget(st: &mut State, p: usize, uninstall: bool) -> usize {
    let Some(own) = st.ownership.clone() else {
        return 0;
    };
    let gone = st
        .engine
        .forget_subscribers(|a| own.partition_of(a) == Some(p));
    while st.engine.poll_event().is_some() {}
    if let Some(store) = st.effects.etcd() {
        store.forget(p);
    }
    if uninstall {
        let mut changes = Vec::new();
        for m in &gone.mappings {
            let event = Event::MappingDeleted {
                mapping: m.clone(),
                reason: DeleteReason::Operator,
            };
            Change::from_event(&event, &mut changes);
        }
        for &(subscriber, block) in &gone.blocks {
            changes.push(Change::RemoveBlock { subscriber, block });
        }
        st.effects.install_direct(changes);
    }
    gone.mappings.len()
}

/// Mappings held per partition.
pub(super) fn counts(st: &State) -> Vec<usize> {
    let Some(own) = &st.ownership else {
        return Vec::new();
    };
    let mut n = vec![0; own.count()];
    for m in st.engine.mappings() {
        if let Some(p) = own.partition_of(m.internal_addr) {
            n[p] += 1;
        }
    }
    n
}
