//! The shard's timer loop: sleeps until the engine's next deadline, fires
//! it, settles the effects (expiries are journaled like anything else; on
//! the pipelined path when nothing is to be sent), and sends the due
//! unsolicited messages (RFC 6887 §14) only when the state they report is
//! durable.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use quinn_udp::Transmit;
use tokio::io::Interest;
use tokio::sync::Notify;

use super::effects::Origin;
use super::{now_ms, Sockets, State};

/// How long the loop sleeps with nothing due; while the state is not
/// durable, it wakes each second so the journal repair is retried.
const IDLE: Duration = Duration::from_secs(3600);
const REPAIR_TICK: Duration = Duration::from_secs(1);

pub(super) async fn timer_loop(state: Rc<RefCell<State>>, sockets: Sockets, notify: Rc<Notify>) {
    loop {
        let (next, poisoned) = {
            let st = state.borrow();
            (st.engine.poll_timeout(), st.effects.needs_repair())
        };
        let mut wait = match next {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => IDLE,
        };
        if poisoned {
            wait = wait.min(REPAIR_TICK);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = notify.notified() => continue,
        }
        fire(&mut state.borrow_mut(), &sockets);
        // A storm of timers is worked off a slice at a time
        // (`pcp_engine::TIMER_BUDGET`): let the receive loops in between.
        tokio::task::yield_now().await;
    }
}

/// One round of timers.
fn fire(st: &mut State, sockets: &Sockets) {
    st.engine.handle_timeout(now_ms());
    st.effects.collect(&mut st.engine, Origin::Timer);
    if st.effects.pipelined() && !st.engine.has_transmit() {
        // Expiries and releases only, nobody to tell: they take the
        // pipelined path like a batch of requests (with no replies), so
        // the shard does not wait for the disk or the kernel.
        super::recv::flush(st, sockets);
        return;
    }
    let settled = st.effects.settle(&mut st.engine);
    // Batches of requests the synchronous settle completed: answered first.
    super::recv::answer_finished(st, sockets);
    while let Some(tx) = st.engine.poll_transmit() {
        if !settled.durable {
            // A mapping update or ANNOUNCE must not report state that a
            // restart could lose.
            st.metrics.drop_io("unsolicited_not_durable");
            continue;
        }
        let family_v6 = tx.dst.is_ipv6();
        let mut same_family = sockets
            .iter()
            .filter(|(s, _)| s.local_addr().is_ok_and(|a| a.is_ipv6() == family_v6));
        if tx.dst.ip().is_multicast() {
            // By every listen address's interface (multicast.rs).
            for (sock, udp) in same_family {
                if let Err(e) = super::multicast::send(sock, udp, tx.dst, &tx.payload) {
                    tracing::debug!("unsolicited to {}: {e}", tx.dst);
                    st.metrics.drop_io("unsolicited_send_failed");
                }
            }
            continue;
        }
        let Some((sock, udp)) = same_family.next() else {
            continue;
        };
        let t = Transmit {
            destination: tx.dst,
            ecn: None,
            contents: &tx.payload,
            segment_size: None,
            src_ip: None,
        };
        if let Err(e) = sock.try_io(Interest::WRITABLE, || udp.try_send(sock.into(), &t)) {
            tracing::debug!("unsolicited to {}: {e}", tx.dst);
            st.metrics.drop_io("unsolicited_send_failed");
        }
    }
}
