//! The dataplane's applier: for a backend that waits on the kernel
//! (nftables over netlink: each transaction is a round trip to nf_tables,
//! milliseconds for a large one, and a removal holds only at the kernel's
//! next tick), one thread per shard owns the dataplane, so the shard never
//! blocks on it. The shard hands it a
//! batch's changes once the batch is durable and goes on receiving; the
//! batch's replies are held until the applier says the changes are in.
//!
//! * **Coalescing**: every batch queued while the last transaction ran
//!   goes into the next one (the backend caps each kernel transaction,
//!   see pcp-dataplane's `nftables.rs`), so a slow transaction makes the
//!   next one larger, not the queue longer.
//! * **Order**: batches complete in the order they were submitted, and
//!   changes reach the kernel in that order.
//! * **Removals that hold later**: nftables removes an element by expiring
//!   it, which holds from the kernel's next tick; such a batch is held
//!   until then (and until its flows are flushed) while the next
//!   transactions go ahead, so the tick costs latency, not throughput.
//!
//! A backend that never waits (the memory one) is applied inline on the
//! shard: a thread hop would only add latency. The synchronous path
//! (operator requests, timers with a message to send, cluster mode, a
//! poisoned journal) uses [`Applier::apply_now`] once nothing is
//! outstanding.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pcp_dataplane::{ApplyError, Change, Dataplane};
use tokio::sync::Notify;

/// What became of one batch's changes.
pub(super) struct Applied {
    /// One result per change, in order.
    pub(super) results: Vec<Result<(), ApplyError>>,
    /// How long the transaction that carried them took.
    pub(super) latency: Duration,
    /// The changes' buffer, emptied, for reuse.
    buffer: Vec<Change>,
}

enum Mode {
    /// Applied on the shard's thread.
    Inline(Box<dyn Dataplane>),
    /// Applied by a thread of its own.
    Thread {
        jobs: Option<Sender<Vec<Change>>>,
        done: Receiver<Applied>,
        thread: Option<JoinHandle<()>>,
    },
}

/// The shard's side of its dataplane.
pub(super) struct Applier {
    mode: Mode,
    /// The number of changes of each batch handed over and not yet
    /// taken back, oldest first.
    sizes: VecDeque<usize>,
    spare: Vec<Vec<Change>>,
    /// Inline completions not yet taken.
    ready: VecDeque<Applied>,
}

impl Applier {
    /// Shard `index`'s applier for `dataplane`; a thread of its own when
    /// the backend waits on the kernel. `wake` is notified per completion.
    pub(super) fn start(
        index: usize,
        dataplane: Box<dyn Dataplane>,
        wake: Arc<Notify>,
    ) -> std::io::Result<Self> {
        let mode = if dataplane.waits() {
            let (jobs, rx) = channel::<Vec<Change>>();
            let (tx, done) = channel::<Applied>();
            let thread = std::thread::Builder::new()
                .name(format!("pcpd-dataplane-{index}"))
                .spawn(move || apply_loop(dataplane, &rx, &tx, &wake))?;
            Mode::Thread {
                jobs: Some(jobs),
                done,
                thread: Some(thread),
            }
        } else {
            Mode::Inline(dataplane)
        };
        Ok(Applier {
            mode,
            sizes: VecDeque::new(),
            spare: Vec::new(),
            ready: VecDeque::new(),
        })
    }

    /// Whether the dataplane is driven from a thread of its own (it waits
    /// on the kernel).
    pub(super) fn threaded(&self) -> bool {
        matches!(self.mode, Mode::Thread { .. })
    }

    /// A buffer for the next batch's changes (reused).
    pub(super) fn buffer(&mut self) -> Vec<Change> {
        self.spare.pop().unwrap_or_default()
    }

    /// Hands a batch's changes over; its completion comes from
    /// [`Applier::try_done`] or [`Applier::wait_done`], in order.
    pub(super) fn submit(&mut self, changes: Vec<Change>) {
        self.sizes.push_back(changes.len());
        match &mut self.mode {
            Mode::Inline(dp) => {
                let applied = apply(dp.as_mut(), changes);
                self.ready.push_back(applied);
            }
            // A thread that is gone (it never exits first) shows as a
            // closed completion queue: see `next`.
            Mode::Thread { jobs, .. } => {
                if let Some(j) = jobs {
                    let _ = j.send(changes);
                }
            }
        }
    }

    /// The next completion, if one is there.
    pub(super) fn try_done(&mut self) -> Option<Applied> {
        self.next(false)
    }

    /// Waits for the next completion (`None`: nothing outstanding).
    pub(super) fn wait_done(&mut self) -> Option<Applied> {
        self.next(true)
    }

    fn next(&mut self, wait: bool) -> Option<Applied> {
        let n = *self.sizes.front()?;
        let mut d = match &self.mode {
            Mode::Inline(_) => self.ready.pop_front()?,
            Mode::Thread { done, .. } => {
                let got = if wait {
                    done.recv().ok()
                } else {
                    match done.try_recv() {
                        Ok(d) => Some(d),
                        Err(TryRecvError::Empty) => return None,
                        Err(TryRecvError::Disconnected) => None,
                    }
                };
                // The thread is gone: every change it did not answer for
                // is refused (and its mapping taken back).
                got.unwrap_or_else(|| refused(n))
            }
        };
        self.sizes.pop_front();
        let mut buf = std::mem::take(&mut d.buffer);
        buf.clear();
        if buf.capacity() > 0 && self.spare.len() < 4 {
            self.spare.push(buf);
        }
        Some(d)
    }

    /// Batches handed over and not yet taken back.
    pub(super) fn outstanding(&self) -> usize {
        self.sizes.len()
    }

    /// Applies `changes` and waits for them (the synchronous path; the
    /// caller has taken every earlier completion).
    pub(super) fn apply_now(&mut self, changes: Vec<Change>) -> Applied {
        debug_assert_eq!(self.outstanding(), 0, "apply_now with batches outstanding");
        let n = changes.len();
        self.submit(changes);
        self.wait_done().unwrap_or_else(|| refused(n))
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        if let Mode::Thread { jobs, thread, .. } = &mut self.mode {
            // Closing the queue ends the thread once it has applied what
            // is queued (nothing is left half in the kernel).
            *jobs = None;
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Every change of a batch refused: the applier thread is gone.
fn refused(n: usize) -> Applied {
    Applied {
        results: vec![
            Err(ApplyError::Unavailable(
                "the dataplane thread stopped".into()
            ));
            n
        ],
        latency: Duration::ZERO,
        buffer: Vec::new(),
    }
}

fn apply(dp: &mut dyn Dataplane, changes: Vec<Change>) -> Applied {
    let started = Instant::now();
    let results = dp.apply(&changes);
    Applied {
        results,
        latency: started.elapsed(),
        buffer: changes,
    }
}

/// The applier thread: per wake-up, every queued batch in one call to the
/// backend. A batch whose removals hold only later (the nftables backend's
/// expired elements, see pcp-dataplane's `Dataplane::apply_early`) is held
/// until then while the next transactions go ahead; completions leave in
/// order, after the backend has settled them.
fn apply_loop(
    mut dp: Box<dyn Dataplane>,
    jobs: &Receiver<Vec<Change>>,
    done: &Sender<Applied>,
    wake: &Notify,
) {
    let mut held: VecDeque<(Instant, Vec<Applied>)> = VecDeque::new();
    let mut sizes: Vec<usize> = Vec::new();
    let mut buffers: Vec<Vec<Change>> = Vec::new();
    loop {
        release(dp.as_mut(), &mut held, done, wake);
        let wait = match held.front() {
            Some((at, _)) => at.saturating_duration_since(Instant::now()),
            None => pcp_dataplane::IDLE_TICK,
        };
        let mut all = match jobs.recv_timeout(wait) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                if held.is_empty() {
                    dp.idle();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // The batches queued behind the first are moved onto it (their
        // emptied buffers go back with their results).
        sizes.push(all.len());
        while let Ok(mut more) = jobs.try_recv() {
            sizes.push(more.len());
            all.append(&mut more);
            buffers.push(more);
        }
        let started = Instant::now();
        let (results, holds_at) = dp.apply_early(&all);
        let mut results = results.into_iter();
        let at = holds_at.unwrap_or(started);
        let latency = at.max(Instant::now()) - started;
        let applied = sizes
            .drain(..)
            .zip(std::iter::once(all).chain(buffers.drain(..)))
            .map(|(n, buffer)| Applied {
                results: results.by_ref().take(n).collect(),
                latency,
                buffer,
            })
            .collect();
        held.push_back((at, applied));
    }
    // Closed: what is held still leaves (nothing is left half applied).
    while let Some((at, _)) = held.back() {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        release(dp.as_mut(), &mut held, done, wake);
    }
}

/// Sends the held completions whose time has come, in order, once the
/// backend has settled what is due.
fn release(
    dp: &mut dyn Dataplane,
    held: &mut VecDeque<(Instant, Vec<Applied>)>,
    done: &Sender<Applied>,
    wake: &Notify,
) {
    let now = Instant::now();
    if held.front().is_none_or(|(at, _)| *at > now) {
        return;
    }
    dp.settle();
    while held.front().is_some_and(|(at, _)| *at <= now) {
        if let Some((_, applied)) = held.pop_front() {
            for a in applied {
                let _ = done.send(a);
            }
        }
    }
    wake.notify_one();
}
