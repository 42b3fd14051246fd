//! A journal's commits, written over preallocated zeros (journal format 2,
//! `PCPJRNL2`).
//!
//! A commit's fdatasync is cheapest when it flushes data only: appending
//! changes the file's size (and blocks), which ext4 makes durable with a
//! commit of its own journal on every fdatasync. So the file is grown
//! ahead with zeros, [`PREALLOC`] bytes at a time within the commit that
//! needs them, and commits write over the zeros; about a tenth of a
//! shard's time under a flood of creates went to the metadata. Short of
//! space, commits append as before.
//!
//! Over zeros, a crash mid-write can leave any of the write's pages on
//! disk and not others, so a commit is framed as one or more pieces of at
//! most [`COMMIT_MAX`] bytes, each made durable before the next is
//! written:
//!
//! ```text
//! piece  = body length (u32 BE) | body CRC-32 (u32 BE) | CRC-32 of the
//!          8 bytes before (u32 BE) | body: records framed as in format 1
//! ```
//!
//! The records end at the first zero piece header when nothing but zeros
//! follows. A piece that is damaged, or a zero header with data after it,
//! is a torn commit (never acknowledged) when no whole piece follows it and
//! nothing but zeros lies past the longest piece it could be: the caller
//! cuts it off with a warning. Otherwise it is damage to acknowledged
//! records, and an error, as a damaged record before the end of a
//! format-1 journal is.

use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use crate::{read_frames, Journal, Loaded, Torn, HEADER_LEN};

/// The journal grows by this many bytes of zeros at a time.
pub(crate) const PREALLOC: u64 = 1 << 20;
/// Body bytes of one piece at most (one fdatasync each).
pub(crate) const COMMIT_MAX: usize = 256 * 1024;
/// A piece's header: body length, body CRC, the header's own CRC.
const PIECE_HEADER: usize = 12;
/// Zeros for growing a journal.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Frames the records in `records` (each framed as in format 1) as pieces
/// into `out`, and where each piece ends in `out` into `ends`.
pub(crate) fn pieces(records: &[u8], out: &mut Vec<u8>, ends: &mut Vec<usize>) {
    out.clear();
    ends.clear();
    let mut start = 0;
    while start < records.len() {
        // Whole records, up to COMMIT_MAX bytes (a record is far smaller).
        let mut end = start;
        while end < records.len() {
            let Some(&[a, b, c, d]) = records.get(end..end + 4) else {
                end = records.len(); // never: records are framed whole
                break;
            };
            let next = end + 8 + u32::from_be_bytes([a, b, c, d]) as usize;
            if next - start > COMMIT_MAX && end > start {
                break;
            }
            end = next;
        }
        let body = &records[start..end.min(records.len())];
        let mut head = [0u8; PIECE_HEADER];
        head[..4].copy_from_slice(&(body.len() as u32).to_be_bytes());
        head[4..8].copy_from_slice(&crc32fast::hash(body).to_be_bytes());
        let own = crc32fast::hash(&head[..8]);
        head[8..].copy_from_slice(&own.to_be_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(body);
        ends.push(out.len());
        start = end;
    }
}

impl Journal {
    /// Writes the commit's pieces after the records, growing the zeros
    /// first where they run out; every piece but the last is made durable
    /// before the next is written (the caller syncs the last).
    pub(crate) fn write_pieces(&mut self) -> io::Result<()> {
        let mut ends = std::mem::take(&mut self.ends);
        pieces(&self.buf, &mut self.out, &mut ends);
        let written = self.write_out(&ends);
        self.ends = ends;
        written
    }

    /// Writes `self.out`, pieces ending at `ends`.
    fn write_out(&mut self, ends: &[usize]) -> io::Result<()> {
        let mut from = 0;
        for (i, &end) in ends.iter().enumerate() {
            let at = self.len + from as u64;
            let stop = self.len + end as u64;
            if stop > self.allocated {
                self.grow(stop);
            }
            self.file.write_all_at(&self.out[from..end], at)?;
            self.allocated = self.allocated.max(stop);
            if i + 1 < ends.len() {
                self.file.sync_data()?;
            }
            from = end;
        }
        Ok(())
    }

    /// Grows the zeros past `stop` by about [`PREALLOC`]. Short of space,
    /// it grows nothing: the commit's own write then extends the file (and
    /// its fdatasync writes the metadata too, as appending always did), so
    /// a nearly full disk takes commits as long as they fit.
    fn grow(&mut self, stop: u64) {
        let grown = (stop + PREALLOC).next_multiple_of(ZEROS.len() as u64);
        let mut z = self.allocated;
        while z < grown {
            let n = (grown - z).min(ZEROS.len() as u64) as usize;
            if self.file.write_all_at(&ZEROS[..n], z).is_err() {
                // Give back what was grown: the space is short already.
                let _ = self.file.set_len(self.allocated);
                return;
            }
            z += n as u64;
        }
        self.allocated = grown;
    }

    /// Bytes the last commit took in the file (pieces with their headers).
    pub(crate) fn written(&self) -> u64 {
        self.out.len() as u64
    }
}

/// The body of the piece whose header is at `at`, if header and body are
/// whole (both checksums hold).
fn piece_at(b: &[u8], at: usize) -> Option<Range<usize>> {
    let head = b.get(at..at.checked_add(PIECE_HEADER)?)?;
    let word = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let (len, crc, own) = (word(0) as usize, word(4), word(8));
    if crc32fast::hash(&head[..8]) != own || len > COMMIT_MAX {
        return None;
    }
    let body = at + PIECE_HEADER..at + PIECE_HEADER + len;
    (crc32fast::hash(b.get(body.clone())?) == crc).then_some(body)
}

/// Applies the records of a format-2 journal, piece by piece.
pub(crate) fn read_pieces(b: &[u8], state: &mut Loaded) -> Result<Option<Torn>, (u64, String)> {
    let mut at = HEADER_LEN;
    while at < b.len() {
        let rest = &b[at..];
        if rest.iter().all(|&x| x == 0) {
            return Ok(None); // the end: zeros not written yet
        }
        let Some(body) = piece_at(b, at) else {
            // A torn piece: what a crash mid-commit leaves is its last
            // piece, any of its pages, then zeros. A whole piece after it,
            // or data past the longest piece, is damage to acknowledged
            // records instead.
            let past = b
                .get(at.saturating_add(PIECE_HEADER + COMMIT_MAX)..)
                .unwrap_or_default();
            let later = (at + 1..b.len()).any(|p| piece_at(b, p).is_some());
            return if later || !past.iter().all(|&x| x == 0) {
                Err((at as u64, "damaged commit before more records".into()))
            } else {
                Ok(Some(Torn {
                    at,
                    reason: "a commit never written whole",
                }))
            };
        };
        // Checked whole: any damage inside is an error, never torn.
        read_frames(b, body.clone(), false, state)?;
        at = body.end;
    }
    Ok(None)
}
