//! Compaction beside the journal: the snapshot of a large shard takes
//! seconds to write and fsync, and commits must not wait for it.
//!
//! ```text
//!  rotate(g+1):      shard-N.snap (g)   shard-N.journal (g)   shard-N.journal.next (g+1)  ◀ commits
//!  write_snapshot_file (another thread):  shard-N.snap.tmp (g+1), fsynced
//!  complete_rotation: rename snap.tmp → snap, journal.next → journal, fsync the directory
//! ```
//!
//! A crash at any point loses nothing ([`crate::load`]): before the first
//! rename the old snapshot, the old journal and the next journal are read
//! in that order; between the renames the old journal is older than the
//! snapshot and ignored, and the next journal follows the snapshot. A
//! synchronous compaction ([`Journal::compact`]) replaces all of them and
//! removes a next journal it leaves behind.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{
    header, io_err, journal_path, snap_path, sync_dir, Faults, Journal, Record, StoreError,
    HEADER_LEN, JOURNAL2_MAGIC,
};

/// The journal of the generation a background compaction is writing the
/// snapshot of.
pub(crate) fn next_journal_path(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}.journal.next"))
}

/// Where a snapshot is written before it is renamed into place.
pub(crate) fn snap_tmp_path(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}.snap.tmp"))
}

/// What a background snapshot needs: where, for which shard, and the
/// fault seam (tests).
#[derive(Clone)]
pub struct SnapshotTarget {
    dir: PathBuf,
    shard: usize,
    faults: Option<std::sync::Arc<Faults>>,
}

impl Journal {
    /// Starts generation `generation`'s journal (`shard-N.journal.next`)
    /// and sends every later commit there, so that the snapshot of the
    /// state up to now can be written beside it
    /// ([`SnapshotTarget::write`]) and put in place with
    /// [`Journal::complete_rotation`]. Returns where to write it.
    pub fn rotate(&mut self, generation: u64) -> Result<SnapshotTarget, StoreError> {
        let path = next_journal_path(&self.dir, self.shard);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.write_all(&header(JOURNAL2_MAGIC, generation))?;
            f.sync_all()?;
            sync_dir(&self.dir)?;
            Ok(f)
        })();
        let file = match written {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(io_err(&path)(e));
            }
        };
        self.file = file;
        self.path = path;
        self.len = HEADER_LEN as u64;
        self.allocated = HEADER_LEN as u64;
        Ok(SnapshotTarget {
            dir: self.dir.clone(),
            shard: self.shard,
            faults: self.faults.clone(),
        })
    }

    /// Whether commits go to a next journal whose snapshot is not in place
    /// (a rotation not completed; the next compaction is synchronous).
    pub fn is_rotated(&self) -> bool {
        self.path == next_journal_path(&self.dir, self.shard)
    }

    /// Puts the snapshot written by [`SnapshotTarget::write`] in place and
    /// makes the next journal the journal. On failure the files stay as
    /// they were (a rotation not completed).
    pub fn complete_rotation(&mut self, snapshot: &Path) -> Result<(), StoreError> {
        let snap = snap_path(&self.dir, self.shard);
        let journal = journal_path(&self.dir, self.shard);
        if let Err(e) = fs::rename(snapshot, &snap) {
            let _ = fs::remove_file(snapshot);
            return Err(io_err(&snap)(e));
        }
        fs::rename(&self.path, &journal).map_err(io_err(&journal))?;
        self.path = journal;
        sync_dir(&self.dir).map_err(io_err(&self.dir))
    }
}

impl SnapshotTarget {
    /// Writes `state` as generation `generation`'s snapshot to a temporary
    /// file and fsyncs it; returns the file for
    /// [`Journal::complete_rotation`]. Removes it again on failure. An
    /// `Err` among the records abandons the snapshot (the shard handing
    /// its state over in slices stopped before the end).
    pub fn write(
        &self,
        generation: u64,
        state: impl IntoIterator<Item = std::io::Result<Record>>,
    ) -> Result<PathBuf, StoreError> {
        let tmp = snap_tmp_path(&self.dir, self.shard);
        let r = write_snapshot_file(&tmp, generation, state, self.faults.as_deref());
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r.map(|()| tmp)
    }
}

/// Writes a whole snapshot file at `path` and fsyncs it.
pub(crate) fn write_snapshot_file(
    path: &Path,
    generation: u64,
    state: impl IntoIterator<Item = std::io::Result<Record>>,
    faults: Option<&Faults>,
) -> Result<(), StoreError> {
    let injected = |r: std::io::Result<()>| r.map_err(io_err(path));
    let mut buf = Vec::with_capacity(1 << 20);
    buf.extend_from_slice(&header(crate::SNAP_MAGIC, generation));
    let mut f = File::create(path).map_err(io_err(path))?;
    // Written back a MiB at a time, so the fsync below (and the journal
    // commits meanwhile) never wait behind the whole file (behind.rs).
    let mut behind = crate::WriteBehind::new(0);
    let mut len = 0u64;
    for rec in state {
        crate::frame(&rec.map_err(io_err(path))?, &mut buf);
        if buf.len() as u64 >= crate::WRITE_BEHIND {
            f.write_all(&buf).map_err(io_err(path))?;
            len += buf.len() as u64;
            behind.wrote(&f, len);
            buf.clear();
        }
    }
    if let Some(f) = faults {
        f.snapshot();
    }
    injected(faults.map_or(Ok(()), Faults::write))?;
    f.write_all(&buf).map_err(io_err(path))?;
    injected(faults.map_or(Ok(()), Faults::sync))?;
    f.sync_all().map_err(io_err(path))
}
