//! The JSON-lines file sink: whole lines only (a write the disk refuses is
//! cut off again), rotation by size or age into `PATH.1` .. `PATH.keep`,
//! and a reopen on SIGHUP so logrotate's `create` works too.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use pcp_store::WriteBehind;

use super::{Writer, REOPEN};

/// `type: file` in `log.nat_sinks`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The file (`-`: standard output).
    pub path: PathBuf,
    /// Rotate when the file reaches this many bytes (0: never).
    #[serde(default)]
    pub rotate_bytes: u64,
    /// Rotate when the file is this many seconds old (0: never).
    #[serde(default)]
    pub rotate_secs: u64,
    /// Rotated files kept (`PATH.1` is the newest).
    #[serde(default = "default_keep")]
    pub keep: u32,
    /// Events queued for this sink before new ones are dropped.
    #[serde(default = "super::default_queue")]
    pub queue: usize,
}

fn default_keep() -> u32 {
    7
}

impl FileSinkConfig {
    /// A file sink at `path` with the defaults.
    pub fn at(path: PathBuf) -> Self {
        FileSinkConfig {
            path,
            rotate_bytes: 0,
            rotate_secs: 0,
            keep: default_keep(),
            queue: super::default_queue(),
        }
    }
}

enum Out {
    Stdout,
    File {
        file: File,
        len: u64,
        opened: Instant,
        /// Written back a MiB at a time, so the journal's commits never
        /// wait behind a burst of log pages (pcp-store's `behind.rs`).
        behind: WriteBehind,
    },
}

pub(super) struct FileWriter {
    cfg: FileSinkConfig,
    name: String,
    out: Out,
    reopen_seen: u64,
    buf: Vec<u8>,
    lost: u64,
    complained: std::sync::Mutex<Option<Instant>>,
}

fn open_append(path: &Path) -> io::Result<Out> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let len = file.metadata()?.len();
    Ok(Out::File {
        file,
        len,
        opened: Instant::now(),
        behind: WriteBehind::new(len),
    })
}

impl FileWriter {
    pub(super) fn open(cfg: &FileSinkConfig, name: String) -> io::Result<Self> {
        let out = if cfg.path.as_os_str() == "-" {
            Out::Stdout
        } else {
            open_append(&cfg.path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cfg.path.display())))?
        };
        Ok(FileWriter {
            cfg: cfg.clone(),
            name,
            out,
            reopen_seen: REOPEN.load(Ordering::Acquire),
            buf: Vec::new(),
            lost: 0,
            complained: std::sync::Mutex::new(None),
        })
    }

    /// Rotation by size or age, and the reopen SIGHUP asks for.
    fn maintain(&mut self) {
        let Out::File { len, opened, .. } = &self.out else {
            return;
        };
        let by_size = self.cfg.rotate_bytes > 0 && *len >= self.cfg.rotate_bytes;
        let by_age = self.cfg.rotate_secs > 0 && opened.elapsed().as_secs() >= self.cfg.rotate_secs;
        let hup = REOPEN.load(Ordering::Acquire);
        if by_size || by_age {
            self.rotate();
        } else if hup != self.reopen_seen {
            self.reopen_seen = hup;
            self.reopen();
        }
    }

    fn rotated(&self, i: u32) -> PathBuf {
        let mut p = self.cfg.path.clone().into_os_string();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) {
        let keep = self.cfg.keep.max(1);
        let _ = std::fs::remove_file(self.rotated(keep));
        for i in (1..keep).rev() {
            let _ = std::fs::rename(self.rotated(i), self.rotated(i + 1));
        }
        if let Err(e) = std::fs::rename(&self.cfg.path, self.rotated(1)) {
            tracing::error!(sink = %self.name, "NAT log rotation: {e}");
        }
        self.reopen();
    }

    fn reopen(&mut self) {
        match open_append(&self.cfg.path) {
            Ok(out) => self.out = out,
            Err(e) => {
                tracing::error!(sink = %self.name, "NAT log reopen: {e}; still writing the old file")
            }
        }
    }
}

impl Writer for FileWriter {
    fn write(&mut self, events: &[super::Record]) -> u64 {
        self.maintain();
        self.buf.clear();
        for e in events {
            let at = self.buf.len();
            if e.write_json(&mut self.buf).is_ok() {
                self.buf.push(b'\n');
            } else {
                self.buf.truncate(at);
            }
        }
        let result = match &mut self.out {
            Out::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&self.buf).and_then(|_| out.flush())
            }
            Out::File {
                file, len, behind, ..
            } => match file.write_all(&self.buf) {
                Ok(()) => {
                    *len += self.buf.len() as u64;
                    behind.wrote(file, *len);
                    Ok(())
                }
                Err(e) => {
                    // Cut a partial write off: no torn line.
                    let _ = file.set_len(*len);
                    Err(e)
                }
            },
        };
        match result {
            Ok(()) => 0,
            Err(e) => {
                let n = events.len() as u64;
                self.lost += n;
                let lost = self.lost;
                super::complain(&self.complained, || {
                    tracing::error!(sink = %self.name, "NAT event log: {e}; {lost} lines lost so far");
                });
                n
            }
        }
    }

    fn tick(&mut self) {
        self.maintain();
    }
}
