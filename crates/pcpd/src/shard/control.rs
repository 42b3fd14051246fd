//! Operator requests a shard answers (from the admin API and signals).
//! Writes follow the same rule as PCP: the answer is sent after the change
//! is settled (journal, dataplane), and a refusal comes from
//! [`Settled::refusal`](super::effects::Settled::refusal).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use pcp_engine::{Compiled, Holder, InternalEndpoint, Mapping, MappingId, Millis, SubscriberUsage};
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
}

/// Operator requests a shard answers.
pub enum Control {
    /// Mappings matching a filter.
    Mappings(MappingFilter, oneshot::Sender<Vec<Mapping>>),
    /// One mapping.
    Mapping(MappingId, oneshot::Sender<Option<Mapping>>),
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
    Delete(MappingId, oneshot::Sender<Result<Option<Mapping>, Refused>>),
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
                .cloned()
                .collect();
            let _ = reply.send(list);
        }
        Control::Mapping(id, reply) => {
            let _ = reply.send(st.engine.mapping(id).cloned());
        }
        Control::Subscriber(ip, reply) => {
            let _ = reply.send(st.engine.subscriber(ip));
        }
        Control::CreateStatic(internal, external_port, reply) => {
            let r = write(st, |engine, now| {
                engine
                    .create_static(now, internal, external_port)
                    .map_err(Refused::Engine)
            });
            let _ = reply.send(r);
        }
        Control::Delete(id, reply) => {
            let _ = reply.send(write(st, |engine, now| Ok(engine.delete(now, id))));
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
            st.effects.compact(&st.engine);
        }
        Control::Shutdown(reply) => {
            let _ = reply.send(());
            return false;
        }
    }
    true
}

/// An operator write: refused up front while the state cannot be made
/// durable, else done, settled, and answered by the outcome.
fn write<T>(
    st: &mut State,
    op: impl FnOnce(&mut pcp_engine::Engine, Millis) -> Result<T, Refused>,
) -> Result<T, Refused> {
    if !st.effects.durable(&st.engine) {
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
