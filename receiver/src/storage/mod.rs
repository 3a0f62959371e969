//! Durable storage of received files: partial files with their verified-chunk logs
//! ([`partial`]), the published tree and its limits ([`tree`]), and atomic publication
//! (here).
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

pub mod ops;
mod partial;
mod tree;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use skyferry_common::chunk::hash_reader;
use skyferry_common::protocol::{short_hex, ErrorCode, Hash, Offer, Reject};
use skyferry_common::relpath::RelPath;
use skyferry_common::session::{reject, Lookup, StoredVersion};
use skyferry_common::unix_time::mtime_ns;

use crate::health::FULL_BELOW;
use crate::inventory::{Inventory, StoredFile};

pub use ops::{OpKind, Ops};
pub use partial::Partial;
use tree::Found;
pub use tree::PathLimits;

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
    /// The path cannot be stored here, for good: a symlink or non-directory on the
    /// receiver's side, or beyond the storage's name and path limits (`bad_path`).
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

/// A file that was published: durably in place and acknowledged.
#[derive(Debug)]
pub struct Published {
    /// The path under the agent's tree, for the `Ack`.
    pub stored_path: String,
    /// The inventory row could not be written (e.g. ENOSPC in SQLite). The file is
    /// stored all the same and the agent is told so; the row was removed before the
    /// rename, so the next lookup of the path finds no row, hashes the file and records
    /// it (the inventory heals itself).
    pub inventory_error: Option<StorageError>,
}

pub struct Storage {
    root: PathBuf,
    state: PathBuf,
    limits: PathLimits,
    inventory: Mutex<Inventory>,
    /// Write received chunks with `O_DIRECT` where the filesystem allows it
    /// (`receiver.direct_io`; see [`Partial::write_chunk`]).
    direct_io: bool,
    /// Writes, fsyncs and renames in progress, and their latencies.
    ops: Arc<ops::Ops>,
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
            limits: PathLimits::of(root),
            inventory: Mutex::new(inventory),
            direct_io: true,
            ops: Arc::default(),
        })
    }

    /// Whether partial files are written with `O_DIRECT` (default on).
    pub fn with_direct_io(mut self, on: bool) -> Storage {
        self.direct_io = on;
        self
    }

    /// The storage operations in progress (shared with the catalog and the watchdog).
    pub fn ops(&self) -> &Arc<ops::Ops> {
        &self.ops
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The name and path limits of this storage (docs/protocol.md §10).
    pub fn limits(&self) -> PathLimits {
        self.limits
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

    /// What is stored for `rel`: the published file's hash, any partial, and the room
    /// left for a new file. A path this storage cannot hold (beyond its name or path
    /// limits, or through a symlink) is refused here, before any data is sent.
    pub fn lookup(
        &self,
        agent: &str,
        rel: &RelPath,
        offer: &Offer,
    ) -> Result<Lookup, StorageError> {
        self.limits.check(agent, rel)?;
        let stored = self.stored_version(agent, rel)?;
        let (part, log) = self.partial_paths(agent, rel);
        let mut partial = partial::read_checked(&part, &log, rel, offer)?;
        // A partial of the very content already published is what a crash between the
        // publishing rename and the log's removal leaves behind: remove it now.
        if partial
            .as_ref()
            .is_some_and(|p| p.file_hash.is_some() && p.file_hash == stored.map(|s| s.hash))
        {
            remove_if_exists(&part)?;
            remove_if_exists(&log)?;
            partial = None;
        }
        let room = self.free_bytes().map(|f| f.saturating_sub(FULL_BELOW));
        Ok(Lookup {
            stored,
            partial,
            room,
        })
    }

    /// The hash of the file published at `rel`, if a regular file is there. The file is
    /// opened component by component without following any symlink (see
    /// [`tree::open_published`]), so no file outside the agent's tree is ever read or
    /// vouched for. Published files carry their source mtime, so size and mtime tell
    /// whether the inventory row still describes the file on disk; if not (a crash
    /// between rename and record, a failed inventory write, a restored backup), the file
    /// is hashed once and the inventory corrected.
    fn stored_version(
        &self,
        agent: &str,
        rel: &RelPath,
    ) -> Result<Option<StoredVersion>, StorageError> {
        let file = match tree::open_published(&self.root, agent, rel)? {
            Found::Absent => return Ok(None),
            Found::File(f) => f,
        };
        let shown = || format!("{:?} of agent {agent:?}", rel.as_str());
        let meta = file
            .metadata()
            .map_err(|e| StorageError::io(format!("checking {}", shown()), e))?;
        if let Some(f) = self.inventory().stored(agent, rel.as_str())? {
            if f.size == meta.len() && f.mtime_ns == mtime_ns(&meta) {
                return Ok(Some(StoredVersion {
                    size: f.size,
                    hash: f.hash,
                }));
            }
        }
        let (hash, size) =
            hash_reader(file).map_err(|e| StorageError::io(format!("hashing {}", shown()), e))?;
        self.inventory().record(&StoredFile {
            agent: agent.into(),
            path: rel.to_string(),
            hash,
            size,
            mtime_ns: mtime_ns(&meta),
        })?;
        Ok(Some(StoredVersion { size, hash }))
    }

    /// Opens the partial for `offer`, creating it (and discarding an old one) as needed.
    pub fn open_partial(
        &self,
        agent: &str,
        rel: &RelPath,
        offer: &Offer,
        discard: bool,
    ) -> Result<Partial, StorageError> {
        if discard {
            self.discard_partial(agent, rel)?;
        }
        let (part, log) = self.partial_paths(agent, rel);
        if let Some(dir) = part.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        }
        Partial::open(part, log, rel, offer, self.direct_io, self.ops.clone())
    }

    /// Deletes the partial of `rel`, if any (it belongs to another version).
    pub fn discard_partial(&self, agent: &str, rel: &RelPath) -> Result<(), StorageError> {
        let (part, log) = self.partial_paths(agent, rel);
        remove_if_exists(&part)?;
        remove_if_exists(&log)
    }

    /// Checks the partial against `expected` (the file hash the agent committed to) and
    /// publishes it. The whole-file hash is derived from the chunk values recorded when
    /// each chunk was verified; no data is read again. On a mismatch the partial mixes
    /// chunks of two versions of the source (same size and mtime, other content): it is
    /// discarded and the agent sends the file again.
    ///
    /// Any storage error before the rename discards the partial, so that the retry starts
    /// again from the source: after a failed fsync the page cache cannot be trusted, and
    /// the fsync is never retried. Once the file is renamed into place and its directory
    /// fsynced it is stored, whatever happens to the inventory row (see [`Published`]).
    pub fn publish(
        &self,
        agent: &str,
        mut partial: Partial,
        expected: Hash,
    ) -> Result<Published, PublishError> {
        let result = self.try_publish(agent, &mut partial, expected);
        if let Err(PublishError::Storage(_)) = &result {
            partial.discard();
        }
        result
    }

    fn try_publish(
        &self,
        agent: &str,
        partial: &mut Partial,
        expected: Hash,
    ) -> Result<Published, PublishError> {
        let io = |doing: String| move |e| StorageError::io(doing, e);
        // The published file keeps the source's mtime, like `rsync -a`.
        let mtime = std::time::UNIX_EPOCH
            + std::time::Duration::from_nanos(partial.state.mtime_ns.max(0) as u64);
        partial.file.set_modified(mtime).map_err(io(format!(
            "setting the mtime of {}",
            partial.part_path.display()
        )))?;
        {
            let _op = self.ops.begin(ops::OpKind::Fsync);
            partial
                .file
                .sync_all()
                .map_err(io(format!("fsync {}", partial.part_path.display())))?;
        }
        // Every chunk was verified against its value when it arrived (and re-checked on
        // disk if the partial was resumed): the whole-file hash follows from the values,
        // and must be what the agent derived from its source.
        let derived = partial.derived_hash()?;
        let Some(hash) = derived.filter(|h| *h == expected) else {
            partial.discard();
            return Err(PublishError::Mismatch(format!(
                "{}: whole-file checksum mismatch (the agent committed to {}, the received chunks give {}); \
                 the partial held chunks of another version of the source and was discarded",
                partial.rel,
                short_hex(&expected),
                derived.map_or_else(|| "no hash".to_string(), |h| short_hex(&h)),
            )));
        };
        let rel = partial.rel.clone();
        let target = self.published_path(agent, &rel);
        let parent = self.safe_parent(agent, &rel)?;
        let old = self.stored_version(agent, &rel)?.map(|s| s.hash);
        if old.is_some() {
            // The row must never describe the new file with the old hash: drop it before
            // the rename, so that a failed write of the new row below leaves no row (and
            // the next lookup hashes the file) rather than a stale one.
            self.inventory()
                .forget(agent, rel.as_str())
                .map_err(StorageError::from)?;
        }
        if let Some(old_hash) = old {
            self.move_old_version(agent, &rel, &target, &old_hash)?;
        }
        {
            let _op = self.ops.begin(ops::OpKind::Rename);
            fs::rename(&partial.part_path, &target)
                .map_err(io(format!("renaming into {:?}", target.display())))?;
        }
        if let Err(e) = fsync_dir(&parent, &self.ops) {
            // The rename may not survive a crash: take the file back out (the retry sends
            // it again) rather than acknowledge it.
            let _ = fs::remove_file(&target);
            return Err(e.into());
        }
        // Stored. The row comes before the log's removal (a crash in between leaves a log
        // of published content, which the next lookup removes).
        let inventory_error = self
            .inventory()
            .record(&StoredFile {
                agent: agent.into(),
                path: rel.to_string(),
                hash,
                size: partial.state.size,
                mtime_ns: partial.state.mtime_ns,
            })
            .err()
            .map(StorageError::from);
        let _ = fs::remove_file(&partial.log_path);
        Ok(Published {
            stored_path: rel.to_string(),
            inventory_error,
        })
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
        claim: impl FnMut(&str, &str) -> Option<G>,
    ) -> Sweep {
        partial::sweep(&self.state.join("partial"), max_age, now, claim)
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
                        "{rel:?}: {:?} exists and is not a directory (symlinks are not followed)",
                        next.display()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match fs::create_dir(&next) {
                    Ok(()) => fsync_dir(&dir, &self.ops)?,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(StorageError::io(
                            format!("creating {:?}", next.display()),
                            e,
                        ))
                    }
                },
                Err(e) => {
                    return Err(StorageError::io(
                        format!("checking {:?}", next.display()),
                        e,
                    ))
                }
            }
            dir = next;
        }
        if let Ok(m) = fs::symlink_metadata(dir.join(file_name)) {
            if !m.is_file() {
                return Err(StorageError::Unsafe(format!(
                    "{rel:?}: the target exists and is not a regular file (symlinks are not followed)"
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
        old_hash: &Hash,
    ) -> Result<(), StorageError> {
        let keep = self.state.join("versions").join(agent).join(format!(
            "{rel}.{}",
            &skyferry_common::protocol::hex(old_hash)[..16]
        ));
        if let Some(dir) = keep.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| StorageError::io(format!("creating {:?}", dir.display()), e))?;
        }
        {
            let _op = self.ops.begin(ops::OpKind::Rename);
            fs::rename(target, &keep).map_err(|e| {
                StorageError::io(format!("keeping old version at {:?}", keep.display()), e)
            })?;
        }
        if let Some(dir) = keep.parent() {
            fsync_dir(dir, &self.ops)?;
        }
        tracing::info!(agent = ?agent, path = ?rel.as_str(), kept = ?keep.display(), "new version replaces a stored file; old version kept");
        Ok(())
    }
}

/// What a sweep of abandoned partials removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    pub removed: u64,
    pub bytes: u64,
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

fn remove_if_exists(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StorageError::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path, ops: &ops::Ops) -> Result<(), StorageError> {
    let _op = ops.begin(ops::OpKind::Fsync);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("fsync directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyferry_common::chunk::{chunk_value, hash_bytes, ChunkLayout};
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const CS: u32 = 64 * 1024;

    fn offer(path: &str, data: &[u8]) -> Offer {
        Offer {
            path: path.into(),
            size: data.len() as u64,
            mtime_ns: 1_700_000_000_000_000_000,
            file_hash: None,
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
            let bytes = &data[off as usize..off as usize + len];
            p.write_chunk(i, off, bytes, &chunk_value(&layout, i, bytes))
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

        // The lookup of a resumed partial reads its chunks back: chunk 2 no longer
        // matches its recorded value and is asked for again.
        let state = storage
            .lookup("kiso", &rel, &o)
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
        let bytes = &content[off..off + CS as usize];
        p.write_chunk(2, off as u64, bytes, &chunk_value(&layout, 2, bytes))
            .expect("rewrite");
        storage
            .publish("kiso", p, hash_bytes(&content))
            .expect("publish");
        let stored = fs::read(storage.published_path("kiso", &rel)).expect("read");
        assert!(stored == content, "published bytes equal the source");
    }

    /// Chunks in aligned buffers go to the device with O_DIRECT (ext4 supports it), the
    /// file's unaligned last bytes and chunks in unaligned memory through the page cache;
    /// the published file is the source, byte for byte, either way.
    #[test]
    fn direct_and_buffered_writes_mix_into_identical_bytes() {
        // In the checkout, not /tmp (which may be a tmpfs without O_DIRECT).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let rel = RelPath::parse("d.fits").expect("path");
        let content = data(4 * CS as usize + 4096 + 77);
        let o = offer("d.fits", &content);
        let mut p = storage
            .open_partial("kiso", &rel, &o, false)
            .expect("partial");
        // Where the filesystem takes O_DIRECT (ext4 does), the partial must use it.
        let probe = dir.path().join("probe");
        fs::write(&probe, b"").expect("probe");
        let supported = super::partial::open_direct(&probe).is_some();
        assert_eq!(
            p.direct.is_some(),
            supported,
            "O_DIRECT used where supported"
        );
        if !supported {
            eprintln!(
                "{}: no O_DIRECT here; only the buffered path is tested",
                dir.path().display()
            );
        }
        let layout = ChunkLayout::new(content.len() as u64, CS);
        let mut buf = skyferry_common::buf::AlignedBuf::new();
        for i in 0..layout.count() {
            let off = layout.offset(i) as usize;
            let bytes = &content[off..off + layout.len(i).unwrap_or(0) as usize];
            let value = chunk_value(&layout, i, bytes);
            if i == 1 {
                // One byte off alignment in memory: written through the page cache.
                let mut odd = vec![0u8; bytes.len() + 1];
                odd[1..].copy_from_slice(bytes);
                p.write_chunk(i, off as u64, &odd[1..], &value)
                    .expect("write");
            } else {
                buf.copy_from(bytes);
                p.write_chunk(i, off as u64, &buf, &value).expect("write");
            }
        }
        assert_eq!(p.direct.is_some(), supported, "no write fell back for good");
        storage
            .publish("kiso", p, hash_bytes(&content))
            .expect("publish");
        let stored = fs::read(storage.published_path("kiso", &rel)).expect("read");
        assert!(stored == content, "published bytes equal the source");
    }

    /// The hash derived from the recorded chunk values must be the one the agent
    /// committed to; otherwise nothing is published and the partial goes.
    #[test]
    fn a_commit_with_another_hash_is_never_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let rel = RelPath::parse("m.fits").expect("path");
        let content = data(3 * CS as usize + 1);
        let o = offer("m.fits", &content);
        let mut p = storage
            .open_partial("kiso", &rel, &o, false)
            .expect("partial");
        write_all_chunks(&mut p, &content, &[]);
        match storage.publish("kiso", p, [7; 32]) {
            Err(PublishError::Mismatch(reason)) => {
                assert!(reason.contains("another version"), "{reason}")
            }
            other => panic!("published: {other:?}"),
        }
        assert!(!storage.published_path("kiso", &rel).exists());
        assert!(storage
            .lookup("kiso", &rel, &o)
            .expect("lookup")
            .partial
            .is_none());
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
            storage.publish("kiso", p, hash_bytes(&content)),
            Err(PublishError::Storage(StorageError::Unsafe(_)))
        ));
        assert!(!part.exists() && !log.exists(), "partial discarded");
    }

    /// A size-limited tmpfs for one test, unmounted on drop; `None` when this process
    /// cannot mount (not root, or a container without the permission).
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
            let ok = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size}"),
                    "skyferry-unit",
                ])
                .arg(at)
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                eprintln!("skipped: cannot mount a tmpfs (needs root)");
            }
            ok.then(|| Tmpfs(at.to_owned()))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// Fills the filesystem holding `dir` to the last byte; returns the filler's path.
    fn fill(dir: &Path) -> PathBuf {
        let filler = dir.join("filler");
        let mut f = File::create(&filler).expect("filler");
        for size in [1 << 16, 4096, 512, 1] {
            let block = vec![0xa5u8; size];
            while f.write_all(&block).is_ok() {}
        }
        filler
    }

    /// ENOSPC in the inventory write, after the file was renamed into place: the file is
    /// stored, so publication succeeds (the agent gets `Ack`, not a rejection of a file
    /// the receiver has), and the next lookup hashes the file and heals the row.
    #[test]
    fn a_full_disk_at_the_inventory_write_still_publishes_and_the_row_heals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(_mount) = Tmpfs::mount(dir.path(), "4m") else {
            return;
        };
        let storage = Storage::open(dir.path()).expect("open");
        // A first file, so that SQLite's WAL and shared memory exist before the disk fills.
        let warm = data(CS as usize);
        let rel = RelPath::parse("warm.fits").expect("path");
        let mut p = storage
            .open_partial("kiso", &rel, &offer("warm.fits", &warm), false)
            .expect("partial");
        write_all_chunks(&mut p, &warm, &[]);
        storage
            .publish("kiso", p, hash_bytes(&warm))
            .expect("publish the first file");

        let content = data(2 * CS as usize + 11);
        let rel = RelPath::parse("n/b.fits").expect("path");
        let o = offer("n/b.fits", &content);
        let mut p = storage
            .open_partial("kiso", &rel, &o, false)
            .expect("partial");
        write_all_chunks(&mut p, &content, &[]);
        fs::create_dir_all(dir.path().join("kiso/n")).expect("parent");
        let filler = fill(dir.path());
        assert!(
            File::create(dir.path().join("probe"))
                .and_then(|mut f| f.write_all(&[0; 8192]))
                .is_err(),
            "the filesystem is full"
        );

        if let Err(e) = storage.publish("kiso", p, hash_bytes(&content)) {
            panic!("a file that was renamed into place was rejected: {e}");
        }
        let stored = fs::read(storage.published_path("kiso", &rel)).expect("published");
        assert!(stored == content, "published bytes equal the source");
        let row = storage
            .inventory()
            .stored("kiso", "n/b.fits")
            .expect("query");
        assert!(
            row.is_none(),
            "the inventory write was meant to fail with ENOSPC (test setup)"
        );

        // Space returns; the re-offer (after a lost Ack, say) finds the file by hashing
        // it, records it, and is acknowledged as already stored.
        fs::remove_file(filler).expect("free space");
        let lookup = storage
            .lookup("kiso", &rel, &offer(rel.as_str(), &[]))
            .expect("lookup");
        let hash = hash_bytes(&content);
        assert_eq!(lookup.stored, Some(StoredVersion { size: o.size, hash }));
        let row = storage
            .inventory()
            .stored("kiso", "n/b.fits")
            .expect("query")
            .expect("row healed");
        assert_eq!(row.hash, hash);
    }

    /// The lookup never vouches for a file outside the agent's tree reached through a
    /// symlink in an intermediate component.
    #[test]
    fn the_lookup_does_not_follow_a_symlinked_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let storage = Storage::open(&root).expect("open");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).expect("outside");
        fs::write(outside.join("secret.fits"), b"secret").expect("secret");
        fs::create_dir_all(root.join("kiso")).expect("tree");
        std::os::unix::fs::symlink(&outside, root.join("kiso/link")).expect("symlink");
        let rel = RelPath::parse("link/secret.fits").expect("path");
        match storage.lookup("kiso", &rel, &offer(rel.as_str(), &[])) {
            Ok(l) => assert_eq!(l.stored, None, "vouched for a file outside the tree"),
            Err(e) => assert_eq!(e.to_reject().code, ErrorCode::BadPath, "{e}"),
        }
        // A symlink as the file itself, and a FIFO, are not read either.
        std::os::unix::fs::symlink(outside.join("secret.fits"), root.join("kiso/direct.fits"))
            .expect("symlink");
        let rel = RelPath::parse("direct.fits").expect("path");
        match storage.lookup("kiso", &rel, &offer(rel.as_str(), &[])) {
            Ok(l) => assert_eq!(l.stored, None),
            Err(e) => assert_eq!(e.to_reject().code, ErrorCode::BadPath, "{e}"),
        }
    }

    /// Opening a partial of 1 TiB in 64 KiB chunks allocates no per-chunk state: the
    /// process's resident memory hardly moves (the dense table was ~550 MB).
    #[test]
    fn a_partial_of_one_tib_costs_little_memory() {
        fn rss() -> u64 {
            let s = fs::read_to_string("/proc/self/status").expect("status");
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .expect("VmRSS")
                * 1024
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let before = rss();
        let mut held = Vec::new();
        for i in 0..4 {
            let name = format!("huge{i}.fits");
            let rel = RelPath::parse(&name).expect("path");
            let o = Offer {
                path: name,
                size: 1 << 40,
                mtime_ns: 1,
                file_hash: Some([i; 32]),
                chunk_size: CS,
            };
            let p = match storage.open_partial("kiso", &rel, &o, false) {
                Ok(p) => p,
                // A filesystem that cannot hold a sparse file of 1 TiB: nothing to measure.
                Err(e) => return eprintln!("skipped: {e}"),
            };
            held.push(p);
            let grown = rss().saturating_sub(before);
            assert!(
                grown < 16 << 20,
                "{} partials of 1 TiB cost {grown} bytes",
                i + 1
            );
        }
        assert_eq!(held[0].missing_bytes(), 1 << 40);
    }
}
