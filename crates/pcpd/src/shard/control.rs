//! Operator requests a shard answers (from the admin API and signals).
//! Writes follow the same rule as PCP: the answer is sent after the change
//! is settled (journal, dataplane), and a refusal comes from
//! [`Settled::refusal`](super::effects::Settled::refusal).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use pcp_engine::{
    Compiled, Holder, InternalEndpoint, Mapping, MappingKey, Millis, SubscriberUsage,
};
use pcp_wire::ResultCode;
use tokio::sync::oneshot;

use super::effects::Origin;
use super::{now_ms, State};

/// Why an operator write was not done (or not kept).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// The state directory cannot be written: nothing new can be made
    /// durable (HTTP 503).
    #[error("the state cannot be made durable: {0}")]
    NotDurable(String),
    /// The dataplane did not install the mapping; it was taken back (HTTP 503).
    #[error("the dataplane did not install the mapping")]
    NotInstalled,
    /// The engine refused it, with the PCP result code it would answer.
    #[error("refused: {0}")]
    Engine(ResultCode),
    /// Cluster mode: the subscriber's partition is not answered by this
    /// node now (HTTP 409; ask its owner, `GET /v1/cluster`).
    #[error("the subscriber's partition is not owned by this node, or its lease is uncertain")]
    NotOwner,
}

/// Operator requests a shard answers.
pub enum Control {
    /// Mappings matching a filter.
    Mappings(MappingFilter, oneshot::Sender<Vec<Mapping>>),
    /// One mapping.
    Mapping(MappingKey, oneshot::Sender<Option<Mapping>>),
    /// A subscriber's usage.
    Subscriber(IpAddr, oneshot::Sender<Option<SubscriberUsage>>),
    /// Create a static mapping for an internal endpoint, with a suggested
    /// external port (0: any).
    CreateStatic(
        InternalEndpoint,
        u16,
        oneshot::Sender<Result<Mapping, Refused>>,
    ),
    /// Delete a mapping; `Ok(None)`: there was none.
    Delete(
        MappingKey,
        oneshot::Sender<Result<Option<Mapping>, Refused>>,
    ),
    /// Move mappings off a drained address; answers how many moved.
    Drain(Ipv4Addr, oneshot::Sender<Result<usize, Refused>>),
    /// Who held an external port at a time.
    Lookup(Ipv4Addr, u16, Millis, oneshot::Sender<Option<Holder>>),
    /// New configuration.
    Reload(Arc<Compiled>, oneshot::Sender<()>),
    /// The wall clock was stepped: rewrite the state as a snapshot, so every
    /// record on disk is in the new wall time.
    ClockStep,
    /// Stop: settle and answer what is held, then end the shard's thread.
    Shutdown(oneshot::Sender<()>),
    /// Cluster mode: install a partition's state read from etcd.
    #[cfg(feature = "cluster")]
    Adopt(super::Restore, oneshot::Sender<super::RestoreReport>),
    /// Cluster mode: drop partition `.0`'s state (handed over or lost);
    /// with `.1`, remove its kernel entries too. Answers the mappings dropped.
    #[cfg(feature = "cluster")]
    Forget(usize, bool, oneshot::Sender<usize>),
    /// Cluster mode: the cluster's epoch base (RFC 6887 §8.5).
    #[cfg(feature = "cluster")]
    Epoch(Millis),
    /// Cluster mode: mappings held, per partition.
    #[cfg(feature = "cluster")]
    Counts(oneshot::Sender<Vec<usize>>),
    /// Answered once every batch before it has settled and been answered
    /// (a planned handover waits for it).
    #[cfg(feature = "cluster")]
    Barrier(oneshot::Sender<()>),
}

/// Filter for listing mappings.
#[derive(Debug, Clone, Default)]
pub struct MappingFilter {
    /// Only this subscriber.
    pub subscriber: Option<IpAddr>,
    /// Only this external address.
    pub external: Option<Ipv4Addr>,
    /// Only this protocol.
    pub protocol: Option<u8>,
}

/// Answers one control message. Returns false on `Shutdown`.
pub(super) fn control(st: &mut State, ctl: Control) -> bool {
    // A dropped receiver only means the API client went away.
    match ctl {
        Control::Mappings(f, reply) => {
            let list = st
                .engine
                .mappings()
                .filter(|m| f.subscriber.is_none_or(|s| m.internal_addr == s))
                .filter(|m| f.external.is_none_or(|e| m.external_addr == e))
                .filter(|m| f.protocol.is_none_or(|p| m.protocol == p))
                .collect();
            let _ = reply.send(list);
        }
        Control::Mapping(key, reply) => {
            let _ = reply.send(st.engine.mapping_by_key(&key));
        }
        Control::Subscriber(ip, reply) => {
            let _ = reply.send(st.engine.subscriber(ip));
        }
        Control::CreateStatic(internal, external_port, reply) => {
            if !admitted(st, internal.addr) {
                let _ = reply.send(Err(Refused::NotOwner));
                return true;
            }
            let r = write(st, |engine, now| {
                engine
                    .create_static(now, internal, external_port)
                    .map_err(Refused::Engine)
            });
            let _ = reply.send(r);
        }
        Control::Delete(key, reply) => {
            let _ = reply.send(delete(st, &key));
        }
        Control::Drain(addr, reply) => {
            let _ = reply.send(write(st, |engine, now| Ok(engine.drain(now, addr))));
        }
        Control::Lookup(addr, port, at, reply) => {
            let _ = reply.send(st.engine.lookup(addr, port, at));
        }
        Control::Reload(compiled, reply) => {
            st.engine.reconfigure(compiled);
            let _ = reply.send(());
        }
        Control::ClockStep => {
            st.effects.snapshot_now(&mut st.engine);
        }
        Control::Shutdown(reply) => {
            let _ = reply.send(());
            return false;
        }
        // Control runs between batches (see shard::run), so nothing is in
        // flight when it is answered.
        #[cfg(feature = "cluster")]
        Control::Barrier(reply) => {
            let _ = reply.send(());
        }
        #[cfg(feature = "cluster")]
        Control::Adopt(restore, reply) => {
            let _ = reply.send(super::partition::adopt(st, restore));
        }
        #[cfg(feature = "cluster")]
        Control::Forget(p, uninstall, reply) => {
            let _ = reply.send(super::partition::forget(st, p, uninstall));
        }
        #[cfg(feature = "cluster")]
        Control::Epoch(start) => st.engine.set_epoch_start(start),
        #[cfg(feature = "cluster")]
        Control::Counts(reply) => {
            let _ = reply.send(super::partition::counts(st));
        }
    }
    true
}

/// An operator's delete of the mapping `key` names (`Ok(None)`: none).
fn delete(st: &mut State, key: &MappingKey) -> Result<Option<Mapping>, Refused> {
    if !admitted(st, key.internal.addr) {
        return Err(Refused::NotOwner);
    }
    let Some(id) = st.engine.mapping_by_key(key).map(|m| m.id) else {
        return Ok(None);
    };
    write(st, |engine, now| Ok(engine.delete(now, id)))
}

/// Whether this node answers for `subscriber` now (always, on a single node).
fn admitted(st: &State, subscriber: IpAddr) -> bool {
    st.ownership
        .as_ref()
        .is_none_or(|o| o.admit(subscriber, now_ms()) == crate::cluster::Admit::Yes)
}

/// An operator write: refused up front while the state cannot be made
/// durable, else done, settled, and answered by the outcome.
fn write<T>(
    st: &mut State,
    op: impl FnOnce(&mut pcp_engine::Engine, Millis) -> Result<T, Refused>,
) -> Result<T, Refused> {
    if !st.effects.durable(&mut st.engine) {
        return Err(not_durable(st));
    }
    let r = op(&mut st.engine, now_ms());
    st.effects.collect(&mut st.engine, Origin::Operator);
    let settled = st.effects.settle(&mut st.engine);
    match settled.refusal(Origin::Operator) {
        Some(ResultCode::NetworkFailure) => Err(Refused::NotInstalled),
        Some(_) => Err(not_durable(st)),
        None => r,
    }
}

fn not_durable(st: &State) -> Refused {
    Refused::NotDurable(
        st.health
            .problem()
            .unwrap_or_else(|| "the journal could not be written".into()),
    )
}

#[cfg(test)]
pub(in crate::shard) mod tests {
    //! The operator paths against a journal that fails (pcp-store's fault
    //! seam): an API delete or drain is answered only after its commit, a
    //! failed commit is refused (HTTP 503) and undone where it can be, and
    //! the unsolicited updates of a drain wait until the state is durable.
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::Arc;
    use std::time::Duration;

    use pcp_dataplane::MemoryDataplane;
    use pcp_engine::{BlockAllocator, Compiled, Engine, MappingKey};
    use pcp_store::Faults;
    use pcp_wire::ResultCode;
    use tokio::sync::oneshot;

    use super::super::effects::{Effects, Origin};
    use super::super::replies::ReplyArena;
    use super::super::{now_ms, Health, State};
    use super::{control, Control, Refused};

    pub(in crate::shard) fn state(
        dir: &std::path::Path,
        faults: Arc<Faults>,
    ) -> (State, Arc<BlockAllocator>) {
        state_with(dir, faults, Box::new(MemoryDataplane::new()))
    }

    /// [`state`] with the dataplane `dataplane`.
    pub(in crate::shard) fn state_with(
        dir: &std::path::Path,
        faults: Arc<Faults>,
        dataplane: Box<dyn pcp_dataplane::Dataplane>,
    ) -> (State, Arc<BlockAllocator>) {
        let cfg = crate::config::Config::builtin();
        let pools = Arc::new(BlockAllocator::new(&cfg.pcp));
        let compiled = Arc::new(Compiled::new(cfg.pcp, &pools).unwrap());
        let engine = Engine::new(compiled, pools.clone(), 0, now_ms(), 1);
        let journal = pcp_store::write_snapshot_with(dir, 0, 1, Vec::new(), Some(faults)).unwrap();
        let writer = super::super::writer::JournalWriter::start(0, journal).unwrap();
        let metrics = crate::metrics::Metrics::new().unwrap();
        let health = Arc::new(Health::new(1));
        let sinks = (
            crate::natlog::NatLog::stdout().unwrap(),
            metrics.clone(),
            health.clone(),
        );
        let st = State {
            engine,
            effects: Effects::new(
                0,
                super::super::effects::Store::Journal(writer),
                1 << 30,
                dataplane,
                sinks,
            )
            .unwrap(),
            ownership: None,
            replies: ReplyArena::new(),
            parked: Default::default(),
            sender: super::super::send::Sender::new(),
            metrics,
            health,
        };
        (st, pools)
    }

    /// A MAP for internal port `port` of `protocol` from 127.0.0.1 (its
    /// client listens on port 40000), nonce bytes `nonce`, answered by the
    /// engine alone; returns the answer's result code.
    pub(in crate::shard) fn map(st: &mut State, port: u16, protocol: u8, nonce: u8) -> ResultCode {
        map_from(st, Ipv4Addr::LOCALHOST, (port, protocol), nonce, 3600)
    }

    /// A MAP from subscriber `from` for internal (port, protocol), with
    /// `lifetime` (0: delete), answered by the engine alone.
    pub(in crate::shard) fn map_from(
        st: &mut State,
        from: Ipv4Addr,
        (port, protocol): (u16, u8),
        nonce: u8,
        lifetime: u32,
    ) -> ResultCode {
        let req = pcp_wire::Request {
            lifetime,
            client_addr: IpAddr::V4(from),
            data: pcp_wire::OpData::Map(pcp_wire::MapData {
                nonce: pcp_wire::Nonce([nonce; 12]),
                protocol,
                internal_port: port,
                external_port: 0,
                external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            }),
            options: pcp_wire::Options::NONE,
        };
        let mut buf = [0u8; 1100];
        let n = req.emit(&mut buf).unwrap();
        let src = SocketAddr::from((from, 40000));
        let mut reply = [0u8; 1100];
        let len = st
            .engine
            .handle(now_ms(), src, &buf[..n], &mut reply)
            .unwrap();
        pcp_wire::Response::parse(&reply[..len]).unwrap().result
    }

    /// A committed MAP from 127.0.0.1 (its client listens on port 40000).
    fn mapping(st: &mut State, port: u16) -> MappingKey {
        map(st, port, 6, 7);
        st.effects.collect(&mut st.engine, Origin::Timer);
        assert!(st.effects.settle(&mut st.engine).durable);
        st.engine
            .mappings()
            .find(|m| m.internal_port == port)
            .unwrap()
            .key()
    }

    fn ask<T>(st: &mut State, make: impl FnOnce(oneshot::Sender<T>) -> Control) -> T {
        let (tx, mut rx) = oneshot::channel();
        assert!(control(st, make(tx)));
        rx.try_recv().expect("answered before control() returns")
    }

    pub(in crate::shard) fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pcpd-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_delete_whose_commit_fails_is_refused_and_undone() {
        let faults = Arc::new(Faults::default());
        let (mut st, _) = state(&dir("delete"), faults.clone());
        let id = mapping(&mut st, 80);
        faults.fail_writes(3);
        let r = ask(&mut st, |tx| Control::Delete(id, tx));
        assert!(matches!(r, Err(Refused::NotDurable(_))), "{r:?}");
        assert!(
            st.engine.mappings().any(|m| m.internal_port == 80),
            "a refused delete keeps the mapping"
        );
        // Refused up front while the state cannot be written.
        let r = ask(&mut st, |tx| {
            Control::Drain(Ipv4Addr::new(192, 0, 2, 0), tx)
        });
        assert!(matches!(r, Err(Refused::NotDurable(_))), "{r:?}");
    }

    #[test]
    fn drain_updates_wait_until_the_state_is_durable() {
        let faults = Arc::new(Faults::default());
        let (mut st, pools) = state(&dir("drain"), faults.clone());
        let id = mapping(&mut st, 80);
        let ext = st.engine.mapping_by_key(&id).unwrap().external_addr;
        assert!(pools.set_draining(ext, true));
        // The drain's own commit fails (and the snapshot that would repair it).
        faults.fail_writes(2);
        let r = ask(&mut st, |tx| Control::Drain(ext, tx));
        assert!(matches!(r, Err(Refused::NotDurable(_))), "{r:?}");
        // The timer path: the update is due, but the state it reports is not
        // durable, so it must not go out.
        st.engine.handle_timeout(now_ms());
        st.effects.collect(&mut st.engine, Origin::Timer);
        assert!(!st.effects.settle(&mut st.engine).durable);
        assert!(st.effects.poisoned());
        let mut held = 0;
        while st.engine.poll_transmit().is_some() {
            held += 1; // timers.rs drops these: not durable
        }
        assert!(held >= 1, "the engine had an update to send");
        // Once a snapshot can be written, the state is durable again and
        // updates may go out.
        std::thread::sleep(Duration::from_millis(1100));
        st.engine.handle_timeout(now_ms());
        st.effects.collect(&mut st.engine, Origin::Timer);
        assert!(st.effects.settle(&mut st.engine).durable);
        assert!(
            st.engine.poll_transmit().is_some(),
            "the §14.2 retransmission goes out now"
        );
    }
}
