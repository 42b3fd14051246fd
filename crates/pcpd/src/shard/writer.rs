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
//! * **Compaction** is a job in its place in the queue: the writer starts
//!   the next generation's journal for the commits after it, and a thread
//!   of its own writes the snapshot beside it (pcp-store's `rotation.rs`):
//!   no commit, and so no reply, waits for a snapshot.
//! * **Sliced**, the usual way: the shard hands the state over a few
//!   thousand records at a time between its batches (`Job::Slice`, through
//!   the writer to the snapshot thread), so no batch waits while a large
//!   shard's state is copied either. Records taken late may hold changes
//!   made after the rotation; those are in the next journal too, and a
//!   replay ends in the same state (pcp-engine's `slices.rs`). The end
//!   (`Job::SliceEnd`) comes after every batch whose changes a slice could
//!   hold; if one of their commits failed, the snapshot is abandoned, since
//!   it may hold changes that are taken back.
//! * **Whole**, after a compaction failed: the shard takes the state at
//!   once, and it is written synchronously when the previous one could not
//!   be put in place. A whole compaction is skipped when a commit before it
//!   failed.
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

use super::slow_commits::SlowCommits;

/// Work for the writer.
enum Job {
    /// Make these records durable.
    Commit(Vec<Record>),
    /// Replace snapshot and journal with this state (a new generation),
    /// unless the journal is poisoned. Sliced: the state goes on in
    /// `Slice` jobs until `SliceEnd`.
    Compact {
        generation: u64,
        state: Vec<Record>,
        sliced: bool,
    },
    /// More of a sliced compaction's state.
    Slice(Vec<Record>),
    /// The last of it.
    SliceEnd,
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
    /// Whether a snapshot is still being written beside the journal.
    snapshot_writing: bool,
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
    /// A compaction's snapshot was still being written beside the journal
    /// as of the last completion.
    snapshot_writing: bool,
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
            snapshot_writing: false,
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

    /// Hands a snapshot to the writer (skipped if a commit before it
    /// fails). `sliced`: `state` is the first part, the rest follows with
    /// [`JournalWriter::slice`].
    pub(super) fn compact(&mut self, generation: u64, state: Vec<Record>, sliced: bool) -> u64 {
        self.send(Job::Compact {
            generation,
            state,
            sliced,
        })
    }

    /// Hands over more of a sliced compaction's state; `last` ends it.
    /// No completion follows (a failure is told as the snapshot's).
    pub(super) fn slice(&mut self, records: Vec<Record>, last: bool) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send((self.next_seq, Job::Slice(records)));
            if last {
                let _ = jobs.send((self.next_seq, Job::SliceEnd));
            }
        }
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
        self.snapshot_writing = d.snapshot_writing;
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

    /// Whether a compaction's snapshot was still being written beside the
    /// journal as of the last completion: a compaction asked for meanwhile
    /// would make the writer wait for it, and every commit behind it.
    pub(super) fn snapshot_writing(&self) -> bool {
        self.snapshot_writing
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
        slices: None,
        ended: None,
        slow: SlowCommits::default(),
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
                Job::Compact {
                    generation,
                    state,
                    sliced,
                } => {
                    commit_group(&mut journal, &mut group, &mut side);
                    side.settle(&mut journal, true);
                    compact(&mut journal, (seq, generation), (state, sliced), &mut side);
                }
                Job::Slice(records) => {
                    if let Some(tx) = &side.slices {
                        let _ = tx.send(Some(records));
                    }
                }
                Job::SliceEnd => {
                    // Every batch a slice could hold changes of is before
                    // this in the queue: committed now, or the journal is
                    // poisoned and the snapshot abandoned.
                    commit_group(&mut journal, &mut group, &mut side);
                    if let Some(tx) = side.slices.take() {
                        if !journal.is_poisoned() {
                            let _ = tx.send(None);
                        }
                    }
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
    /// Where a sliced compaction's records go, until its end: `None`
    /// ends it, dropping the sender abandons it.
    slices: Option<Sender<Option<Vec<Record>>>>,
    /// How the last background snapshot ended, told with the next
    /// completion (the shard reports a failure as it does a failed
    /// synchronous compaction).
    ended: Option<Result<(), String>>,
    slow: SlowCommits,
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
            snapshot_writing: self.background.is_some(),
        });
    }

    /// Puts a finished background snapshot in place (with `wait`, waits
    /// for it). If it failed, commits stay in the next journal and the
    /// next compaction is written synchronously; nothing is lost either
    /// way.
    fn settle(&mut self, journal: &mut Journal, wait: bool) {
        // Never wait for slices the shard may not send: abandoned, and not
        // a failure (a snapshot taken whole follows, or the writer closes).
        let abandoned = wait && self.slices.take().is_some();
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
            Err(_) if abandoned => {
                tracing::info!(journal = %journal.path().display(), "compaction: a snapshot taken in slices was abandoned")
            }
            Err(e) => tracing::error!(
                journal = %journal.path().display(),
                "compaction: {e}; the journal keeps growing until the next compaction, which is written synchronously"
            ),
        }
        if !(abandoned && put.is_err()) {
            self.ended = Some(put.map_err(|e| format!("compaction: {e}")));
        }
    }
}

/// A compaction: commits go on in the next generation's journal at once,
/// and a thread of its own writes the snapshot (so no reply waits for
/// it). A whole one is written synchronously when a rotation is still not
/// completed, or when the next journal cannot be made; a sliced one is
/// then refused (the shard takes the next one whole).
fn compact(
    journal: &mut Journal,
    job: (u64, u64),
    (state, sliced): (Vec<Record>, bool),
    side: &mut Side<'_>,
) {
    let (seq, generation) = job;
    let refuse = |side: &mut Side<'_>, journal: &Journal, why: String| {
        side.send(journal, seq, Err(why), (Duration::ZERO, Vec::new()));
    };
    if journal.is_poisoned() || journal.is_rotated() {
        if sliced {
            let why = "compaction: the previous snapshot is not in place".to_string();
            return refuse(side, journal, why);
        }
        return snapshot(journal, job, state, false, side);
    }
    let target = match journal.rotate(generation) {
        Ok(t) => t,
        Err(e) if sliced => return refuse(side, journal, format!("compaction: {e}")),
        Err(e) => {
            tracing::warn!("compaction: {e}; writing the snapshot synchronously");
            return snapshot(journal, job, state, false, side);
        }
    };
    let (tx, rx) = channel();
    let state = Slices {
        now: state.into_iter(),
        rest: sliced.then_some(rx),
    };
    let spawned = std::thread::Builder::new()
        .name("pcpd-snapshot".into())
        .spawn(move || target.write(generation, state));
    match spawned {
        Ok(t) => {
            side.background = Some(t);
            side.slices = sliced.then_some(tx);
        }
        Err(e) => tracing::error!("compaction: cannot start the snapshot thread: {e}"),
    }
    side.send(journal, seq, Ok(()), (Duration::ZERO, Vec::new()));
}

/// A compaction's records as the snapshot thread reads them: those handed
/// over with the job, then (sliced) those that follow until the end. An
/// end that never comes abandons the snapshot.
struct Slices {
    now: std::vec::IntoIter<Record>,
    rest: Option<Receiver<Option<Vec<Record>>>>,
}

impl Iterator for Slices {
    type Item = std::io::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.now.next() {
                return Some(Ok(r));
            }
            match self.rest.as_ref()?.recv() {
                Ok(Some(more)) => self.now = more.into_iter(),
                Ok(None) => self.rest = None,
                Err(_) => {
                    self.rest = None;
                    return Some(Err(std::io::Error::other(
                        "abandoned before the shard handed over all of its state",
                    )));
                }
            }
        }
    }
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
    side.slow.warn(latency, journal);
    for (seq, mut records) in group.drain(..) {
        records.clear();
        side.send(journal, seq, outcome.clone(), (latency, records));
    }
}

/// Waits until the writer has put a snapshot in place (it looks every
/// 100 ms); false when it has not after 5 s (tests).
#[cfg(test)]
pub(super) fn rotation_completed(dir: &std::path::Path) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while dir.join("shard-0.journal.next").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    !dir.join("shard-0.journal.next").exists()
}

#[cfg(test)]
mod tests {
    //! Compaction beside the journal, through pcp-store's fault seam.
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use pcp_store::{Faults, Record};

    use super::{rotation_completed, JournalWriter};

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
        w.compact(2, Vec::new(), false);
        w.commit(vec![gone(2)]);
        assert!(
            w.wait_done().unwrap().outcome.is_ok(),
            "compaction handed over"
        );
        assert!(w.wait_done().unwrap().outcome.is_ok(), "commit");
        assert!(w.snapshot_writing(), "told while it is written");
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "the commit behind the compaction waited {:?}",
            started.elapsed()
        );
        assert!(
            dir.join("shard-0.journal.next").exists(),
            "snapshot still being written"
        );
        // Put in place by the writer once written.
        assert!(rotation_completed(&dir), "rotation completed");
        w.commit(Vec::new());
        w.wait_done().unwrap();
        assert!(!w.snapshot_writing(), "told once it is in place");
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
        w.compact(2, Vec::new(), false);
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
        w.compact(3, vec![gone(1)], false);
        assert!(w.wait_done().unwrap().outcome.is_ok());
        assert!(
            !dir.join("shard-0.journal.next").exists(),
            "replaced synchronously"
        );
        drop(w);
        assert_eq!(pcp_store::load(&dir).unwrap().records, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A writer that has taken a sliced compaction with `gone(1)` as its
    /// first part, waiting for more.
    fn sliced(name: &str) -> (std::path::PathBuf, Arc<Faults>, JournalWriter) {
        let (dir, faults, mut w) = writer(name);
        w.compact(2, vec![gone(1)], true);
        assert!(w.wait_done().unwrap().outcome.is_ok(), "handed over");
        (dir, faults, w)
    }

    /// A sliced compaction's snapshot holds the state handed over with it
    /// and every slice after it, commits go on meanwhile, and it is put in
    /// place at its end.
    #[test]
    fn a_sliced_snapshot_is_written_from_its_slices() {
        let (dir, _faults, mut w) = sliced("sliced");
        w.slice(vec![gone(2), gone(3)], false);
        w.commit(vec![gone(10)]);
        assert!(w.wait_done().unwrap().outcome.is_ok(), "commit");
        assert!(
            dir.join("shard-0.journal.next").exists(),
            "no end yet: the snapshot waits for its slices"
        );
        w.slice(vec![gone(4)], true);
        assert!(rotation_completed(&dir), "put in place at its end");
        drop(w);
        let loaded = pcp_store::load(&dir).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.records, 5, "four in the snapshot, one after it");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A commit that fails before a sliced compaction's end abandons the
    /// snapshot (a slice may hold what that batch changed, which is taken
    /// back): the rotation is not completed and the failure is told.
    #[test]
    fn a_sliced_snapshot_is_abandoned_when_a_commit_before_its_end_fails() {
        let (dir, faults, mut w) = sliced("abandoned");
        faults.fail_syncs(1);
        w.commit(vec![gone(10)]);
        assert!(w.wait_done().unwrap().outcome.is_err(), "the commit fails");
        w.slice(vec![gone(2)], true);
        std::thread::sleep(Duration::from_millis(300));
        w.commit(Vec::new());
        w.wait_done().unwrap();
        assert!(
            matches!(w.take_compacted(), Some(Err(ref e)) if e.contains("abandoned")),
            "the abandoned snapshot is told"
        );
        assert!(
            dir.join("shard-0.journal.next").exists(),
            "not put in place"
        );
        assert!(!dir.join("shard-0.snap.tmp").exists(), "its file removed");
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A writer closed while a sliced compaction waits for slices does not
    /// wait for them; a sliced compaction is refused while the previous
    /// snapshot is not in place (the shard takes the next one whole).
    #[test]
    fn an_unfinished_sliced_snapshot_holds_nothing_up() {
        let (dir, _faults, mut w) = sliced("unfinished");
        w.compact(3, Vec::new(), true);
        let refused = w.wait_done().unwrap().outcome;
        assert!(
            matches!(refused, Err(ref e) if e.contains("not in place")),
            "{refused:?}"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(w);
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "closing the writer waited for slices that never come"
        );
        assert!(
            dir.join("shard-0.journal.next").exists(),
            "not put in place"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
