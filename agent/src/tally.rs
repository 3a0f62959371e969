//! Lifetime counters that survive a crash: bytes and chunks ever sent, kept in a small
//! file beside the journal (`<journal>.tally`).
//!
//! They are written with a plain `pwrite` after every chunk and never fsynced: a killed
//! process loses nothing (the page cache keeps the write), a machine crash may lose the
//! last few increments, which is fine for counters. `skyferry-agent status` prints them;
//! comparing bytes sent with bytes stored shows what interruptions cost in re-sends.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"SKYTAL01";

/// The counters, in file order after the magic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub sent_bytes: u64,
    pub sent_chunks: u64,
}

pub struct Tally {
    file: Mutex<File>,
    sent_bytes: AtomicU64,
    sent_chunks: AtomicU64,
}

/// `<journal>.tally`.
pub fn path_for(journal: &Path) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(".tally");
    PathBuf::from(p)
}

/// Reads the totals; a missing or unreadable file reads as zero.
pub fn read(journal: &Path) -> Totals {
    let mut buf = [0u8; 24];
    let ok = File::open(path_for(journal))
        .and_then(|f| f.read_exact_at(&mut buf, 0))
        .is_ok();
    if !ok || &buf[..8] != MAGIC {
        return Totals::default();
    }
    let at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap_or([0; 8]));
    Totals {
        sent_bytes: at(8),
        sent_chunks: at(16),
    }
}

impl Tally {
    pub fn open(journal: &Path) -> std::io::Result<Tally> {
        let start = read(journal);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path_for(journal))?;
        let tally = Tally {
            file: Mutex::new(file),
            sent_bytes: AtomicU64::new(start.sent_bytes),
            sent_chunks: AtomicU64::new(start.sent_chunks),
        };
        tally.persist()?;
        Ok(tally)
    }

    /// Counts one chunk sent (blocking: a small pwrite).
    pub fn add_chunk(&self, bytes: u64) {
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.sent_chunks.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.persist() {
            tracing::debug!(error = %e, "cannot update the tally file");
        }
    }

    fn persist(&self) -> std::io::Result<()> {
        let file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Read the totals under the lock so the last write carries the latest values.
        let mut buf = [0u8; 24];
        buf[..8].copy_from_slice(MAGIC);
        buf[8..16].copy_from_slice(&self.sent_bytes.load(Ordering::Relaxed).to_le_bytes());
        buf[16..24].copy_from_slice(&self.sent_chunks.load(Ordering::Relaxed).to_le_bytes());
        file.write_all_at(&buf, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("j.sqlite");
        assert_eq!(read(&journal), Totals::default());
        let t = Tally::open(&journal).unwrap();
        t.add_chunk(100);
        t.add_chunk(50);
        drop(t);
        let t = Tally::open(&journal).unwrap();
        t.add_chunk(1);
        assert_eq!(
            read(&journal),
            Totals {
                sent_bytes: 151,
                sent_chunks: 3
            }
        );
    }
}
