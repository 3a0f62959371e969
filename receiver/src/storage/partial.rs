//! Partial files and their chunk logs: what lets a file resume after an interruption on
//! either side (docs/protocol.md §8).
//!
//! ```text
//! <root>/.skyferry/partial/<agent>/<key>.part   bytes received so far (sparse)
//! <root>/.skyferry/partial/<agent>/<key>.log    header, then one slot per chunk (sparse)
//! ```
//!
//! Slot `i` of the log sits at a fixed offset after the header: a present byte (1) and
//! the chunk's verified BLAKE3 value ([`chunk_value`]); a hole or zeros means not held.
//! The whole-file hash is derived by streaming the slots in index order through a
//! [`TreeHasher`], so publishing reads no file data again, and memory stays O(log n).
//!
//! Memory per partial does not depend on the file's size: which chunks are held is a
//! range set ([`ChunkSet`]), and the chunk values stay in the log on disk. A 1 TiB offer
//! costs what a 1 KiB one costs until chunks arrive.
//!
//! Data and slot are written without an fsync between them, so after a crash of the
//! machine a slot may survive its data. A partial opened again is therefore re-checked
//! first: every held chunk is read back and its value compared with its slot
//! ([`Partial::recheck_chunks`]); only what passes counts as held.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use skyferry_common::buf::DIRECT_IO_ALIGN;
use skyferry_common::chunk::{chunk_value, ChunkLayout, ChunkSet, TreeHasher};
use skyferry_common::protocol::{ChunkRange, Hash, Offer};
use skyferry_common::relpath::RelPath;
use skyferry_common::session::PartialState;

use super::{remove_if_exists, StorageError, Sweep};

/// Version byte of the partial log format. Version 1 (append-only records of plain chunk
/// hashes) is not read: such a partial is discarded and the file received again.
const LOG_VERSION: u8 = 2;
const LOG_MAGIC: &[u8; 4] = b"SKYP";
/// Log header before the path: magic, version, size, mtime_ns, has_hash, file_hash,
/// chunk_size, path length.
const LOG_HEADER: usize = 4 + 1 + 8 + 8 + 1 + 32 + 4 + 2;
/// One chunk slot: present byte (1), the chunk's BLAKE3 value.
const LOG_SLOT: usize = 33;

/// A file being received.
pub struct Partial {
    pub(super) file: File,
    /// The same file opened with `O_DIRECT`, when asked for and the filesystem allows
    /// it: chunks go from the receive buffer to the device without a copy into the page
    /// cache (see [`Partial::write_chunk`]).
    pub(super) direct: Option<File>,
    log: File,
    /// Offset of slot 0 in the log.
    slots_at: u64,
    pub(super) part_path: PathBuf,
    pub(super) log_path: PathBuf,
    pub(super) rel: RelPath,
    pub(super) state: PartialState,
    /// Where its writes are tracked while in progress.
    ops: super::Ops,
}

impl Partial {
    /// Opens the partial at `part`/`log` for `offer`, reusing a log of the same version
    /// (as [`super::Storage::lookup`] found and re-checked it) or starting a fresh one.
    /// Whatever this call created is removed again if it fails.
    pub(super) fn open(
        part: PathBuf,
        log: PathBuf,
        rel: &RelPath,
        offer: &Offer,
        direct_io: bool,
        ops: super::Ops,
    ) -> Result<Partial, StorageError> {
        let existing = read_log(&log).ok().filter(|s| s.matches(offer));
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
                write_log(&log, &state, rel)?;
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
                .read(true)
                .write(true)
                .open(&log)
                .map_err(|e| StorageError::io(format!("opening {}", log.display()), e))?;
            Ok((file, log_file))
        })();
        match opened {
            Ok((file, log_file)) => Ok(Partial {
                file,
                direct: direct_io.then(|| open_direct(&part)).flatten(),
                log: log_file,
                slots_at: (LOG_HEADER + rel.as_str().len()) as u64,
                part_path: part,
                log_path: log,
                rel: rel.clone(),
                state,
                ops,
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

    fn layout(&self) -> ChunkLayout {
        ChunkLayout::new(self.state.size, self.state.chunk_size)
    }

    /// Writes a verified chunk and records its value (computed by the session when it
    /// verified the chunk: nothing is hashed twice).
    pub fn write_chunk(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
        value: &Hash,
    ) -> Result<(), StorageError> {
        let _op = self.ops.begin(super::OpKind::Write);
        self.write_data(data, offset)
            .map_err(|e| StorageError::io(format!("writing {}", self.part_path.display()), e))?;
        self.log
            .write_all_at(
                &slot(Some(value)),
                self.slots_at + u64::from(index) * LOG_SLOT as u64,
            )
            .map_err(|e| StorageError::io(format!("writing {}", self.log_path.display()), e))?;
        self.state.have.insert(index);
        Ok(())
    }

    /// Writes chunk bytes at `offset`. With `O_DIRECT` the aligned part goes straight to
    /// the device and only a tail shorter than [`DIRECT_IO_ALIGN`] (the file's last
    /// bytes) through the page cache; both reach the disk at the publish's fsync. On a
    /// virtual machine the page-cache copy of a buffered write costs ~10 times a plain
    /// memory copy (docs/architecture.md, "Tasks, threads and bounds"), and an archive that is
    /// written once gains nothing from caching what it writes.
    fn write_data(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let align = DIRECT_IO_ALIGN as u64;
        let aligned = data.len() - data.len() % DIRECT_IO_ALIGN;
        let direct_ok = aligned > 0
            && (data.as_ptr() as usize) & (DIRECT_IO_ALIGN - 1) == 0
            && offset & (align - 1) == 0;
        if let Some(direct) = self.direct.as_ref().filter(|_| direct_ok) {
            match direct.write_all_at(&data[..aligned], offset) {
                Ok(()) => {
                    return self
                        .file
                        .write_all_at(&data[aligned..], offset + aligned as u64)
                }
                // The filesystem took the O_DIRECT open but not this write: buffered
                // writes from now on (what was written stays valid).
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(data, offset)
    }

    /// The whole file's BLAKE3, derived from the recorded chunk values in index order;
    /// `None` if a chunk is not recorded.
    pub(super) fn derived_hash(&self) -> Result<Option<Hash>, StorageError> {
        let read_err = |e| StorageError::io(format!("reading {}", self.log_path.display()), e);
        let layout = self.layout();
        let mut slots = LogReader::open(&self.log_path).map_err(read_err)?;
        let mut tree = TreeHasher::new(&layout);
        for _ in 0..layout.count() {
            match slots.next_slot().map_err(read_err)? {
                Some(value) => tree.push(value),
                None => return Ok(None),
            }
        }
        Ok(tree.finalize())
    }

    /// Reads every recorded chunk back from disk and compares its value with its slot;
    /// clears the slots that do not match and returns those chunks. Run on a partial
    /// opened again (see the module docs), reading only what was received.
    pub(super) fn recheck_chunks(&mut self) -> Result<ChunkSet, StorageError> {
        let layout = self.layout();
        let count = layout.count();
        let read_err = |e| StorageError::io(format!("reading {}", self.log_path.display()), e);
        let mut slots = LogReader::open(&self.log_path).map_err(read_err)?;
        let mut bad = ChunkSet::new(count);
        let mut good = ChunkSet::new(count);
        let mut buf = Vec::new();
        for index in 0..count {
            let Some(expected) = slots.next_slot().map_err(read_err)? else {
                continue;
            };
            let len = layout.len(index).unwrap_or(0) as usize;
            buf.resize(len, 0);
            self.file
                .read_exact_at(&mut buf, layout.offset(index))
                .map_err(|e| {
                    StorageError::io(format!("reading {}", self.part_path.display()), e)
                })?;
            if chunk_value(&layout, index, &buf) == expected {
                good.insert(index);
            } else {
                bad.insert(index);
            }
        }
        for r in bad.ranges().collect::<Vec<_>>() {
            for index in r.start..r.end {
                self.log
                    .write_all_at(
                        &slot(None),
                        self.slots_at + u64::from(index) * LOG_SLOT as u64,
                    )
                    .map_err(|e| {
                        StorageError::io(format!("writing {}", self.log_path.display()), e)
                    })?;
            }
        }
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
        self.state.have.missing_bytes(&self.layout())
    }
}

/// The partial opened again with `O_DIRECT` for writing, or `None` where the filesystem
/// does not support it (tmpfs before Linux 6.6, some network filesystems): writes then
/// go through the page cache as usual.
pub(super) fn open_direct(part: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(part)
        .ok()
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

fn slot(value: Option<&Hash>) -> [u8; LOG_SLOT] {
    let mut slot = [0u8; LOG_SLOT];
    if let Some(v) = value {
        slot[0] = 1;
        slot[1..].copy_from_slice(v);
    }
    slot
}

fn header(s: &PartialState, rel: &RelPath) -> Vec<u8> {
    let p = rel.as_str().as_bytes();
    let mut out = Vec::with_capacity(LOG_HEADER + p.len());
    out.extend_from_slice(LOG_MAGIC);
    out.push(LOG_VERSION);
    out.extend_from_slice(&s.size.to_be_bytes());
    out.extend_from_slice(&s.mtime_ns.to_be_bytes());
    out.push(u8::from(s.file_hash.is_some()));
    out.extend_from_slice(&s.file_hash.unwrap_or([0; 32]));
    out.extend_from_slice(&s.chunk_size.to_be_bytes());
    // A RelPath is at most MAX_PATH_LEN (4096) bytes: it fits in a u16.
    out.extend_from_slice(&(p.len() as u16).to_be_bytes());
    out.extend_from_slice(p);
    out
}

/// Writes a fresh log (header, no chunk held) atomically.
fn write_log(path: &Path, s: &PartialState, rel: &RelPath) -> Result<(), StorageError> {
    let tmp = path.with_extension("log.tmp");
    let io = |e| StorageError::io(format!("writing {}", tmp.display()), e);
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&header(s, rel)).map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| StorageError::io(format!("renaming {}", tmp.display()), e))
}

/// A partial log read front to back with a small buffer: the header, then slot by slot.
struct LogReader {
    reader: BufReader<File>,
    state: PartialState,
    rel: Vec<u8>,
    /// The end of the file was reached: every further slot is empty.
    ended: bool,
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
        let file_hash = match h[21] {
            0 => None,
            1 => {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&h[22..54]);
                Some(hash)
            }
            _ => return Err(bad("bad hash flag")),
        };
        let chunk_size = u32::from_be_bytes([h[54], h[55], h[56], h[57]]);
        let plen = u16::from_be_bytes([h[58], h[59]]) as usize;
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
        Ok(LogReader {
            reader,
            state,
            rel,
            ended: false,
        })
    }

    /// The value in the next slot; `None` for an empty slot (or past the end of the log,
    /// which is sparse: slots never written read as empty).
    fn next_slot(&mut self) -> std::io::Result<Option<Hash>> {
        if self.ended {
            return Ok(None);
        }
        let mut rec = [0u8; LOG_SLOT];
        let mut filled = 0;
        while filled < LOG_SLOT {
            match self.reader.read(&mut rec[filled..]) {
                Ok(0) => {
                    self.ended = true;
                    return Ok(None);
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if rec[0] != 1 {
            return Ok(None);
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&rec[1..]);
        Ok(Some(hash))
    }
}

/// Reads a log: the partial's state, with every recorded chunk held (not re-checked).
pub(super) fn read_log(path: &Path) -> std::io::Result<PartialState> {
    let mut log = LogReader::open(path)?;
    for index in 0..log.state.have.count() {
        if log.next_slot()?.is_some() {
            log.state.have.insert(index);
        }
        if log.ended {
            break;
        }
    }
    Ok(log.state)
}

/// The partial at `part`/`log` if it belongs to `offer`'s version, re-checked against
/// the bytes on disk (module docs): the chunks it really holds. `None` when there is no
/// usable partial of that version.
pub(super) fn read_checked(
    part: &Path,
    log: &Path,
    rel: &RelPath,
    offer: &Offer,
) -> Result<Option<PartialState>, StorageError> {
    let state = match read_log(log) {
        Ok(state) if state.matches(offer) => state,
        // Another version's partial (the session discards it), or none.
        other => return Ok(other.ok()),
    };
    if !part.is_file() {
        // A log without its data: what a crash between publishing (the rename of the
        // `.part`) and the log's removal leaves behind. Useless: remove it.
        remove_if_exists(log)?;
        return Ok(None);
    }
    let open = |p: &Path, write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(p)
            .map_err(|e| StorageError::io(format!("opening {}", p.display()), e))
    };
    let mut partial = Partial {
        file: open(part, false)?,
        direct: None,
        log: open(log, true)?,
        slots_at: (LOG_HEADER + rel.as_str().len()) as u64,
        part_path: part.to_owned(),
        log_path: log.to_owned(),
        rel: rel.clone(),
        state,
        // Only read here (a recheck): nothing to track.
        ops: super::Ops::default(),
    };
    let bad = partial.recheck_chunks()?;
    if bad.present() > 0 {
        tracing::warn!(
            path = ?rel.as_str(),
            chunks = %describe(&bad),
            "chunks of a resumed partial file do not match their recorded values (lost in a crash?); receiving them again"
        );
    }
    Ok(Some(partial.state))
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
