//! Durable storage of received files: partial files with their verified-chunk logs, and
//! atomic publication into the tree.
//!
//! Layout under the storage root:
//! ```text
//! <root>/<agent id>/<relative path>            published files (the tree users see)
//! <root>/.skyferry/partial/<agent>/<key>.part   bytes received so far (sparse)
//! <root>/.skyferry/partial/<agent>/<key>.log    which chunks are verified, with hashes
//! <root>/.skyferry/versions/<agent>/<path>.<h>  earlier versions replaced by a new one
//! <root>/.skyferry/inventory.sqlite             what is published, with its BLAKE3
//! ```
//! Everything is on one filesystem so that publishing is a rename.
//!
//! Publication: fsync the partial, hash the bytes on disk and compare with the offered
//! hash, move an older version aside, rename into place, fsync the directory, record in
//! the inventory. Only then is the file acknowledged. A chunk record is appended to the
//! log after its bytes were written (not fsynced): a process crash loses nothing, and a
//! machine crash that loses written bytes is caught by the whole-file check, which then
//! re-checks each chunk and asks the agent again for the bad ones.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use skyferry_common::chunk::{hash_bytes, hash_file, ChunkLayout, ChunkSet};
use skyferry_common::protocol::{short_hex, ErrorCode, Hash, Offer, Reject};
use skyferry_common::relpath::RelPath;
use skyferry_common::session::{reject, Lookup, PartialState};
use skyferry_common::unix_time::mtime_ns;

use crate::inventory::{Inventory, StoredFile};

/// Version byte of the partial log format.
const LOG_VERSION: u8 = 1;
const LOG_MAGIC: &[u8; 4] = b"SKYP";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage full while {doing}: {source}")]
    Full {
        doing: String,
        source: std::io::Error,
    },
    #[error("{doing}: {source}")]
    Io {
        doing: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsafe(String),
    #[error("inventory: {0}")]
    Inventory(#[from] rusqlite::Error),
}

impl StorageError {
    fn io(doing: impl Into<String>, source: std::io::Error) -> StorageError {
        let doing = doing.into();
        if source.kind() == std::io::ErrorKind::StorageFull
            || source.kind() == std::io::ErrorKind::QuotaExceeded
        {
            StorageError::Full { doing, source }
        } else {
            StorageError::Io { doing, source }
        }
    }

    /// ENOSPC/EDQUOT, or SQLite's "database or disk is full".
    pub fn is_full(&self) -> bool {
        match self {
            StorageError::Full { .. } => true,
            StorageError::Inventory(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            _ => false,
        }
    }

    /// The rejection the agent receives: `storage_full` (the agent pauses and retries
    /// later), `storage_error` (retried from the source), or `bad_path`.
    pub fn to_reject(&self) -> Reject {
        match self {
            StorageError::Inventory(_) if self.is_full() => {
                reject(ErrorCode::StorageFull, format!("storage full: {self}"))
            }
            StorageError::Full { .. } => reject(ErrorCode::StorageFull, self.to_string()),
            StorageError::Unsafe(_) => reject(ErrorCode::BadPath, self.to_string()),
            StorageError::Io { .. } | StorageError::Inventory(_) => {
                reject(ErrorCode::StorageError, self.to_string())
            }
        }
    }
}

pub struct Storage {
    root: PathBuf,
    state: PathBuf,
    inventory: Mutex<Inventory>,
}

impl Storage {
    pub fn open(root: &Path) -> Result<Storage, StorageError> {
        let state = root.join(".skyferry");
        for dir in [state.join("partial"), state.join("versions")] {
            fs::create_dir_all(&dir)
                .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        }
        let inventory = Inventory::open(&state.join("inventory.sqlite"))?;
        Ok(Storage {
            root: root.to_owned(),
            state,
            inventory: Mutex::new(inventory),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn inventory(&self) -> std::sync::MutexGuard<'_, Inventory> {
        // A poisoned lock only means another session panicked mid-query; SQLite itself
        // stays consistent, so carry on with the connection.
        self.inventory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn partial_paths(&self, agent: &str, rel: &RelPath) -> (PathBuf, PathBuf) {
        let key = &blake3::hash(rel.as_str().as_bytes()).to_hex()[..32];
        let dir = self.state.join("partial").join(agent);
        (
            dir.join(format!("{key}.part")),
            dir.join(format!("{key}.log")),
        )
    }

    fn published_path(&self, agent: &str, rel: &RelPath) -> PathBuf {
        self.root.join(agent).join(rel.as_str())
    }

    /// What is stored for `rel`: the published file's hash and any partial.
    pub fn lookup(&self, agent: &str, rel: &RelPath) -> Result<Lookup, StorageError> {
        let stored = self.stored_hash(agent, rel)?;
        let (part, log) = self.partial_paths(agent, rel);
        let mut partial = read_log(&log).ok().map(|(state, _)| state);
        // A partial of the very content already published is what a crash between the
        // publishing rename and the log's removal leaves behind: remove it now.
        if partial
            .as_ref()
            .is_some_and(|p| Some(p.file_hash) == stored)
        {
            remove_if_exists(&part)?;
            remove_if_exists(&log)?;
            partial = None;
        }
        Ok(Lookup { stored, partial })
    }

    /// The hash of the file published at `rel`, if a regular file is there (a symlink is
    /// never followed out of the tree). Published files carry their source mtime, so size
    /// and mtime tell whether the inventory row still describes the file on disk; if not
    /// (a crash between rename and record, a restored backup), the file is hashed once
    /// and the inventory corrected.
    fn stored_hash(&self, agent: &str, rel: &RelPath) -> Result<Option<Hash>, StorageError> {
        let published = self.published_path(agent, rel);
        let Some(meta) = fs::symlink_metadata(&published)
            .ok()
            .filter(|m| m.is_file())
        else {
            return Ok(None);
        };
        if let Some(f) = self.inventory().stored(agent, rel.as_str())? {
            if f.size == meta.len() && f.mtime_ns == mtime_ns(&meta) {
                return Ok(Some(f.hash));
            }
        }
        let (hash, size) = hash_file(&published)
            .map_err(|e| StorageError::io(format!("hashing {}", published.display()), e))?;
        self.inventory().record(&StoredFile {
            agent: agent.into(),
            path: rel.to_string(),
            hash,
            size,
            mtime_ns: mtime_ns(&meta),
        })?;
        Ok(Some(hash))
    }

    /// Opens the partial for `offer`, creating it (and discarding an old one) as needed.
    pub fn open_partial(
        &self,
        agent: &str,
        rel: &RelPath,
        offer: &Offer,
        discard: bool,
    ) -> Result<Partial, StorageError> {
        let (part, log) = self.partial_paths(agent, rel);
        if discard {
            remove_if_exists(&part)?;
            remove_if_exists(&log)?;
        }
        if let Some(dir) = part.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        }
        let layout = ChunkLayout::new(offer.size, offer.chunk_size);
        let existing = read_log(&log).ok().filter(|(s, _)| {
            s.size == offer.size
                && s.file_hash == offer.file_hash
                && s.chunk_size == offer.chunk_size
        });
        let (state, hashes) = match existing {
            Some(found) if part.is_file() => found,
            _ => {
                let state = PartialState {
                    size: offer.size,
                    mtime_ns: offer.mtime_ns,
                    file_hash: offer.file_hash,
                    chunk_size: offer.chunk_size,
                    have: ChunkSet::new(layout.count()),
                };
                write_log(&log, &state, rel, &[])?;
                (state, vec![None; layout.count() as usize])
            }
        };
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
        Ok(Partial {
            file,
            log: log_file,
            part_path: part,
            log_path: log,
            rel: rel.clone(),
            state,
            hashes,
        })
    }

    /// Verifies the partial's bytes on disk and publishes it. On a hash mismatch, chunks
    /// whose bytes no longer match their recorded hash are forgotten so that a retry asks
    /// for exactly those; if every chunk matches, the offer's file hash itself was wrong
    /// (the source changed while being read) and the partial is discarded.
    ///
    /// Any storage error discards the partial, so that the retry starts again from the
    /// source: after a failed fsync the page cache cannot be trusted, and the fsync is
    /// never retried.
    pub fn publish(&self, agent: &str, mut partial: Partial) -> Result<String, PublishError> {
        let result = self.try_publish(agent, &mut partial);
        if let Err(PublishError::Storage(_)) = &result {
            partial.discard();
        }
        result
    }

    fn try_publish(&self, agent: &str, partial: &mut Partial) -> Result<String, PublishError> {
        let io = |doing: String| move |e| StorageError::io(doing, e);
        // The published file keeps the source's mtime, like `rsync -a`.
        let mtime = std::time::UNIX_EPOCH
            + std::time::Duration::from_nanos(partial.state.mtime_ns.max(0) as u64);
        partial.file.set_modified(mtime).map_err(io(format!(
            "setting the mtime of {}",
            partial.part_path.display()
        )))?;
        partial
            .file
            .sync_all()
            .map_err(io(format!("fsync {}", partial.part_path.display())))?;
        let (hash, _) = hash_file(&partial.part_path)
            .map_err(io(format!("reading back {}", partial.part_path.display())))?;
        if hash != partial.state.file_hash {
            let bad = partial.recheck_chunks()?;
            let reason = if bad.is_empty() {
                partial.discard();
                format!(
                    "{}: whole-file checksum mismatch (offered {}, stored bytes hash to {}); the source changed while it was read",
                    partial.rel,
                    short_hex(&partial.state.file_hash),
                    short_hex(&hash)
                )
            } else {
                format!(
                    "{}: whole-file checksum mismatch; chunks {:?} are corrupt on disk and will be fetched again",
                    partial.rel, bad
                )
            };
            return Err(PublishError::Mismatch(reason));
        }

        let rel = partial.rel.clone();
        let target = self.published_path(agent, &rel);
        let parent = self.safe_parent(agent, &rel)?;
        self.move_old_version(agent, &rel, &target)?;
        fs::rename(&partial.part_path, &target)
            .map_err(io(format!("renaming into {}", target.display())))?;
        if let Err(e) = fsync_dir(&parent) {
            // The rename may not survive a crash: take the file back out (the retry sends
            // it again) rather than acknowledge it.
            let _ = fs::remove_file(&target);
            return Err(e.into());
        }
        let _ = fs::remove_file(&partial.log_path);
        self.inventory()
            .record(&StoredFile {
                agent: agent.into(),
                path: rel.to_string(),
                hash,
                size: partial.state.size,
                mtime_ns: partial.state.mtime_ns,
            })
            .map_err(StorageError::from)?;
        Ok(rel.to_string())
    }

    /// Free space of the storage filesystem (`statvfs`), if it can be read.
    pub fn free_bytes(&self) -> Option<u64> {
        rustix::fs::statvfs(&self.root)
            .ok()
            .map(|st| st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Removes partial files nobody wrote to for `max_age` (their agent never came back,
    /// or the source file is gone). `claim(agent, path)` must hold the path for the
    /// duration of the removal, so that a file being received is never removed under its
    /// session; a partial it refuses (busy) is left alone.
    pub fn sweep_partials<G>(
        &self,
        max_age: Duration,
        now: SystemTime,
        mut claim: impl FnMut(&str, &str) -> Option<G>,
    ) -> Sweep {
        let mut sweep = Sweep::default();
        let partial_root = self.state.join("partial");
        let Ok(agents) = fs::read_dir(&partial_root) else {
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
                        agent = %agent,
                        path = rel.as_deref().unwrap_or("?"),
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

    /// Creates the directories leading to `rel` under `<root>/<agent>`, refusing to follow
    /// symlinks or to pass through non-directories. Returns the parent directory.
    fn safe_parent(&self, agent: &str, rel: &RelPath) -> Result<PathBuf, StorageError> {
        let mut dir = self.root.clone();
        let comps: Vec<&str> = std::iter::once(agent).chain(rel.components()).collect();
        let (file_name, dirs) = comps.split_last().unwrap_or((&"", &[]));
        for comp in dirs {
            let next = dir.join(comp);
            match fs::symlink_metadata(&next) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(StorageError::Unsafe(format!(
                        "{rel}: {} exists and is not a directory (symlinks are not followed)",
                        next.display()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match fs::create_dir(&next) {
                    Ok(()) => fsync_dir(&dir)?,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(StorageError::io(format!("creating {}", next.display()), e))
                    }
                },
                Err(e) => return Err(StorageError::io(format!("checking {}", next.display()), e)),
            }
            dir = next;
        }
        if let Ok(m) = fs::symlink_metadata(dir.join(file_name)) {
            if !m.is_file() {
                return Err(StorageError::Unsafe(format!(
                    "{rel}: the target exists and is not a regular file (symlinks are not followed)"
                )));
            }
        }
        Ok(dir)
    }

    /// Keeps a previously published, different version of the file.
    fn move_old_version(
        &self,
        agent: &str,
        rel: &RelPath,
        target: &Path,
    ) -> Result<(), StorageError> {
        let Some(old_hash) = self.stored_hash(agent, rel)? else {
            return Ok(());
        };
        let keep = self.state.join("versions").join(agent).join(format!(
            "{rel}.{}",
            &skyferry_common::protocol::hex(&old_hash)[..16]
        ));
        if let Some(dir) = keep.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        }
        fs::rename(target, &keep).map_err(|e| {
            StorageError::io(format!("keeping old version at {}", keep.display()), e)
        })?;
        if let Some(dir) = keep.parent() {
            fsync_dir(dir)?;
        }
        tracing::info!(path = %rel, kept = %keep.display(), "new version replaces a stored file; old version kept");
        Ok(())
    }
}

/// What a sweep of abandoned partials removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    pub removed: u64,
    pub bytes: u64,
}

/// The relative path recorded in a partial log's header.
fn log_rel_path(log: &Path) -> Option<String> {
    let mut data = Vec::new();
    File::open(log).ok()?.read_to_end(&mut data).ok()?;
    let header = 4 + 1 + 8 + 8 + 32 + 4 + 2;
    if data.len() < header || &data[..4] != LOG_MAGIC || data[4] != LOG_VERSION {
        return None;
    }
    let plen = u16::from_be_bytes([data[57], data[58]]) as usize;
    let bytes = data.get(header..header + plen)?;
    String::from_utf8(bytes.to_vec()).ok()
}

/// Why publication failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Mismatch(String),
}

impl PublishError {
    pub fn to_reject(&self) -> Reject {
        match self {
            PublishError::Storage(e) => e.to_reject(),
            PublishError::Mismatch(reason) => reject(ErrorCode::HashMismatch, reason.clone()),
        }
    }
}

/// A file being received.
pub struct Partial {
    file: File,
    log: File,
    part_path: PathBuf,
    log_path: PathBuf,
    rel: RelPath,
    state: PartialState,
    hashes: Vec<Option<Hash>>,
}

impl Partial {
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
        let mut rec = [0u8; 36];
        rec[..4].copy_from_slice(&index.to_be_bytes());
        rec[4..].copy_from_slice(&hash);
        self.log
            .write_all(&rec)
            .map_err(|e| StorageError::io(format!("writing {}", self.log_path.display()), e))?;
        if let Some(slot) = self.hashes.get_mut(index as usize) {
            *slot = Some(hash);
        }
        self.state.have.insert(index);
        Ok(())
    }

    /// Re-hashes every recorded chunk on disk; forgets the ones that no longer match and
    /// rewrites the log. Returns the bad indices.
    fn recheck_chunks(&mut self) -> Result<Vec<u32>, StorageError> {
        let layout = ChunkLayout::new(self.state.size, self.state.chunk_size);
        let mut bad = Vec::new();
        let mut buf = Vec::new();
        for index in 0..layout.count() {
            let Some(expected) = self.hashes[index as usize] else {
                continue;
            };
            let len = layout.len(index).unwrap_or(0) as usize;
            buf.resize(len, 0);
            self.file
                .read_exact_at(&mut buf, layout.offset(index))
                .map_err(|e| {
                    StorageError::io(format!("reading {}", self.part_path.display()), e)
                })?;
            if hash_bytes(&buf) != expected {
                bad.push(index);
                self.hashes[index as usize] = None;
                self.state.have.remove(index);
            }
        }
        if !bad.is_empty() {
            let kept: Vec<(u32, Hash)> = self
                .hashes
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.map(|h| (i as u32, h)))
                .collect();
            write_log(&self.log_path, &self.state, &self.rel, &kept)?;
        }
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
        (0..layout.count())
            .filter(|&i| !self.state.have.contains(i))
            .map(|i| u64::from(layout.len(i).unwrap_or(0)))
            .sum()
    }
}

/// Writes a fresh log atomically: header, then the given chunk records.
fn write_log(
    path: &Path,
    s: &PartialState,
    rel: &RelPath,
    chunks: &[(u32, Hash)],
) -> Result<(), StorageError> {
    let mut out = Vec::with_capacity(64 + chunks.len() * 36);
    out.extend_from_slice(LOG_MAGIC);
    out.push(LOG_VERSION);
    out.extend_from_slice(&s.size.to_be_bytes());
    out.extend_from_slice(&s.mtime_ns.to_be_bytes());
    out.extend_from_slice(&s.file_hash);
    out.extend_from_slice(&s.chunk_size.to_be_bytes());
    let p = rel.as_str().as_bytes();
    out.extend_from_slice(&(p.len() as u16).to_be_bytes());
    out.extend_from_slice(p);
    for (i, h) in chunks {
        out.extend_from_slice(&i.to_be_bytes());
        out.extend_from_slice(h);
    }
    let tmp = path.with_extension("log.tmp");
    let io = |e| StorageError::io(format!("writing {}", tmp.display()), e);
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&out).map_err(io)?;
    fs::rename(&tmp, path).map_err(|e| StorageError::io(format!("renaming {}", tmp.display()), e))
}

/// Reads a log; a torn last record (a crash mid-append) is ignored.
fn read_log(path: &Path) -> std::io::Result<(PartialState, Vec<Option<Hash>>)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let header = 4 + 1 + 8 + 8 + 32 + 4 + 2;
    if data.len() < header || &data[..4] != LOG_MAGIC || data[4] != LOG_VERSION {
        return Err(bad("not a partial log of a known version"));
    }
    let u64_at = |i: usize| u64::from_be_bytes(data[i..i + 8].try_into().unwrap_or([0; 8]));
    let size = u64_at(5);
    let mtime_ns = u64_at(13) as i64;
    let mut file_hash = [0u8; 32];
    file_hash.copy_from_slice(&data[21..53]);
    let chunk_size = u32::from_be_bytes(data[53..57].try_into().unwrap_or([0; 4]));
    let plen = u16::from_be_bytes(data[57..59].try_into().unwrap_or([0; 2])) as usize;
    if chunk_size == 0 || data.len() < header + plen {
        return Err(bad("truncated header"));
    }
    let layout = ChunkLayout::new(size, chunk_size);
    let mut have = ChunkSet::new(layout.count());
    let mut hashes = vec![None; layout.count() as usize];
    for rec in data[header + plen..].chunks_exact(36) {
        let index = u32::from_be_bytes(rec[..4].try_into().unwrap_or([0xff; 4]));
        if let Some(slot) = hashes.get_mut(index as usize) {
            let mut h = [0u8; 32];
            h.copy_from_slice(&rec[4..]);
            *slot = Some(h);
            have.insert(index);
        }
    }
    let state = PartialState {
        size,
        mtime_ns,
        file_hash,
        chunk_size,
        have,
    };
    Ok((state, hashes))
}

fn remove_if_exists(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StorageError::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("fsync directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 64 * 1024;

    fn offer(path: &str, data: &[u8]) -> Offer {
        Offer {
            path: path.into(),
            size: data.len() as u64,
            mtime_ns: 1_700_000_000_000_000_000,
            file_hash: hash_bytes(data),
            chunk_size: CS,
        }
    }

    fn write_all_chunks(p: &mut Partial, data: &[u8], skip: &[u32]) {
        let layout = ChunkLayout::new(data.len() as u64, CS);
        for i in 0..layout.count() {
            if skip.contains(&i) {
                continue;
            }
            let off = layout.offset(i);
            let len = layout.len(i).unwrap_or(0) as usize;
            p.write_chunk(i, off, &data[off as usize..off as usize + len])
                .expect("write chunk");
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn a_chunk_corrupted_on_disk_is_found_forgotten_and_then_received_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let rel = RelPath::parse("n/a.fits").expect("path");
        let content = data(5 * CS as usize + 17);
        let o = offer("n/a.fits", &content);
        let mut p = storage
            .open_partial("kiso", &rel, &o, false)
            .expect("partial");
        write_all_chunks(&mut p, &content, &[]);
        let part = p.part_path.clone();
        drop(p);

        // Bytes flipped in chunk 2 while the receiver was down.
        let f = OpenOptions::new().write(true).open(&part).expect("part");
        f.write_all_at(b"XXXX", 2 * u64::from(CS) + 100)
            .expect("flip");
        drop(f);

        let lookup = storage.lookup("kiso", &rel).expect("lookup");
        let state = lookup.partial.expect("partial state");
        assert!(state.have.is_complete(), "the log still claims every chunk");
        let p = storage
            .open_partial("kiso", &rel, &o, false)
            .expect("reopen");
        match storage.publish("kiso", p) {
            Err(PublishError::Mismatch(reason)) => assert!(reason.contains("[2]"), "{reason}"),
            other => panic!("published a corrupt file: {other:?}"),
        }
        assert!(!storage.published_path("kiso", &rel).exists());
        let state = storage
            .lookup("kiso", &rel)
            .expect("lookup")
            .partial
            .expect("partial kept");
        assert_eq!(
            state.have.missing(),
            vec![skyferry_common::protocol::ChunkRange { start: 2, end: 3 }]
        );

        let mut p = storage
            .open_partial("kiso", &rel, &o, false)
            .expect("reopen");
        let layout = ChunkLayout::new(content.len() as u64, CS);
        let off = layout.offset(2) as usize;
        p.write_chunk(2, off as u64, &content[off..off + CS as usize])
            .expect("rewrite");
        storage.publish("kiso", p).expect("publish");
        let stored = fs::read(storage.published_path("kiso", &rel)).expect("read");
        assert!(stored == content, "published bytes equal the source");
    }

    #[test]
    fn the_sweep_removes_old_partials_but_not_fresh_or_busy_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let content = data(3 * CS as usize);
        let mut keys = Vec::new();
        for name in ["old.fits", "busy.fits", "fresh.fits"] {
            let rel = RelPath::parse(name).expect("path");
            let mut p = storage
                .open_partial("kiso", &rel, &offer(name, &content), false)
                .expect("partial");
            write_all_chunks(&mut p, &content, &[1]);
            keys.push((p.part_path.clone(), p.log_path.clone()));
        }
        let now = SystemTime::now();
        let week = Duration::from_secs(7 * 86400);
        for (part, log) in &keys[..2] {
            for f in [part, log] {
                let old = now - week - Duration::from_secs(60);
                File::options()
                    .write(true)
                    .open(f)
                    .and_then(|f| f.set_modified(old))
                    .expect("age the file");
            }
        }
        let sweep = storage.sweep_partials(week, now, |agent, path| {
            assert_eq!(agent, "kiso");
            (path != "busy.fits").then_some(())
        });
        assert_eq!(sweep.removed, 1);
        assert!(sweep.bytes > 0);
        assert!(
            !keys[0].0.exists() && !keys[0].1.exists(),
            "old partial removed"
        );
        assert!(
            keys[1].0.exists() && keys[1].1.exists(),
            "busy partial kept"
        );
        assert!(
            keys[2].0.exists() && keys[2].1.exists(),
            "fresh partial kept"
        );
    }

    #[test]
    fn a_failed_publish_discards_the_partial() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let content = data(2 * CS as usize);
        let rel = RelPath::parse("a/b.fits").expect("path");
        let o = offer("a/b.fits", &content);
        let mut p = storage
            .open_partial("kiso", &rel, &o, false)
            .expect("partial");
        write_all_chunks(&mut p, &content, &[]);
        let (part, log) = (p.part_path.clone(), p.log_path.clone());
        // A file where a directory must go: publication fails with a storage error.
        fs::create_dir_all(dir.path().join("kiso")).expect("agent dir");
        fs::write(dir.path().join("kiso/a"), b"not a directory").expect("blocker");
        assert!(matches!(
            storage.publish("kiso", p),
            Err(PublishError::Storage(StorageError::Unsafe(_)))
        ));
        assert!(!part.exists() && !log.exists(), "partial discarded");
    }
}
