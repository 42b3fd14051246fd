//! The journal's writer: one thread per shard that owns the shard's
//! journal, so the shard never sleeps in fdatasync. The shard hands it a
//! batch's records and goes on receiving and answering; the replies of the
//! batch are held until the writer says the records are on disk.
//!
//! * **Group commit**: the writer takes every batch queued while its last
//!   fdatasync ran and covers them all with one write and one fdatasync.
//! * **Order**: jobs complete in the order they were submitted; a failed
//!   commit poisons the journal (pcp-store's rule), so every later batch
//!   fails too until a snapshot replaces it.
//! * **Compaction** is a job like any other: the snapshot (taken by the
//!   shard right after submitting a batch) is written by the writer. It is
//!   skipped when a commit before it failed, since the snapshot may then
//!   hold changes that are taken back.
//!
//! The writer wakes the shard through a [`Notify`]; the shard reads the
//! completions from a plain channel, so it can also wait for them
//! synchronously (operator requests, timers and a poisoned journal take
//! the synchronous path in `effects.rs`).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pcp_store::{Journal, Record};
use tokio::sync::Notify;

/// Work for the writer.
enum Job {
    /// Make these records durable.
    Commit(Vec<Record>),
    /// Replace snapshot and journal with this state (a new generation),
    /// unless the journal is poisoned.
    Compact { generation: u64, state: Vec<Record> },
    /// Replace them even when poisoned (the way out of a poisoned
    /// journal; the state was taken with nothing in flight).
    Repair { generation: u64, state: Vec<Record> },
}

/// What became of one job.
pub(super) struct Done {
    /// The job's sequence number (submission order).
    pub(super) seq: u64,
    /// `Err` with the reason when the records (or snapshot) are not durable.
    pub(super) outcome: Result<(), String>,
    /// Whether the journal is poisoned after this job.
    pub(super) poisoned: bool,
    /// The journal's length after this job.
    pub(super) len: u64,
    /// How long the write and fdatasync took (commits).
    pub(super) latency: Duration,
    /// The records' buffer, emptied, for reuse.
    pub(super) buffer: Vec<Record>,
}

/// The shard's side of its journal writer.
pub(super) struct JournalWriter {
    jobs: Option<Sender<(u64, Job)>>,
    done: Receiver<Done>,
    /// Woken when a job completes.
    pub(super) wake: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
    next_seq: u64,
    outstanding: u64,
    poisoned: bool,
    len: u64,
    spare: Vec<Vec<Record>>,
}

impl JournalWriter {
    /// Starts the writer thread of shard `index`, owning `journal`.
    pub(super) fn start(index: usize, journal: Journal) -> std::io::Result<Self> {
        let (jobs, rx) = channel::<(u64, Job)>();
        let (tx, done) = channel::<Done>();
        let wake = Arc::new(Notify::new());
        let poisoned = journal.is_poisoned();
        let len = journal.len();
        let notify = wake.clone();
        let thread = std::thread::Builder::new()
            .name(format!("pcpd-journal-{index}"))
            .spawn(move || write_loop(journal, &rx, &tx, &notify))?;
        Ok(JournalWriter {
            jobs: Some(jobs),
            done,
            wake,
            thread: Some(thread),
            next_seq: 0,
            outstanding: 0,
            poisoned,
            len,
            spare: Vec::new(),
        })
    }

    fn send(&mut self, job: Job) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outstanding += 1;
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|j| j.send((seq, job)).is_ok());
        if !sent {
            // The writer is gone (it never exits first): treat as a failed
            // write, which poisons the journal for the rest of this run.
            self.poisoned = true;
        }
        seq
    }

    /// A buffer for the next batch's records (reused).
    pub(super) fn buffer(&mut self) -> Vec<Record> {
        self.spare.pop().unwrap_or_default()
    }

    /// Hands a batch's records to the writer; returns its sequence number.
    pub(super) fn commit(&mut self, records: Vec<Record>) -> u64 {
        self.send(Job::Commit(records))
    }

    /// Hands a snapshot to the writer (skipped if a commit before it fails).
    pub(super) fn compact(&mut self, generation: u64, state: Vec<Record>) -> u64 {
        self.send(Job::Compact { generation, state })
    }

    /// Hands a repair snapshot to the writer (written even when poisoned).
    pub(super) fn repair(&mut self, generation: u64, state: Vec<Record>) -> u64 {
        self.send(Job::Repair { generation, state })
    }

    /// The next completion, if one is there.
    pub(super) fn try_done(&mut self) -> Option<Done> {
        let d = self.done.try_recv().ok()?;
        Some(self.account(d))
    }

    /// Waits for the next completion (`None`: nothing outstanding).
    pub(super) fn wait_done(&mut self) -> Option<Done> {
        if self.outstanding == 0 {
            return None;
        }
        match self.done.recv() {
            Ok(d) => Some(self.account(d)),
            Err(_) => {
                // The writer thread ended (it only does when told to).
                self.outstanding = 0;
                self.poisoned = true;
                None
            }
        }
    }

    fn account(&mut self, mut d: Done) -> Done {
        self.outstanding -= 1;
        self.poisoned = d.poisoned;
        self.len = d.len;
        self.recycle(std::mem::take(&mut d.buffer));
        d
    }

    /// Gives back a records buffer that was not handed over.
    pub(super) fn recycle(&mut self, mut buf: Vec<Record>) {
        buf.clear();
        if buf.capacity() > 0 && self.spare.len() < 4 {
            self.spare.push(buf);
        }
    }

    /// Whether the journal was poisoned as of the last completion.
    pub(super) fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// The journal's length as of the last completion.
    pub(super) fn len(&self) -> u64 {
        self.len
    }
}

impl Drop for JournalWriter {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has done what is queued.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread: per wake-up, every queued commit in one write and
/// one fdatasync, compactions in their place in the queue.
fn write_loop(
    mut journal: Journal,
    jobs: &Receiver<(u64, Job)>,
    done: &Sender<Done>,
    wake: &Notify,
) {
    let mut group: Vec<(u64, Vec<Record>)> = Vec::new();
    while let Ok(first) = jobs.recv() {
        let mut next = Some(first);
        while let Some((seq, job)) = next.take() {
            match job {
                Job::Commit(records) => {
                    for r in &records {
                        journal.append(r);
                    }
                    group.push((seq, records));
                }
                Job::Compact { generation, state } => {
                    commit_group(&mut journal, &mut group, done);
                    snapshot(&mut journal, seq, generation, state, false, done);
                }
                Job::Repair { generation, state } => {
                    commit_group(&mut journal, &mut group, done);
                    snapshot(&mut journal, seq, generation, state, true, done);
                }
            }
            next = jobs.try_recv().ok();
        }
        commit_group(&mut journal, &mut group, done);
        wake.notify_one();
    }
}

/// Replaces snapshot and journal with `state`; a compaction (not a
/// repair) is skipped once a commit before it failed.
fn snapshot(
    journal: &mut Journal,
    seq: u64,
    generation: u64,
    state: Vec<Record>,
    repair: bool,
    done: &Sender<Done>,
) {
    let outcome = if journal.is_poisoned() && !repair {
        Err("skipped: a commit before the snapshot failed".to_string())
    } else {
        journal
            .compact(generation, state)
            .map_err(|e| format!("snapshot: {e}"))
    };
    let _ = done.send(Done {
        seq,
        outcome,
        poisoned: journal.is_poisoned(),
        len: journal.len(),
        latency: Duration::ZERO,
        buffer: Vec::new(),
    });
}

/// One write and one fdatasync for every commit in `group`.
fn commit_group(journal: &mut Journal, group: &mut Vec<(u64, Vec<Record>)>, done: &Sender<Done>) {
    if group.is_empty() {
        return;
    }
    let started = Instant::now();
    let outcome = journal
        .commit()
        .map(|_| ())
        .map_err(|e| format!("journal: {e}"));
    let latency = started.elapsed();
    for (seq, mut records) in group.drain(..) {
        records.clear();
        let _ = done.send(Done {
            seq,
            outcome: outcome.clone(),
            poisoned: journal.is_poisoned(),
            len: journal.len(),
            latency,
            buffer: records,
        });
    }
}
