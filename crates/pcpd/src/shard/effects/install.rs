//! Installing a settled batch: its dataplane changes (through the
//! shard's applier, `applier.rs`), which upserts the dataplane refused
//! (taken back, NETWORK_FAILURE), and its NAT log lines.

use pcp_dataplane::Change;
use pcp_engine::{Engine, Event, MappingId};

use super::super::applier::Applied;
use super::super::now_ms;
use super::{Effects, Origin, Settled};

impl Effects {
    /// Applies dataplane changes that no engine event stands for (a
    /// partition installed or handed over); returns how many failed.
    #[cfg(feature = "cluster")]
    pub(in crate::shard) fn install_direct(&mut self, changes: Vec<Change>) -> usize {
        if changes.is_empty() {
            return 0;
        }
        // Cluster mode never pipelines: nothing is with the applier.
        let failed = self
            .applier
            .apply_now(changes)
            .results
            .into_iter()
            .filter(|r| r.is_err())
            .count();
        if failed > 0 {
            tracing::error!(
                shard = self.index,
                failed,
                "dataplane: partition changes refused"
            );
        }
        failed
    }

    /// Installs a committed batch, then writes its NAT log lines; returns
    /// the mappings the dataplane refused.
    pub(super) fn install_and_log(
        &mut self,
        batch: &[(Origin, Event)],
    ) -> Vec<(Origin, MappingId)> {
        let refused = self.install(batch);
        self.log(batch);
        refused
    }

    /// Writes a settled batch's NAT log lines.
    pub(super) fn log(&mut self, batch: &[(Origin, Event)]) {
        let wall = crate::clock::wall_ms();
        for (_, event) in batch {
            self.natlog.record(wall, event);
        }
    }

    /// Takes back the mappings the dataplane refused (their requests are
    /// answered NETWORK_FAILURE); their events wait in `events`. Returns
    /// whether there were any.
    pub(super) fn revoke_refused(
        &mut self,
        engine: &mut Engine,
        refused: Vec<(Origin, MappingId)>,
        settled: &mut Settled,
    ) -> bool {
        if refused.is_empty() {
            return false;
        }
        let now = now_ms();
        for (origin, id) in refused {
            if let Some(m) = engine.revoke(now, id) {
                tracing::warn!(
                    shard = self.index,
                    internal = %m.internal_addr,
                    port = m.internal_port,
                    "mapping taken back: the dataplane did not install it"
                );
            }
            settled.not_installed.insert(origin);
        }
        self.collect(engine, Origin::Timer);
        true
    }

    /// Applies the round's dataplane changes and waits for them; returns
    /// the refused upserts.
    fn install(&mut self, batch: &[(Origin, Event)]) -> Vec<(Origin, MappingId)> {
        let (changes, origins) = self.plan(batch);
        if changes.is_empty() {
            return Vec::new();
        }
        let applied = self.applier.apply_now(changes);
        self.refused_of(applied, &origins)
    }

    /// A batch's dataplane changes and, for each, the mapping an `Upsert`
    /// makes real and who waits for it.
    pub(super) fn plan(
        &mut self,
        batch: &[(Origin, Event)],
    ) -> (Vec<Change>, Vec<Option<(Origin, MappingId)>>) {
        let mut changes = self.applier.buffer();
        let mut origins = Vec::new();
        for (origin, event) in batch {
            let before = changes.len();
            Change::from_event(event, &mut changes);
            let made = match event {
                Event::MappingCreated(m)
                | Event::MappingRenewed(m)
                | Event::MappingRefreshed(m) => Some(m.id),
                Event::MappingMoved { new, .. } => Some(new.id),
                _ => None,
            };
            for c in &changes[before..] {
                let upsert = matches!(c, Change::Upsert(_));
                origins.push(made.filter(|_| upsert).map(|id| (*origin, id)));
            }
        }
        (changes, origins)
    }

    /// The mappings whose upserts the dataplane refused; counts and logs.
    pub(super) fn refused_of(
        &self,
        applied: Applied,
        origins: &[Option<(Origin, MappingId)>],
    ) -> Vec<(Origin, MappingId)> {
        self.metrics
            .dataplane_latency
            .observe(applied.latency.as_secs_f64());
        let mut refused = Vec::new();
        for (r, origin) in applied.results.into_iter().zip(origins) {
            let label = if r.is_ok() { "ok" } else { "error" };
            self.metrics
                .dataplane_changes
                .with_label_values(&[label])
                .inc();
            if let Err(e) = r {
                tracing::error!(shard = self.index, "dataplane: {e}");
                refused.extend(*origin);
            }
        }
        refused
    }
}
