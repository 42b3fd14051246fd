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
//! * **Compaction** is a job in its place in the queue: the state (taken by
//!   the shard right after submitting a batch) is everything before it, so
//!   the writer starts the next generation's journal for the commits after
//!   it, and a thread of its own writes the snapshot beside it (pcp-store's
//!   `rotation.rs`): no commit, and so no reply, waits for a snapshot. A
//!   compaction is skipped when a commit before it failed, since the
//!   snapshot may then hold changes that are taken back; it is written
//!   synchronously when the previous one could not be put in place.
//!
//! The writer wakes the shard through a [`Notify`]; the shard reads the
//! completions from a plain channel, so it can also wait for them
//! synchronously (operator requests, timers and a poisoned journal take
//! the synchronous path in `effects.rs`).

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
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
    /// How a compaction's snapshot written beside the journal ended, if
    /// one ended since the last completion (`Err`: the reason).
    pub(super) compacted: Option<Result<(), String>>,
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
    compacted: Option<Result<(), String>>,
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
            compacted: None,
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
        if let Some(c) = d.compacted.take() {
            self.compacted = Some(c);
        }
        d
    }

    /// How the last compaction's snapshot written beside the journal
    /// ended, once (`None`: none ended since the last call).
    pub(super) fn take_compacted(&mut self) -> Option<Result<(), String>> {
        self.compacted.take()
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
    let mut side = Side {
        done,
        background: None,
        ended: None,
    };
    loop {
        // While a snapshot is written beside the journal, look at it now
        // and then even when no commit comes.
        let first = match &side.background {
            None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(_) => jobs.recv_timeout(Duration::from_millis(100)),
        };
        let first = match first {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                side.settle(&mut journal, false);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
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
                    commit_group(&mut journal, &mut group, &mut side);
                    side.settle(&mut journal, true);
                    compact(&mut journal, (seq, generation), state, &mut side);
                }
                Job::Repair { generation, state } => {
                    commit_group(&mut journal, &mut group, &mut side);
                    side.settle(&mut journal, true);
                    snapshot(&mut journal, (seq, generation), state, true, &mut side);
                }
            }
            next = jobs.try_recv().ok();
        }
        commit_group(&mut journal, &mut group, &mut side);
        wake.notify_one();
        side.settle(&mut journal, false);
    }
    // Closing: a snapshot still being written is put in place.
    side.settle(&mut journal, true);
}

/// A compaction's snapshot being written by a thread of its own while
/// commits go to the next generation's journal (pcp-store's rotation).
type Background = std::thread::JoinHandle<Result<std::path::PathBuf, pcp_store::StoreError>>;

/// The writer's completions, and a compaction's snapshot being written
/// beside the journal.
struct Side<'a> {
    done: &'a Sender<Done>,
    background: Option<Background>,
    /// How the last background snapshot ended, told with the next
    /// completion (the shard reports a failure as it does a failed
    /// synchronous compaction).
    ended: Option<Result<(), String>>,
}

impl Side<'_> {
    /// Completes job `seq`.
    fn send(
        &mut self,
        journal: &Journal,
        seq: u64,
        outcome: Result<(), String>,
        (latency, buffer): (Duration, Vec<Record>),
    ) {
        let _ = self.done.send(Done {
            seq,
            outcome,
            poisoned: journal.is_poisoned(),
            len: journal.len(),
            latency,
            buffer,
            compacted: self.ended.take(),
        });
    }

    /// Puts a finished background snapshot in place (with `wait`, waits
    /// for it). If it failed, commits stay in the next journal and the
    /// next compaction is written synchronously; nothing is lost either
    /// way.
    fn settle(&mut self, journal: &mut Journal, wait: bool) {
        if !self
            .background
            .as_ref()
            .is_some_and(|b| wait || b.is_finished())
        {
            return;
        }
        let Some(thread) = self.background.take() else {
            return;
        };
        let put = match thread.join() {
            Ok(Ok(tmp)) => journal.complete_rotation(&tmp).map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the snapshot thread panicked".to_string()),
        };
        match &put {
            Ok(()) => {
                tracing::info!(journal = %journal.path().display(), "journal compacted into a snapshot")
            }
            Err(e) => tracing::error!(
                journal = %journal.path().display(),
                "compaction: {e}; the journal keeps growing until the next compaction, which is written synchronously"
            ),
        }
        self.ended = Some(put.map_err(|e| format!("compaction: {e}")));
    }
}

/// A compaction: commits go on in the next generation's journal at once,
/// and a thread of its own writes the snapshot (so no reply waits for
/// it). Synchronous when a rotation is still not completed, or when the
/// next journal cannot be made.
fn compact(journal: &mut Journal, job: (u64, u64), state: Vec<Record>, side: &mut Side<'_>) {
    if journal.is_poisoned() || journal.is_rotated() {
        return snapshot(journal, job, state, false, side);
    }
    let (seq, generation) = job;
    let target = match journal.rotate(generation) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("compaction: {e}; writing the snapshot synchronously");
            return snapshot(journal, job, state, false, side);
        }
    };
    let spawned = std::thread::Builder::new()
        .name("pcpd-snapshot".into())
        .spawn(move || target.write(generation, state));
    match spawned {
        Ok(t) => side.background = Some(t),
        Err(e) => tracing::error!("compaction: cannot start the snapshot thread: {e}"),
    }
    side.send(journal, seq, Ok(()), (Duration::ZERO, Vec::new()));
}

/// Replaces snapshot and journal with `state`; a compaction (not a
/// repair) is skipped once a commit before it failed.
fn snapshot(
    journal: &mut Journal,
    (seq, generation): (u64, u64),
    state: Vec<Record>,
    repair: bool,
    side: &mut Side<'_>,
) {
    let outcome = if journal.is_poisoned() && !repair {
        Err("skipped: a commit before the snapshot failed".to_string())
    } else {
        journal
            .compact(generation, state)
            .map_err(|e| format!("snapshot: {e}"))
    };
    side.send(journal, seq, outcome, (Duration::ZERO, Vec::new()));
}

/// One write and one fdatasync for every commit in `group`.
fn commit_group(journal: &mut Journal, group: &mut Vec<(u64, Vec<Record>)>, side: &mut Side<'_>) {
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
        side.send(journal, seq, outcome.clone(), (latency, records));
    }
}

#[cfg(test)]
mod tests {
    //! Compaction beside the journal, through pcp-store's fault seam.
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use pcp_store::{Faults, Record};

    use super::JournalWriter;

    fn gone(port: u16) -> Record {
        Record::Gone(pcp_engine::MappingKey::inbound(
            pcp_engine::InternalEndpoint {
                addr: "100.64.0.1".parse().unwrap(),
                port,
                protocol: 6,
            },
        ))
    }

    /// A writer on a fresh state directory, with pcp-store's fault seam.
    fn writer(name: &str) -> (std::path::PathBuf, Arc<Faults>, JournalWriter) {
        let dir = std::env::temp_dir().join(format!("pcpd-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        pcp_store::write_epoch(&dir, 1).unwrap();
        let faults = Arc::new(Faults::default());
        let journal =
            pcp_store::write_snapshot_with(&dir, 0, 1, Vec::new(), Some(faults.clone())).unwrap();
        (
            dir,
            faults.clone(),
            JournalWriter::start(0, journal).unwrap(),
        )
    }

    /// A snapshot that takes 600 ms does not hold the commits behind it
    /// (item 2 of issue 15: compaction never stalls a shard's replies), and
    /// is put in place once written, with every record kept.
    #[test]
    fn a_slow_snapshot_holds_no_commit() {
        let (dir, faults, mut w) = writer("slow");
        w.commit(vec![gone(1)]);
        assert!(w.wait_done().unwrap().outcome.is_ok());
        faults.slow_snapshot(600);
        let started = Instant::now();
        w.compact(2, Vec::new());
        w.commit(vec![gone(2)]);
        assert!(
            w.wait_done().unwrap().outcome.is_ok(),
            "compaction handed over"
        );
        assert!(w.wait_done().unwrap().outcome.is_ok(), "commit");
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "the commit behind the compaction waited {:?}",
            started.elapsed()
        );
        assert!(
            dir.join("shard-0.journal.next").exists(),
            "snapshot still being written"
        );
        // Put in place by the writer once written (it looks every 100 ms).
        let deadline = Instant::now() + Duration::from_secs(5);
        while dir.join("shard-0.journal.next").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !dir.join("shard-0.journal.next").exists(),
            "rotation completed"
        );
        drop(w);
        let loaded = pcp_store::load(&dir).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(
            loaded.records, 1,
            "the commit after the rotation, after the snapshot"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A snapshot beside the journal that fails (a full disk) is told to
    /// the shard with the next completion, and the next compaction is
    /// written synchronously; no commit is lost.
    #[test]
    fn a_failed_background_snapshot_is_told_and_the_next_compaction_is_synchronous() {
        let (dir, faults, mut w) = writer("fail");
        faults.fail_writes(1);
        w.compact(2, Vec::new());
        assert!(w.wait_done().unwrap().outcome.is_ok(), "handed over");
        // The writer looks at the snapshot thread every 100 ms.
        std::thread::sleep(Duration::from_millis(300));
        w.commit(vec![gone(1)]);
        let d = w.wait_done().unwrap();
        assert!(d.outcome.is_ok(), "the commit itself is durable");
        assert!(
            matches!(w.take_compacted(), Some(Err(ref e)) if e.contains("compaction")),
            "the failure is told"
        );
        assert!(
            dir.join("shard-0.journal.next").exists(),
            "commits stay in the next journal"
        );
        w.compact(3, vec![gone(1)]);
        assert!(w.wait_done().unwrap().outcome.is_ok());
        assert!(
            !dir.join("shard-0.journal.next").exists(),
            "replaced synchronously"
        );
        drop(w);
        assert_eq!(pcp_store::load(&dir).unwrap().records, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
