//! # pcp-store: durable state for pcpd
//!
//! Per shard, a snapshot (`shard-N.snap`, written whole and renamed into
//! place) and a journal (`shard-N.journal`) of the changes since; plus the
//! epoch file (`epoch`, RFC 6887 §8.5). Every record is framed as
//! `length (u32) | CRC32 (u32) | body`.
//!
//! ```text
//!  engine events ─▶ Record::from_event ─▶ Journal::append ─▶ Journal::commit (write + fdatasync)
//!                                                            └─▶ only then: dataplane, replies
//!  start: load(dir) ─▶ snapshots + journals, newest generation last ─▶ State (expired dropped)
//! ```
//!
//! A torn last record (a crash mid-write; never acknowledged) is cut off
//! with a warning; damage anywhere else is an error that names the file and
//! offset, and what the operator can do. What this crate does not do:
//! decide which state is valid for the current configuration (the engine's
//! restore does that).

// Unsafe only in behind.rs: two system calls std does not wrap.
#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod behind;
mod codec;
mod commits;
mod rotation;

pub use behind::{WriteBehind, WRITE_BEHIND};
pub use rotation::SnapshotTarget;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

pub use pcp_engine::MappingKey;
use pcp_engine::{Block, Event, Holder, Mapping, Millis};

const SNAP_MAGIC: &[u8; 8] = b"PCPSNAP1";
/// Journals written before commits went over preallocated zeros: records
/// appended one after the other (still read).
const JOURNAL_MAGIC: &[u8; 8] = b"PCPJRNL1";
/// Journals of commits written over preallocated zeros (`commits.rs`).
const JOURNAL2_MAGIC: &[u8; 8] = b"PCPJRNL2";
const EPOCH_MAGIC: &[u8; 8] = b"PCPEPOC1";
/// Header: magic + generation.
const HEADER_LEN: usize = 16;
/// Largest record body accepted (a mapping with every option is far smaller).
const MAX_RECORD: usize = 64 * 1024;

/// One durable fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A subscriber holds a port block since a time.
    Block {
        /// The subscriber.
        subscriber: IpAddr,
        /// The block.
        block: Block,
        /// Since when.
        since: Millis,
    },
    /// A block went back to its pool.
    BlockGone {
        /// The subscriber.
        subscriber: IpAddr,
        /// The block.
        block: Block,
    },
    /// A past holding, for "who held IP:port at T".
    History(Holder),
    /// A mapping as it is now (created, renewed or moved).
    Mapping(Mapping),
    /// A mapping is gone.
    Gone(MappingKey),
}

impl Record {
    /// Moves every instant in the record by `delta` ms (`Millis::MAX`,
    /// "never", stays): the daemon writes records in wall time while its
    /// engine runs on a monotonic clock, and the two differ after a step of
    /// the wall clock.
    pub fn shift(&mut self, delta: i64) {
        let at = |ms: &mut Millis| *ms = pcp_engine::shift_ms(*ms, delta);
        match self {
            Record::Block { since, .. } => at(since),
            Record::History(h) => {
                h.from_ms.as_mut().map(at);
                h.to_ms.as_mut().map(at);
            }
            Record::Mapping(m) => {
                at(&mut m.created_ms);
                at(&mut m.expires_ms);
                at(&mut m.durable_ms);
            }
            Record::BlockGone { .. } | Record::Gone(_) => {}
        }
    }

    /// The records an engine event implies.
    pub fn from_event(event: &Event, now: Millis, out: &mut Vec<Record>) {
        match event {
            Event::MappingCreated(m) | Event::MappingRenewed(m) => {
                out.push(Record::Mapping(m.as_stored()))
            }
            // The store already holds an expiry at least as late.
            Event::MappingRefreshed(_) => {}
            Event::MappingDeleted { mapping, .. } => out.push(Record::Gone(mapping.key())),
            Event::MappingMoved { old, new } => {
                if old.key() != new.key() {
                    out.push(Record::Gone(old.key()));
                }
                out.push(Record::Mapping(new.as_stored()));
            }
            Event::BlockAllocated { subscriber, block } => out.push(Record::Block {
                subscriber: *subscriber,
                block: *block,
                since: now,
            }),
            Event::BlockReleased {
                subscriber,
                block,
                since,
            } => {
                out.push(Record::BlockGone {
                    subscriber: *subscriber,
                    block: *block,
                });
                out.push(Record::History(Holder {
                    internal_addr: *subscriber,
                    block: *block,
                    from_ms: Some(*since),
                    to_ms: Some(now),
                }));
            }
            Event::QuotaExceeded { .. } | Event::PoolExhausted { .. } => {}
        }
    }
}

/// Damaged or unreadable state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file is damaged before its end.
    #[error(
        "{file}: damaged at byte {offset} ({reason}). pcpd will not start on part of its state. \
         Either start with a fresh epoch (clients re-create their mappings): `pcpd --discard-state`, \
         which moves the state files aside into {dir}/discarded-<time>/; or keep the records before \
         the damage: `truncate -s {offset} {file}` and start again."
    )]
    Corrupt {
        /// The file.
        file: String,
        /// The state directory.
        dir: String,
        /// Byte offset of the damaged record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The directory or a file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Encodes one record's body (no framing) into `out`: the value format of
/// pcpd's cluster store in etcd, where each record is one key's value.
pub fn encode_record(rec: &Record, out: &mut Vec<u8>) {
    codec::encode(rec, out)
}

/// Decodes one record body written by [`encode_record`]; `None` when it is
/// damaged or of an unknown kind.
pub fn decode_record(body: &[u8]) -> Option<Record> {
    codec::decode(body)
}

/// Frames a record into `out`.
fn frame(rec: &Record, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0u8; 8]);
    codec::encode(rec, out);
    let body = &out[at + 8..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    out[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
}

fn header(magic: &[u8; 8], generation: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..].copy_from_slice(&generation.to_be_bytes());
    h
}

fn snap_path(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}.snap"))
}

fn journal_path(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}.journal"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Why a journal commit did not make the batch durable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The records could not be written (a full disk: ENOSPC). What was
    /// written of them was cut off again, so the journal still ends on a
    /// whole record.
    #[error("{path}: writing the journal: {source}")]
    Write {
        /// The journal.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// fdatasync failed. The kernel may have dropped the dirty pages
    /// ("fsyncgate"), so nothing written since the last good sync can be
    /// trusted, and retrying the sync would prove nothing.
    #[error("{path}: syncing the journal: {source}")]
    Sync {
        /// The journal.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// An earlier commit failed: the journal takes no more records until
    /// [`Journal::compact`] has replaced it with a snapshot of the state
    /// in memory (a new generation).
    #[error("{path}: the journal failed earlier and waits for a fresh snapshot")]
    Poisoned {
        /// The journal.
        path: String,
    },
}

/// A fault-injection seam for tests: makes the next writes or syncs of the
/// journals and snapshots that share it fail as a full disk or a failed
/// fdatasync would. Production code never creates one.
#[derive(Debug, Default)]
pub struct Faults {
    fail_writes: std::sync::atomic::AtomicU32,
    fail_syncs: std::sync::atomic::AtomicU32,
    /// Milliseconds the next fdatasync sleeps first (a slow disk).
    slow_sync_ms: std::sync::atomic::AtomicU64,
    /// Milliseconds the next snapshot takes at least (a large state).
    slow_snapshot_ms: std::sync::atomic::AtomicU64,
    /// fdatasyncs so far (journal commits and snapshots).
    syncs: std::sync::atomic::AtomicU64,
}

impl Faults {
    /// The next `n` writes fail with ENOSPC.
    pub fn fail_writes(&self, n: u32) {
        self.fail_writes
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next `n` fdatasyncs fail with EIO.
    pub fn fail_syncs(&self, n: u32) {
        self.fail_syncs
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next fdatasync takes at least `ms` milliseconds (a slow disk).
    pub fn slow_sync(&self, ms: u64) {
        self.slow_sync_ms
            .store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next snapshot takes at least `ms` milliseconds (a large state
    /// on a busy disk).
    pub fn slow_snapshot(&self, ms: u64) {
        self.slow_snapshot_ms
            .store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sleeps as long as [`Faults::slow_snapshot`] asked for, once.
    fn snapshot(&self) {
        let slow = self
            .slow_snapshot_ms
            .swap(0, std::sync::atomic::Ordering::SeqCst);
        if slow > 0 {
            std::thread::sleep(std::time::Duration::from_millis(slow));
        }
    }

    /// How many fdatasyncs (journal commits and snapshots) were asked for.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn take(counter: &std::sync::atomic::AtomicU32) -> bool {
        counter
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
    }

    fn write(&self) -> io::Result<()> {
        if Self::take(&self.fail_writes) {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let slow = self
            .slow_sync_ms
            .swap(0, std::sync::atomic::Ordering::SeqCst);
        if slow > 0 {
            std::thread::sleep(std::time::Duration::from_millis(slow));
        }
        if Self::take(&self.fail_syncs) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        Ok(())
    }
}

/// A shard's open journal.
pub struct Journal {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    shard: usize,
    buf: Vec<u8>,
    /// Bytes of whole, synced records (the file is cut back to this on a
    /// failed write).
    len: u64,
    /// Bytes in the file: the records, then zeros (`commits.rs`).
    allocated: u64,
    /// The last commit's pieces, as written, and where each ends (both
    /// kept for their capacity).
    out: Vec<u8>,
    ends: Vec<usize>,
    poisoned: bool,
    faults: Option<std::sync::Arc<Faults>>,
}

impl Journal {
    /// Frames a record; it is durable after the next [`Journal::commit`].
    pub fn append(&mut self, rec: &Record) {
        frame(rec, &mut self.buf);
    }

    /// Writes what was appended and waits for the disk (group commit: one
    /// fdatasync for a whole batch). Returns whether anything was written.
    ///
    /// On failure the batch's records are dropped (the caller must not
    /// acknowledge them), the file is cut back to its last whole record,
    /// and the journal is poisoned until [`Journal::compact`] succeeds: the
    /// caller's state in memory is then the only complete copy.
    pub fn commit(&mut self) -> Result<bool, CommitError> {
        if self.buf.is_empty() {
            return Ok(false);
        }
        if self.poisoned {
            self.buf.clear();
            return Err(CommitError::Poisoned {
                path: self.path_text(),
            });
        }
        let faults = self.faults.clone();
        let written = faults
            .as_ref()
            .map_or(Ok(()), |f| f.write())
            .and_then(|_| self.write_pieces());
        let result = match written {
            Err(source) => Err(CommitError::Write {
                path: self.path_text(),
                source,
            }),
            Ok(()) => faults
                .as_ref()
                .map_or(Ok(()), |f| f.sync())
                .and_then(|_| self.file.sync_data())
                .map_err(|source| CommitError::Sync {
                    path: self.path_text(),
                    source,
                }),
        };
        match result {
            Ok(()) => {
                self.len += self.written();
                self.buf.clear();
                Ok(true)
            }
            Err(e) => {
                self.buf.clear();
                self.poisoned = true;
                // Cut a partial write off, so a restart (and the next
                // generation) never finds a damaged record mid-file. If even
                // that fails, the torn tail is still the last thing in the
                // file, which load() cuts off with a warning.
                let _ = self.file.set_len(self.len);
                self.allocated = self.len;
                Err(e)
            }
        }
    }

    fn path_text(&self) -> String {
        self.path.display().to_string()
    }

    /// Whether an earlier commit failed and a snapshot must come first.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Bytes in the journal file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the journal holds no record.
    pub fn is_empty(&self) -> bool {
        self.len <= HEADER_LEN as u64
    }

    /// Replaces snapshot and journal with a snapshot of `state`, a new
    /// generation (compaction, and the way out of a poisoned journal). If
    /// it fails, the old files stay as they were and this journal is kept.
    pub fn compact(
        &mut self,
        generation: u64,
        state: impl IntoIterator<Item = Record>,
    ) -> Result<(), StoreError> {
        let fresh = write_snapshot_with(
            &self.dir,
            self.shard,
            generation,
            state,
            self.faults.clone(),
        )?;
        *self = fresh;
        Ok(())
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `shard`'s snapshot atomically (temp file, fsync, rename) and
/// starts an empty journal after it.
pub fn write_snapshot(
    dir: &Path,
    shard: usize,
    generation: u64,
    state: impl IntoIterator<Item = Record>,
) -> Result<Journal, StoreError> {
    write_snapshot_with(dir, shard, generation, state, None)
}

/// [`write_snapshot`] with a fault-injection seam (tests only).
pub fn write_snapshot_with(
    dir: &Path,
    shard: usize,
    generation: u64,
    state: impl IntoIterator<Item = Record>,
    faults: Option<std::sync::Arc<Faults>>,
) -> Result<Journal, StoreError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = rotation::snap_tmp_path(dir, shard);
    let jtmp = dir.join(format!("shard-{shard}.journal.tmp"));
    let r = snapshot_files(
        dir,
        shard,
        generation,
        state,
        faults.as_deref(),
        &tmp,
        &jtmp,
    );
    if r.is_err() {
        // A full disk must not also lose the space of a half-written copy;
        // the old snapshot and journal are untouched.
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(&jtmp);
    }
    let jpath = r?;
    // Written at offsets (`write_pieces`): not O_APPEND, which would ignore them.
    let file = OpenOptions::new()
        .write(true)
        .open(&jpath)
        .map_err(io_err(&jpath))?;
    Ok(Journal {
        file,
        path: jpath,
        dir: dir.to_path_buf(),
        shard,
        buf: Vec::new(),
        len: HEADER_LEN as u64,
        allocated: HEADER_LEN as u64,
        out: Vec::new(),
        ends: Vec::new(),
        poisoned: false,
        faults,
    })
}

fn snapshot_files(
    dir: &Path,
    shard: usize,
    generation: u64,
    state: impl IntoIterator<Item = Record>,
    faults: Option<&Faults>,
    tmp: &Path,
    jtmp: &Path,
) -> Result<PathBuf, StoreError> {
    let final_path = snap_path(dir, shard);
    let state = state.into_iter().map(Ok);
    rotation::write_snapshot_file(tmp, generation, state, faults)?;
    // The new journal must exist (empty) before the snapshot that it follows
    // becomes visible, so a crash never pairs a new snapshot with old records.
    let jpath = journal_path(dir, shard);
    let mut jf = File::create(jtmp).map_err(io_err(jtmp))?;
    jf.write_all(&header(JOURNAL2_MAGIC, generation))
        .map_err(io_err(jtmp))?;
    jf.sync_all().map_err(io_err(jtmp))?;
    drop(jf);
    fs::rename(tmp, &final_path).map_err(io_err(&final_path))?;
    fs::rename(jtmp, &jpath).map_err(io_err(&jpath))?;
    // A rotation this snapshot replaces (its records are in the state).
    match fs::remove_file(rotation::next_journal_path(dir, shard)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(dir)(e)),
        _ => {}
    }
    sync_dir(dir).map_err(io_err(dir))?;
    Ok(jpath)
}

/// Records the epoch's start (RFC 6887 §8.5), durably.
pub fn write_epoch(dir: &Path, start: Millis) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join("epoch");
    let tmp = dir.join("epoch.tmp");
    let mut b = header(EPOCH_MAGIC, start).to_vec();
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&b)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir).map_err(io_err(dir))
}

/// Moves every state file into `dir/discarded-<ms>/`; returns that folder.
pub fn discard(dir: &Path, now: Millis) -> Result<Option<PathBuf>, StoreError> {
    let files = state_files(dir)?;
    if files.is_empty() {
        return Ok(None);
    }
    let aside = dir.join(format!("discarded-{now}"));
    fs::create_dir_all(&aside).map_err(io_err(&aside))?;
    for f in files {
        let to = aside.join(f.file_name().unwrap_or_default());
        fs::rename(&f, &to).map_err(io_err(&f))?;
    }
    sync_dir(dir).map_err(io_err(dir))?;
    Ok(Some(aside))
}

/// Undoes [`discard`]: the files of a start that did not happen are
/// deleted and those moved `aside` come back, so a start that failed after
/// `--discard-state` leaves the state as it found it.
pub fn undiscard(dir: &Path, aside: &Path) -> Result<(), StoreError> {
    for f in state_files(dir)? {
        fs::remove_file(&f).map_err(io_err(&f))?;
    }
    for f in state_files(aside)? {
        let to = dir.join(f.file_name().unwrap_or_default());
        fs::rename(&f, &to).map_err(io_err(&f))?;
    }
    fs::remove_dir(aside).map_err(io_err(aside))?;
    sync_dir(dir).map_err(io_err(dir))
}

/// Deletes the files of shards `keep..` (after a change of shard count,
/// once the current shards have written their snapshots).
pub fn remove_stale(dir: &Path, keep: usize) -> Result<(), StoreError> {
    for f in state_files(dir)? {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if let Some(idx) = shard_index(&name) {
            if idx >= keep {
                fs::remove_file(&f).map_err(io_err(&f))?;
            }
        }
    }
    Ok(())
}

fn shard_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("shard-")?;
    let (n, ext) = rest.split_once('.')?;
    matches!(ext, "snap" | "journal" | "journal.next").then(|| n.parse().ok())?
}

fn state_files(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "epoch" || shard_index(name).is_some() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Everything recovered from the state directory.
#[derive(Debug, Default)]
pub struct Loaded {
    /// When the epoch began, if the state was recovered.
    pub epoch_start: Option<Millis>,
    /// Blocks held, by (address, first port).
    pub blocks: HashMap<(Ipv4Addr, u16), (IpAddr, Block, Millis)>,
    /// Live mappings.
    pub mappings: HashMap<MappingKey, Mapping>,
    /// Past holdings.
    pub history: Vec<Holder>,
    /// Things the operator should know (a torn tail cut off).
    pub warnings: Vec<String>,
    /// Records read.
    pub records: u64,
}

impl Loaded {
    /// Applies one record (a replay: later records win).
    pub fn apply(&mut self, rec: Record) {
        self.records += 1;
        match rec {
            Record::Block {
                subscriber,
                block,
                since,
            } => {
                self.blocks
                    .insert((block.addr, block.first), (subscriber, block, since));
            }
            Record::BlockGone { block, .. } => {
                self.blocks.remove(&(block.addr, block.first));
            }
            Record::History(h) => self.history.push(h),
            Record::Mapping(m) => {
                self.mappings.insert(m.key(), m);
            }
            Record::Gone(k) => {
                self.mappings.remove(&k);
            }
        }
    }

    /// True when nothing was recovered.
    pub fn is_empty(&self) -> bool {
        self.epoch_start.is_none() && self.blocks.is_empty() && self.mappings.is_empty()
    }
}

/// Reads the state directory. Files are applied snapshot then journal, per
/// shard, oldest generation first, so newer facts win.
pub fn load(dir: &Path) -> Result<Loaded, StoreError> {
    let mut state = Loaded::default();
    let files = state_files(dir)?;
    let corrupt = |file: &Path, offset: u64, reason: &str| StoreError::Corrupt {
        file: file.display().to_string(),
        dir: dir.display().to_string(),
        offset,
        reason: reason.to_string(),
    };
    // Per shard: generation, index, snapshot, journal, next journal.
    type Set = (
        u64,
        usize,
        Option<PathBuf>,
        Option<PathBuf>,
        Option<PathBuf>,
    );
    let mut sets: Vec<Set> = Vec::new();
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "epoch" {
            let mut b = Vec::new();
            File::open(f)
                .and_then(|mut h| h.read_to_end(&mut b))
                .map_err(io_err(f))?;
            if b.len() != HEADER_LEN + 4
                || &b[..8] != EPOCH_MAGIC
                || crc32fast::hash(&b[..HEADER_LEN]).to_be_bytes() != b[HEADER_LEN..]
            {
                return Err(corrupt(f, 0, "bad epoch file"));
            }
            let mut g = [0u8; 8];
            g.copy_from_slice(&b[8..16]);
            state.epoch_start = Some(u64::from_be_bytes(g));
            continue;
        }
        let Some(idx) = shard_index(name) else {
            continue;
        };
        let entry = match sets.iter_mut().find(|s| s.1 == idx) {
            Some(e) => e,
            None => {
                sets.push((0, idx, None, None, None));
                sets.last_mut().ok_or_else(|| corrupt(f, 0, "internal"))?
            }
        };
        if name.ends_with(".snap") {
            entry.2 = Some(f.clone());
        } else if name.ends_with(".journal.next") {
            entry.4 = Some(f.clone());
        } else {
            entry.3 = Some(f.clone());
        }
    }
    // Read each set's generation from its snapshot (or journal) header.
    let mut bufs = Vec::new();
    for (generation, _, snap, journal, next) in &mut sets {
        let read = |p: &Option<PathBuf>| -> Result<Option<(PathBuf, Vec<u8>)>, StoreError> {
            match p {
                None => Ok(None),
                Some(p) => {
                    let mut b = Vec::new();
                    File::open(p)
                        .and_then(|mut h| h.read_to_end(&mut b))
                        .map_err(io_err(p))?;
                    Ok(Some((p.clone(), b)))
                }
            }
        };
        let s = read(snap)?;
        let j = read(journal)?;
        let n = read(next)?;
        let head = s.as_ref().or(j.as_ref());
        if let Some((p, b)) = head {
            *generation = header_generation(b)
                .ok_or_else(|| corrupt(p, 0, "file shorter than its header"))?;
        }
        bufs.push((*generation, s, j, n));
    }
    bufs.sort_by_key(|(g, _, _, _)| *g);
    for (generation, snap, journal, next) in bufs {
        if let Some((p, b)) = snap {
            check_header(&p, &b, SNAP_MAGIC, generation).map_err(|r| corrupt(&p, 0, &r))?;
            apply_file(&p, &b, false, &mut state).map_err(|(off, r)| corrupt(&p, off, &r))?;
        }
        // The journal, then a compaction's next journal (rotation.rs): the
        // records since that compaction began.
        for (file, next) in [(journal, false), (next, true)] {
            let Some((p, b)) = file else { continue };
            if older_generation(&b, generation) {
                // A crash between the two renames of a compaction: the new
                // snapshot holds every record of the older journal.
                state.warnings.push(format!(
                    "{}: older than its snapshot (a compaction was interrupted); ignored",
                    p.display()
                ));
                continue;
            }
            // A next journal is of its own generation, the snapshot's or later.
            let own = if next {
                header_generation(&b).unwrap_or(generation)
            } else {
                generation
            };
            let magic = if b.get(..8) == Some(&JOURNAL_MAGIC[..]) {
                JOURNAL_MAGIC
            } else {
                JOURNAL2_MAGIC
            };
            check_header(&p, &b, magic, own).map_err(|r| corrupt(&p, 0, &r))?;
            apply_file(&p, &b, true, &mut state).map_err(|(off, r)| corrupt(&p, off, &r))?;
        }
    }
    if state.epoch_start.is_none() && (!state.mappings.is_empty() || !state.blocks.is_empty()) {
        return Err(corrupt(
            &dir.join("epoch"),
            0,
            "state files without an epoch file",
        ));
    }
    Ok(state)
}

/// Whether a journal's header names a generation older than `generation`.
fn older_generation(b: &[u8], generation: u64) -> bool {
    let magic = b.get(..8);
    [JOURNAL_MAGIC, JOURNAL2_MAGIC]
        .iter()
        .any(|m| magic == Some(&m[..]))
        && header_generation(b).is_some_and(|g| g < generation)
}

/// The generation a state file's header names.
fn header_generation(b: &[u8]) -> Option<u64> {
    let g: [u8; 8] = b.get(8..HEADER_LEN)?.try_into().ok()?;
    Some(u64::from_be_bytes(g))
}

fn check_header(_p: &Path, b: &[u8], magic: &[u8; 8], generation: u64) -> Result<(), String> {
    if b.len() < HEADER_LEN || &b[..8] != magic {
        return Err("not a pcpd state file (bad header)".into());
    }
    if b[8..16] != generation.to_be_bytes() {
        return Err("snapshot and journal are from different generations".into());
    }
    Ok(())
}

/// A torn last record of a journal: where it starts and why it is torn.
struct Torn {
    at: usize,
    reason: &'static str,
}

/// Applies the records of one file. In a journal of the first format, a
/// damaged *last* record is a torn write (the commit never finished, so no
/// reply was sent): it is returned for the caller to cut off. Anywhere
/// else, damage is an error. A journal of pieces (format 2, `commits.rs`)
/// is read piece by piece, with the same rule for its last piece.
fn read_records(
    b: &[u8],
    journal: bool,
    state: &mut Loaded,
) -> Result<Option<Torn>, (u64, String)> {
    if journal && b.get(..8) == Some(&JOURNAL2_MAGIC[..]) {
        return commits::read_pieces(b, state);
    }
    read_frames(b, HEADER_LEN..b.len(), journal, state)
}

/// Applies the records framed in `b[range]`; with `journal`, a damaged
/// record that reaches the end of `b` is a torn write.
fn read_frames(
    b: &[u8],
    range: std::ops::Range<usize>,
    journal: bool,
    state: &mut Loaded,
) -> Result<Option<Torn>, (u64, String)> {
    let mut at = range.start;
    let b = &b[..range.end];
    while at < b.len() {
        let rest = &b[at..];
        // Torn tail: nothing valid could follow.
        let torn = |reason: &'static str, end: usize| {
            (journal && end >= b.len()).then_some(Torn { at, reason })
        };
        if rest.len() < 8 {
            return torn("truncated frame", b.len())
                .map(Some)
                .ok_or((at as u64, "truncated record frame".into()));
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let end = at.saturating_add(8).saturating_add(len);
        if len > MAX_RECORD || end > b.len() {
            return torn("record runs past the end", b.len())
                .filter(|_| len <= MAX_RECORD)
                .map(Some)
                .ok_or((
                    at as u64,
                    format!("record length {len} runs past the end of the file"),
                ));
        }
        let body = &b[at + 8..end];
        let rec = (crc32fast::hash(body) == crc)
            .then(|| codec::decode(body))
            .flatten();
        match rec {
            Some(r) => state.apply(r),
            None => {
                return torn("checksum mismatch", end)
                    .map(Some)
                    .ok_or((at as u64, "checksum mismatch or unreadable record".into()))
            }
        }
        at = end;
    }
    Ok(None)
}

/// What [`decode_file`] read.
#[derive(Debug, Default)]
pub struct Decoded {
    /// The state the records describe.
    pub state: Loaded,
    /// Where a torn last record starts (journals only).
    pub torn_at: Option<u64>,
}

/// Decodes one snapshot (`journal` false) or journal file held in memory,
/// as [`load`] does, without touching any file: the records, or the offset
/// of the damage and what it is.
pub fn decode_file(b: &[u8], journal: bool) -> Result<Decoded, (u64, String)> {
    let magics: &[&[u8; 8]] = if journal {
        &[JOURNAL_MAGIC, JOURNAL2_MAGIC]
    } else {
        &[SNAP_MAGIC]
    };
    if b.len() < HEADER_LEN || !magics.iter().any(|m| b[..8] == m[..]) {
        return Err((0, "not a pcpd state file (bad header)".into()));
    }
    let mut d = Decoded::default();
    d.torn_at = read_records(b, journal, &mut d.state)?.map(|t| t.at as u64);
    Ok(d)
}

/// Reads one file's records into `state`, cutting a torn tail off the
/// file (with a warning) so new records follow valid ones.
fn apply_file(p: &Path, b: &[u8], journal: bool, state: &mut Loaded) -> Result<(), (u64, String)> {
    if let Some(t) = read_records(b, journal, state)? {
        let warning = format!(
            "{}: cut off a torn last record at byte {} ({}); it was never acknowledged",
            p.display(),
            t.at,
            t.reason
        );
        truncate_to(p, t.at, state, warning);
    }
    Ok(())
}

fn truncate_to(p: &Path, at: usize, state: &mut Loaded, warning: String) {
    // Cut the torn record so new records follow valid ones.
    let r = OpenOptions::new().write(true).open(p).and_then(|f| {
        f.set_len(at as u64)?;
        f.sync_all()
    });
    match r {
        Ok(()) => state.warnings.push(warning),
        Err(e) => state
            .warnings
            .push(format!("{warning}; truncating failed: {e}")),
    }
}

#[cfg(test)]
mod tests;
