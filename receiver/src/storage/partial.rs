//! Partial files and their chunk logs: what lets a file resume after an interruption on
//! either side (docs/protocol.md §8).
//!
//! ```text
//! <root>/.skyferry/partial/<agent>/<key>.part   bytes received so far (sparse)
//! <root>/.skyferry/partial/<agent>/<key>.log    header, then one record per chunk written
//! ```
//!
//! Memory per partial does not depend on the file's size: which chunks are held is a
//! range set ([`ChunkSet`]), and the per-chunk hashes stay in the log on disk (read back,
//! streamed, only to re-check chunks after a whole-file mismatch). A 1 TiB offer costs
//! what a 1 KiB one costs until chunks arrive.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use skyferry_common::chunk::{hash_bytes, ChunkLayout, ChunkSet};
use skyferry_common::protocol::{ChunkRange, Hash, Offer};
use skyferry_common::relpath::RelPath;
use skyferry_common::session::PartialState;

use super::{remove_if_exists, StorageError, Sweep};

/// Version byte of the partial log format.
const LOG_VERSION: u8 = 1;
const LOG_MAGIC: &[u8; 4] = b"SKYP";
/// Log header before the path: magic, version, size, mtime_ns, file_hash, chunk_size,
/// path length.
const LOG_HEADER: usize = 4 + 1 + 8 + 8 + 32 + 4 + 2;
/// One chunk record: index u32 BE, BLAKE3 of the bytes written.
const LOG_RECORD: usize = 36;

/// A file being received.
pub struct Partial {
    pub(super) file: File,
    log: File,
    pub(super) part_path: PathBuf,
    pub(super) log_path: PathBuf,
    pub(super) rel: RelPath,
    pub(super) state: PartialState,
}

impl Partial {
    /// Opens the partial at `part`/`log` for `offer`, reusing a log of the same content
    /// or starting a fresh one. Whatever this call created is removed again if it fails.
    pub(super) fn open(
        part: PathBuf,
        log: PathBuf,
        rel: &RelPath,
        offer: &Offer,
    ) -> Result<Partial, StorageError> {
        let existing = read_log(&log).ok().filter(|s| {
            s.size == offer.size
                && s.file_hash == offer.file_hash
                && s.chunk_size == offer.chunk_size
        });
        let (state, fresh) = match existing {
            Some(found) if part.is_file() => (found, false),
            _ => {
                let state = PartialState {
                    size: offer.size,
                    mtime_ns: offer.mtime_ns,
                    file_hash: offer.file_hash,
                    chunk_size: offer.chunk_size,
                    have: ChunkSet::new(ChunkLayout::new(offer.size, offer.chunk_size).count()),
                };
                (state, true)
            }
        };
        let opened = (|| {
            if fresh {
                write_log(&log, &state, rel, std::iter::empty())?;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&part)
                .map_err(|e| StorageError::io(format!("opening {}", part.display()), e))?;
            file.set_len(offer.size)
                .map_err(|e| StorageError::io(format!("sizing {}", part.display()), e))?;
            let log_file = OpenOptions::new()
                .append(true)
                .open(&log)
                .map_err(|e| StorageError::io(format!("opening {}", log.display()), e))?;
            Ok((file, log_file))
        })();
        match opened {
            Ok((file, log_file)) => Ok(Partial {
                file,
                log: log_file,
                part_path: part,
                log_path: log,
                rel: rel.clone(),
                state,
            }),
            Err(e) => {
                if fresh {
                    let _ = fs::remove_file(&part);
                    let _ = fs::remove_file(&log);
                    let _ = fs::remove_file(log.with_extension("log.tmp"));
                }
                Err(e)
            }
        }
    }

    /// Writes a verified chunk and records it.
    pub fn write_chunk(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| StorageError::io(format!("writing {}", self.part_path.display()), e))?;
        let hash = hash_bytes(data);
        self.log
            .write_all(&record(index, &hash))
            .map_err(|e| StorageError::io(format!("writing {}", self.log_path.display()), e))?;
        self.state.have.insert(index);
        Ok(())
    }

    /// Re-hashes every recorded chunk on disk, streaming the log; forgets the ones that
    /// no longer match and rewrites the log with the records that do. Returns the bad
    /// chunks. A chunk counts as held when one of its records matches its bytes (a chunk
    /// received twice has two records).
    pub(super) fn recheck_chunks(&mut self) -> Result<ChunkSet, StorageError> {
        let layout = ChunkLayout::new(self.state.size, self.state.chunk_size);
        let count = layout.count();
        let mut good = ChunkSet::new(count);
        let mut mismatched = ChunkSet::new(count);
        let tmp = self.log_path.with_extension("log.tmp");
        let write_err = |e| StorageError::io(format!("writing {}", tmp.display()), e);
        let read_err = |e| StorageError::io(format!("reading {}", self.log_path.display()), e);
        let mut out = BufWriter::new(File::create(&tmp).map_err(write_err)?);
        out.write_all(&header(&self.state, &self.rel))
            .map_err(write_err)?;
        let mut records = LogReader::open(&self.log_path).map_err(read_err)?;
        let mut buf = Vec::new();
        while let Some((index, expected)) = records.next_record().map_err(read_err)? {
            let Some(len) = layout.len(index) else {
                continue;
            };
            buf.resize(len as usize, 0);
            self.file
                .read_exact_at(&mut buf, layout.offset(index))
                .map_err(|e| {
                    StorageError::io(format!("reading {}", self.part_path.display()), e)
                })?;
            if hash_bytes(&buf) == expected {
                good.insert(index);
                out.write_all(&record(index, &expected))
                    .map_err(write_err)?;
            } else {
                mismatched.insert(index);
            }
        }
        let mut bad = ChunkSet::new(count);
        for r in mismatched.ranges() {
            for i in (r.start..r.end).filter(|&i| !good.contains(i)) {
                bad.insert(i);
            }
        }
        if bad.present() == 0 {
            drop(out);
            let _ = fs::remove_file(&tmp);
            return Ok(bad);
        }
        out.into_inner()
            .map_err(|e| write_err(e.into_error()))?
            .sync_all()
            .map_err(write_err)?;
        fs::rename(&tmp, &self.log_path)
            .map_err(|e| StorageError::io(format!("renaming {}", tmp.display()), e))?;
        self.log = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .map_err(|e| StorageError::io(format!("opening {}", self.log_path.display()), e))?;
        self.state.have = good;
        Ok(bad)
    }

    /// Deletes the partial's bytes and log (after a storage error: the next offer starts
    /// the file again from the source).
    pub fn discard(&self) {
        let _ = fs::remove_file(&self.part_path);
        let _ = fs::remove_file(&self.log_path);
    }

    /// Bytes of the file not received yet.
    pub fn missing_bytes(&self) -> u64 {
        let layout = ChunkLayout::new(self.state.size, self.state.chunk_size);
        self.state.have.missing_bytes(&layout)
    }
}

/// A short human list of chunk ranges (`[2], [7..9]`, then `and more (N in all)`), for
/// reasons that must stay short whatever the number of chunks.
pub(super) fn describe(set: &ChunkSet) -> String {
    const SHOWN: usize = 8;
    let ranges: Vec<ChunkRange> = set.ranges().take(SHOWN + 1).collect();
    let mut text = ranges
        .iter()
        .take(SHOWN)
        .map(|r| match r.end - r.start {
            1 => format!("[{}]", r.start),
            _ => format!("[{}..{}]", r.start, r.end - 1),
        })
        .collect::<Vec<_>>()
        .join(", ");
    if ranges.len() > SHOWN {
        text.push_str(&format!(" and more ({} in all)", set.present()));
    }
    text
}

fn record(index: u32, hash: &Hash) -> [u8; LOG_RECORD] {
    let mut rec = [0u8; LOG_RECORD];
    rec[..4].copy_from_slice(&index.to_be_bytes());
    rec[4..].copy_from_slice(hash);
    rec
}

fn header(s: &PartialState, rel: &RelPath) -> Vec<u8> {
    let p = rel.as_str().as_bytes();
    let mut out = Vec::with_capacity(LOG_HEADER + p.len());
    out.extend_from_slice(LOG_MAGIC);
    out.push(LOG_VERSION);
    out.extend_from_slice(&s.size.to_be_bytes());
    out.extend_from_slice(&s.mtime_ns.to_be_bytes());
    out.extend_from_slice(&s.file_hash);
    out.extend_from_slice(&s.chunk_size.to_be_bytes());
    // A RelPath is at most MAX_PATH_LEN (4096) bytes: it fits in a u16.
    out.extend_from_slice(&(p.len() as u16).to_be_bytes());
    out.extend_from_slice(p);
    out
}

/// Writes a fresh log atomically: header, then the given chunk records.
fn write_log(
    path: &Path,
    s: &PartialState,
    rel: &RelPath,
    chunks: impl Iterator<Item = (u32, Hash)>,
) -> Result<(), StorageError> {
    let tmp = path.with_extension("log.tmp");
    let io = |e| StorageError::io(format!("writing {}", tmp.display()), e);
    let mut f = BufWriter::new(File::create(&tmp).map_err(io)?);
    f.write_all(&header(s, rel)).map_err(io)?;
    for (i, h) in chunks {
        f.write_all(&record(i, &h)).map_err(io)?;
    }
    f.flush().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| StorageError::io(format!("renaming {}", tmp.display()), e))
}

/// A partial log read front to back with a small buffer.
struct LogReader {
    reader: BufReader<File>,
    state: PartialState,
    rel: Vec<u8>,
}

impl LogReader {
    fn open(path: &Path) -> std::io::Result<LogReader> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let mut reader = BufReader::new(File::open(path)?);
        let mut h = [0u8; LOG_HEADER];
        reader
            .read_exact(&mut h)
            .map_err(|_| bad("truncated header"))?;
        if &h[..4] != LOG_MAGIC || h[4] != LOG_VERSION {
            return Err(bad("not a partial log of a known version"));
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let size = u64_at(5);
        let mtime_ns = u64_at(13) as i64;
        let mut file_hash = [0u8; 32];
        file_hash.copy_from_slice(&h[21..53]);
        let chunk_size = u32::from_be_bytes([h[53], h[54], h[55], h[56]]);
        let plen = u16::from_be_bytes([h[57], h[58]]) as usize;
        if chunk_size == 0 {
            return Err(bad("chunk size 0"));
        }
        let mut rel = vec![0u8; plen];
        reader
            .read_exact(&mut rel)
            .map_err(|_| bad("truncated header"))?;
        let layout = ChunkLayout::new(size, chunk_size);
        let state = PartialState {
            size,
            mtime_ns,
            file_hash,
            chunk_size,
            have: ChunkSet::new(layout.count()),
        };
        Ok(LogReader { reader, state, rel })
    }

    /// The next whole record; `None` at the end (a torn last record is ignored).
    fn next_record(&mut self) -> std::io::Result<Option<(u32, Hash)>> {
        let mut rec = [0u8; LOG_RECORD];
        let mut filled = 0;
        while filled < LOG_RECORD {
            match self.reader.read(&mut rec[filled..]) {
                Ok(0) => return Ok(None),
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let index = u32::from_be_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&rec[4..]);
        Ok(Some((index, hash)))
    }
}

/// Reads a log: the partial's state, with every recorded chunk held.
pub(super) fn read_log(path: &Path) -> std::io::Result<PartialState> {
    let mut log = LogReader::open(path)?;
    while let Some((index, _)) = log.next_record()? {
        // An index beyond the layout cannot come from this receiver; ignore it.
        log.state.have.insert(index);
    }
    Ok(log.state)
}

/// The relative path recorded in a partial log's header (reads the header only).
fn log_rel_path(log: &Path) -> Option<String> {
    let log = LogReader::open(log).ok()?;
    String::from_utf8(log.rel).ok()
}

/// Removes partial files under `partial_root` nobody wrote to for `max_age`; see
/// [`super::Storage::sweep_partials`].
pub(super) fn sweep<G>(
    partial_root: &Path,
    max_age: Duration,
    now: SystemTime,
    mut claim: impl FnMut(&str, &str) -> Option<G>,
) -> Sweep {
    let mut sweep = Sweep::default();
    let Ok(agents) = fs::read_dir(partial_root) else {
        return sweep;
    };
    for agent_dir in agents.flatten() {
        let agent = agent_dir.file_name().to_string_lossy().into_owned();
        // Files of one partial share a key: <key>.part, <key>.log, <key>.log.tmp.
        let mut by_key: BTreeMap<String, (Vec<PathBuf>, SystemTime, u64)> = BTreeMap::new();
        let Ok(entries) = fs::read_dir(agent_dir.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((key, _)) = name.split_once('.') else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(now);
            let slot =
                by_key
                    .entry(key.to_owned())
                    .or_insert((Vec::new(), std::time::UNIX_EPOCH, 0));
            slot.0.push(entry.path());
            slot.1 = slot.1.max(modified);
            slot.2 += meta.blocks() * 512;
        }
        for (key, (files, newest, bytes)) in by_key {
            let age = now.duration_since(newest).unwrap_or_default();
            if age < max_age {
                continue;
            }
            let log = agent_dir.path().join(format!("{key}.log"));
            let rel = log_rel_path(&log);
            // Without a readable log no session can resume this partial: no claim.
            let _guard = match &rel {
                Some(rel) => match claim(&agent, rel) {
                    Some(g) => Some(g),
                    None => continue,
                },
                None => None,
            };
            let mut removed = true;
            for f in &files {
                if let Err(e) = remove_if_exists(f) {
                    tracing::warn!(error = %e, "cannot remove an abandoned partial file");
                    removed = false;
                }
            }
            if removed {
                tracing::info!(
                    agent = ?agent,
                    path = ?rel.as_deref().unwrap_or("?"),
                    age_s = age.as_secs(),
                    bytes,
                    "removed an abandoned partial file (untouched for longer than limits.partial_max_age)"
                );
                sweep.removed += 1;
                sweep.bytes += bytes;
            }
        }
    }
    sweep
}
