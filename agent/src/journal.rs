//! The journal: a SQLite database (WAL) that is the agent's durable queue and its only
//! record of every discovered file and its state. All of the agent's SQL is here.
//!
//! A file version is identified by (root, path, size, mtime); enqueueing is idempotent on
//! that identity, so the same file reported by any number of sources, any number of
//! times, before or after it was shipped, is one row and one transfer. A file that
//! changes is a new identity and a new row; the old row ends `superseded`.
//!
//! States: `pending` → `inflight` → `done` (acknowledged by the receiver), or
//! `vanished` (deleted before it was shipped), `failed` (rejected for good, e.g. bad
//! path), `superseded` (a newer version exists). `inflight` rows are returned to
//! `pending` at startup: the receiver's resume makes re-sending them cheap.
//!
//! One process at a time: a journal opened for writing holds an exclusive `flock` on
//! `<journal>.lock` (which also covers the tally, `<journal>.tally`) until it is dropped.
//! `status` opens it read-only and needs no lock.
//!
//! Damage: `PRAGMA quick_check` when the journal is opened for writing, then
//! [`check_integrity`] (`PRAGMA integrity_check`, which also compares every index with
//! its table) on a connection of its own while the agent already runs, because it takes
//! minutes on ten million rows. A lookup through the identity index re-checks the row it
//! lands on, so that a rescan never trusts an index entry pointing at another file.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use skyferry_common::protocol::Hash;
use skyferry_common::unix_time::now_ns;

/// How long a file waits after the receiver said it cannot take it right now.
const WAIT: Duration = Duration::from_secs(5);

/// Schema version in `PRAGMA user_version`. 2: replays (the `replays` table, `files.replay`).
/// 3: `replay_counts` (files and bytes of each replay by state, kept by triggers) and
/// the files of a replay the receiver acknowledged without data (`replays.present_*`).
/// 4: `state_counts` (files by state, kept by triggers; see [`SCHEMA_4`]).
const SCHEMA_VERSION: i64 = 4;

/// Schema version 4: `state_counts` holds the number of files in each state, kept by
/// triggers on `files` in the transaction that changes a row, so that `status`, the
/// heartbeat and the systemd status line read six rows instead of counting every file
/// (measured on 10 M rows, 8 M done and 2 M pending, on a loaded 2-core machine:
/// `GROUP BY state` 7 s scanning the table, 1.2 s with an index on `state`; the
/// table: under a millisecond). The migration counts once (one scan of the table).
const SCHEMA_4: &str = "BEGIN IMMEDIATE;
    CREATE TABLE state_counts (
        state INTEGER PRIMARY KEY,
        files INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO state_counts (state, files) SELECT state, COUNT(*) FROM files GROUP BY state;
    INSERT OR IGNORE INTO state_counts (state) VALUES (0), (1), (2), (3), (4), (5);
    CREATE TRIGGER state_counts_insert AFTER INSERT ON files
    BEGIN
        UPDATE state_counts SET files = files + 1 WHERE state = NEW.state;
    END;
    CREATE TRIGGER state_counts_delete AFTER DELETE ON files
    BEGIN
        UPDATE state_counts SET files = files - 1 WHERE state = OLD.state;
    END;
    CREATE TRIGGER state_counts_update AFTER UPDATE OF state ON files
    WHEN OLD.state IS NOT NEW.state
    BEGIN
        UPDATE state_counts SET files = files - 1 WHERE state = OLD.state;
        UPDATE state_counts SET files = files + 1 WHERE state = NEW.state;
    END;
    PRAGMA user_version = 4;
    COMMIT;";

/// Exit code when the journal is corrupt (sysexits EX_DATAERR): the operator must rebuild
/// it (docs/operations.md), a restart alone will not help.
pub const EXIT_JOURNAL_CORRUPT: u8 = 65;

/// How many problems of `integrity_check` are quoted in the error.
const INTEGRITY_PROBLEMS_SHOWN: usize = 3;

// Display carries the cause and no variant has a `source()`, so that a message printed
// with `{:#}` states its cause once.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {error}")]
    Sqlite {
        path: String,
        error: rusqlite::Error,
    },
    #[error(
        "journal {path} is in use by another agent ({holder}, holding {lock}); \
         stop it first, or give each agent its own agent.journal"
    )]
    Locked {
        path: String,
        lock: String,
        holder: String,
    },
    #[error("journal {path}: cannot use the lock file {lock}: {error}")]
    Lock {
        path: String,
        lock: String,
        error: std::io::Error,
    },
    #[error(
        "journal {path} is corrupt ({detail}); see docs/operations.md, \"rebuilding the journal\""
    )]
    Corrupt { path: String, detail: String },
    #[error("journal {path} has schema version {found}, newer than this agent understands ({SCHEMA_VERSION})")]
    TooNew { path: String, found: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending = 0,
    Inflight = 1,
    Done = 2,
    Vanished = 3,
    Failed = 4,
    Superseded = 5,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Pending,
        State::Inflight,
        State::Done,
        State::Vanished,
        State::Failed,
        State::Superseded,
    ];

    fn from_code(code: i64) -> Option<State> {
        State::ALL.into_iter().find(|s| *s as i64 == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Inflight => "inflight",
            State::Done => "done",
            State::Vanished => "vanished",
            State::Failed => "failed",
            State::Superseded => "superseded",
        }
    }
}

/// Whether a row in this state (or with an unknown state) says the file is not on disk
/// or needs sending again: a source that finds it on disk must enqueue it.
trait Absent {
    fn is_absent(&self) -> bool;
}

impl Absent for Option<State> {
    fn is_absent(&self) -> bool {
        matches!(self, None | Some(State::Vanished | State::Superseded))
    }
}

/// A file found by a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub root: String,
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
}

/// A file claimed for sending.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    /// Which class the file was claimed in (live, backlog or replay).
    pub class: Class,
    /// The replay that queued it, if one did.
    pub replay: Option<i64>,
    pub root: String,
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub hash: Option<Hash>,
    pub attempts: u32,
}

/// How a transfer attempt ended.
#[derive(Debug, Clone)]
pub enum Finish {
    Done,
    /// Done, and the receiver acknowledged it without data: it already held this
    /// version (counted for the file's replay, if any).
    Present,
    Vanished,
    Superseded,
    Failed(String),
    /// Try again after a backoff; `forget_hash` when the recorded hash is suspect.
    Retry {
        reason: String,
        forget_hash: bool,
    },
    /// The receiver cannot take it right now (storage full, busy, shutting down): back to
    /// pending after a short fixed delay, without counting an attempt. Dispatch itself
    /// pauses while the receiver reports its storage full.
    Wait {
        reason: String,
    },
    /// Interrupted (connection lost, shutdown): back to pending, no backoff.
    Requeue,
}

/// Counts per state plus pending volume.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub by_state: [u64; 6],
    pub pending_bytes: u64,
    /// When the oldest file pending or in flight, not of a replay, was discovered.
    pub oldest_pending_ns: Option<i64>,
}

impl Counts {
    pub fn get(&self, s: State) -> u64 {
        self.by_state[s as usize]
    }
}

/// One class of the queue: its files pending and in flight.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClassQueue {
    pub pending_files: u64,
    pub inflight_files: u64,
    /// Bytes of the files pending or in flight.
    pub bytes: u64,
    /// Since when the oldest of them waits (ns since the epoch): its discovery for live
    /// and backlog files, the creation of its replay for replay files (a resent file
    /// keeps the discovery time of its first send).
    pub oldest_ns: Option<i64>,
}

impl ClassQueue {
    /// Files pending or in flight.
    pub fn files(&self) -> u64 {
        self.pending_files + self.inflight_files
    }

    fn add(&mut self, other: &ClassQueue) {
        self.pending_files += other.pending_files;
        self.inflight_files += other.inflight_files;
        self.bytes += other.bytes;
        self.oldest_ns = match (self.oldest_ns, other.oldest_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The queue (files pending or in flight) by class, as the claim sees it: files of
/// replays (paused ones too) are `replay`; the others are live when their source mtime
/// is at or after the cutoff, else backlog.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    pub live: ClassQueue,
    pub backlog: ClassQueue,
    pub replay: ClassQueue,
}

impl Queue {
    pub fn class(&self, class: Class) -> &ClassQueue {
        match class {
            Class::Live => &self.live,
            Class::Backlog => &self.backlog,
            Class::Replay => &self.replay,
        }
    }

    fn class_mut(&mut self, class: Class) -> &mut ClassQueue {
        match class {
            Class::Live => &mut self.live,
            Class::Backlog => &mut self.backlog,
            Class::Replay => &mut self.replay,
        }
    }

    /// The three classes together.
    pub fn all(&self) -> ClassQueue {
        let mut all = self.live;
        all.add(&self.backlog);
        all.add(&self.replay);
        all
    }
}

pub struct Journal {
    db: Connection,
    path: String,
    /// The `flock` held for as long as this journal is open for writing.
    _lock: Option<File>,
    /// The `synchronous` mode the connection is in now.
    sync: Durability,
}

/// Whether a commit waits for the disk (SQLite's `synchronous`, WAL mode).
///
/// Every commit is atomic; only some must survive a power loss the moment they return.
/// A `Lazy` commit is written to the WAL without an fsync: it becomes durable with the
/// next `Durable` commit (which fsyncs the WAL, and with it every frame before) or
/// checkpoint, and a power loss before that rolls it back, never anything else. Lazy
/// are the commits whose loss the agent repairs by itself: a file in flight (pending
/// again after a restart anyway), a remembered hash (computed again), a file a source
/// can report again (a rescan finds it on disk). A file done, failed, vanished or
/// superseded, and what Redis Streams acknowledge, are `Durable`. Each fsync costs
/// milliseconds (more when other writers keep the disk busy) on the path from a
/// notification to done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous = FULL`: the commit is on disk when it returns.
    Durable,
    /// `synchronous = NORMAL`: on disk with the next durable commit or checkpoint.
    Lazy,
}

/// Brings a version-1 or -2 journal to the current version, one transaction per step;
/// a no-op on a current one. Whoever opens the journal first (agent or `replay`
/// command) does it.
fn migrate(db: &Connection, name: &str) -> Result<(), JournalError> {
    let version: i64 = db
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql(name))?;
    if version < 2 {
        migrate_to_2(db, name)?;
    }
    if version < 3 {
        db.execute_batch(crate::replay::SCHEMA_3)
            .map_err(sql(name))?;
    }
    if version < 4 {
        db.execute_batch(SCHEMA_4).map_err(sql(name))?;
    }
    Ok(())
}

/// Version 2: replays.
fn migrate_to_2(db: &Connection, name: &str) -> Result<(), JournalError> {
    db.execute_batch(
        "BEGIN IMMEDIATE;
         ALTER TABLE files ADD COLUMN replay INTEGER;
         CREATE TABLE replays (
            id            INTEGER PRIMARY KEY,
            name          TEXT NOT NULL,
            created_ns    INTEGER NOT NULL,
            state         INTEGER NOT NULL DEFAULT 0,
            selection     TEXT NOT NULL,
            max_rate      INTEGER,
            queued_files  INTEGER NOT NULL DEFAULT 0,
            queued_bytes  INTEGER NOT NULL DEFAULT 0,
            skipped_files INTEGER NOT NULL DEFAULT 0,
            enqueued      INTEGER NOT NULL DEFAULT 0,
            finished_ns   INTEGER
         );
         DROP INDEX IF EXISTS files_pending_mtime;
         CREATE INDEX files_pending_direct ON files (mtime_ns)
            WHERE state = 0 AND replay IS NULL;
         CREATE INDEX files_pending_replay ON files (replay, id)
            WHERE state = 0 AND replay IS NOT NULL;
         CREATE INDEX files_by_replay ON files (replay, state, size)
            WHERE replay IS NOT NULL;
         PRAGMA user_version = 2;
         COMMIT;",
    )
    .map_err(sql(name))
}

/// The class a file is sent in: live first, then the backlog, then replays (reserved
/// slots, QUIC priority and a byte budget keep the last two from delaying the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Source mtime within `transfer.live_window`, found by a watch or Redis.
    Live,
    /// Older than the live window (outage catch-up), found by a watch or Redis.
    Backlog,
    /// Queued by `skyferry-agent replay`.
    Replay,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Live, Class::Backlog, Class::Replay];

    pub fn name(self) -> &'static str {
        match self {
            Class::Live => "live",
            Class::Backlog => "backlog",
            Class::Replay => "replay",
        }
    }
}

/// Maps an SQLite error to a journal error naming the file.
fn sql(path: &str) -> impl Fn(rusqlite::Error) -> JournalError + '_ {
    move |error| JournalError::Sqlite {
        path: path.to_owned(),
        error,
    }
}

/// Runs `PRAGMA <pragma>`; the problems it found, quoted, when it found any.
fn check(db: &Connection, pragma: &str) -> Result<(), String> {
    let found: Result<Vec<String>, _> = db
        .prepare(&format!("PRAGMA {pragma}({INTEGRITY_PROBLEMS_SHOWN})"))
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
    match found {
        Ok(f) if f.len() == 1 && f[0] == "ok" => Ok(()),
        Ok(f) => Err(format!("{pragma}: {}", f.join("; "))),
        Err(e) => Err(format!("{pragma}: {e}")),
    }
}

/// `PRAGMA integrity_check` on a read-only connection of its own: the b-trees, and
/// every index against its table. An index entry that points at a row holding other
/// values passes `quick_check` and would make rescans skip a file. It reads the whole
/// database: measured at 108 s for 10 M rows (2.7 GB) on a loaded 2-core machine, where
/// `quick_check` took 16 s, so the agent runs it after starting (blocking; run it off
/// the async runtime) and exits with code 65 when it fails.
pub fn check_integrity(path: &Path) -> Result<(), JournalError> {
    let name = path.display().to_string();
    let db =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|error| {
            JournalError::Sqlite {
                path: name.clone(),
                error,
            }
        })?;
    check(&db, "integrity_check").map_err(|detail| JournalError::Corrupt { path: name, detail })
}

/// `<journal>.lock`.
pub fn lock_path(journal: &Path) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the exclusive lock on `<journal>.lock` without waiting, and writes this
/// process's id into it for the next one to name. The lock is released by the kernel
/// when the file is closed, so a killed agent never leaves a stale lock behind.
fn lock(journal: &Path) -> Result<File, JournalError> {
    use rustix::fs::{flock, FlockOperation};
    let lock = lock_path(journal);
    let fail = |error: std::io::Error| JournalError::Lock {
        path: journal.display().to_string(),
        lock: lock.display().to_string(),
        error,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(fail)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => "process unknown".to_owned(),
            };
            return Err(JournalError::Locked {
                path: journal.display().to_string(),
                lock: lock.display().to_string(),
                holder,
            });
        }
        Err(e) => return Err(fail(e.into())),
    }
    file.set_len(0).map_err(fail)?;
    file.rewind().map_err(fail)?;
    writeln!(file, "{}", std::process::id()).map_err(fail)?;
    Ok(file)
}

impl Journal {
    /// Opens (creating if needed) and checks the journal, holding its lock. A corrupt
    /// database, or one another process holds, is refused.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let lock = lock(path)?;
        Journal::open_with(path, Some(lock))
    }

    /// Opens and sets up the database, refusing it unless `PRAGMA quick_check` passes.
    fn open_with(path: &Path, lock: Option<File>) -> Result<Journal, JournalError> {
        let name = path.display().to_string();
        let err = |error| JournalError::Sqlite {
            path: name.clone(),
            error,
        };
        let corrupt = |detail: String| JournalError::Corrupt {
            path: name.clone(),
            detail,
        };
        let db = Connection::open(path).map_err(err)?;
        check(&db, "quick_check").map_err(corrupt)?;
        db.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        // FULL: an acknowledged file is never forgotten, even on power loss. Commits that
        // need not wait for the disk say so ([`Durability::Lazy`]).
        db.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        db.busy_timeout(Duration::from_secs(30)).map_err(err)?;
        let version: i64 = db
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if version > SCHEMA_VERSION {
            return Err(JournalError::TooNew {
                path: name,
                found: version,
            });
        }
        if version == 0 {
            db.execute_batch(
                "CREATE TABLE IF NOT EXISTS files (
                    id            INTEGER PRIMARY KEY,
                    root          TEXT NOT NULL,
                    path          TEXT NOT NULL,
                    size          INTEGER NOT NULL,
                    mtime_ns      INTEGER NOT NULL,
                    hash          BLOB,
                    state         INTEGER NOT NULL DEFAULT 0,
                    attempts      INTEGER NOT NULL DEFAULT 0,
                    not_before    INTEGER NOT NULL DEFAULT 0,
                    last_error    TEXT,
                    discovered_ns INTEGER NOT NULL,
                    finished_ns   INTEGER,
                    UNIQUE (root, path, size, mtime_ns)
                 );
                 CREATE INDEX IF NOT EXISTS files_pending ON files (state, id)
                    WHERE state IN (0, 1);
                 CREATE INDEX IF NOT EXISTS files_by_path ON files (root, path);",
            )
            .map_err(err)?;
            db.pragma_update(None, "user_version", 1).map_err(err)?;
        }
        migrate(&db, &name)?;
        Ok(Journal {
            db,
            path: name,
            _lock: lock,
            sync: Durability::Durable,
        })
    }

    /// Puts the connection in `sync` mode for the next commits (outside a transaction).
    fn sync(&mut self, sync: Durability) -> Result<(), JournalError> {
        if self.sync != sync {
            let mode = match sync {
                Durability::Durable => "FULL",
                Durability::Lazy => "NORMAL",
            };
            self.db
                .pragma_update(None, "synchronous", mode)
                .map_err(sql(&self.path))?;
            self.sync = sync;
        }
        Ok(())
    }

    /// Opens an existing journal for the `replay` commands, which write next to a
    /// running agent: without the agent's lock (SQLite's own locking and the busy
    /// timeout share the database between the two processes) and without the
    /// `quick_check` (minutes on a large journal; the agent runs the checks).
    pub fn open_shared(path: &Path) -> Result<Journal, JournalError> {
        let name = path.display().to_string();
        let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(sql(&name))?;
        db.busy_timeout(Duration::from_secs(30))
            .map_err(sql(&name))?;
        db.pragma_update(None, "synchronous", "FULL")
            .map_err(sql(&name))?;
        let version: i64 = db
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql(&name))?;
        if version > SCHEMA_VERSION {
            return Err(JournalError::TooNew {
                path: name,
                found: version,
            });
        }
        if version == 0 {
            return Err(JournalError::Corrupt {
                path: name,
                detail: "no skyferry schema in it (has the agent run with this config?)".into(),
            });
        }
        migrate(&db, &name)?;
        Ok(Journal {
            db,
            path: name,
            _lock: None,
            sync: Durability::Durable,
        })
    }

    /// The connection, for the replay queries (agent/src/replay.rs).
    pub(crate) fn db(&mut self) -> (&mut Connection, &str) {
        (&mut self.db, &self.path)
    }

    /// Opens for reading only (the `status` command), without creating anything.
    pub fn open_read_only(path: &Path) -> Result<Journal, JournalError> {
        let name = path.display().to_string();
        let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |error| JournalError::Sqlite {
                path: name.clone(),
                error,
            },
        )?;
        Ok(Journal {
            db,
            path: name,
            _lock: None,
            sync: Durability::Durable,
        })
    }

    /// Records discovered files in one durable transaction; returns how many were new.
    /// A file seen again in a state that says it is not on disk (`vanished`,
    /// `superseded`) is on disk after all, with exactly this size and mtime: it is
    /// pending again (and counts as new).
    pub fn enqueue(&mut self, files: &[Discovered]) -> Result<usize, JournalError> {
        self.enqueue_with(files, Durability::Durable)
    }

    /// [`Journal::enqueue`] with the commit's durability: `Lazy` for files a rescan
    /// would find again should a power loss roll the commit back (the watch, rescans,
    /// Redis pub/sub: every file they report lies under a watch root and passed its
    /// rules), `Durable` when the notification is acknowledged on the strength of it
    /// (Redis Streams).
    pub fn enqueue_with(
        &mut self,
        files: &[Discovered],
        sync: Durability,
    ) -> Result<usize, JournalError> {
        self.sync(sync)?;
        let now = now_ns();
        let tx = self.db.transaction().map_err(sql(&self.path))?;
        let mut inserted = 0;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO files (root, path, size, mtime_ns, discovered_ns)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (root, path, size, mtime_ns) DO NOTHING",
                )
                .map_err(sql(&self.path))?;
            // Only for a version already journaled (a separate statement, so that new
            // files, the common case, take the plain insert).
            let mut revive = tx
                .prepare_cached(
                    "UPDATE files SET state = 0, not_before = 0, finished_ns = NULL
                     WHERE root = ?1 AND path = ?2 AND size = ?3 AND mtime_ns = ?4
                       AND state IN (3, 5)
                     RETURNING id",
                )
                .map_err(sql(&self.path))?;
            // The version on disk makes every other unsent version of the path pointless.
            let mut supersede = tx
                .prepare_cached(
                    "UPDATE files SET state = 5, finished_ns = ?3
                     WHERE root = ?1 AND path = ?2 AND state = 0 AND id != ?4",
                )
                .map_err(sql(&self.path))?;
            for f in files {
                let n = insert
                    .execute(params![f.root, f.path, f.size as i64, f.mtime_ns, now])
                    .map_err(sql(&self.path))?;
                let id = if n > 0 {
                    Some(tx.last_insert_rowid())
                } else {
                    revive
                        .query_row(params![f.root, f.path, f.size as i64, f.mtime_ns], |r| {
                            r.get::<_, i64>(0)
                        })
                        .optional()
                        .map_err(sql(&self.path))?
                };
                if let Some(id) = id {
                    inserted += 1;
                    supersede
                        .execute(params![f.root, f.path, now, id])
                        .map_err(sql(&self.path))?;
                }
            }
        }
        tx.commit().map_err(sql(&self.path))?;
        Ok(inserted)
    }

    /// Whether this exact file version needs nothing more from a source: it is
    /// journaled and pending, in flight, done or failed. The row the identity index
    /// points at is read back and compared: when it holds another file the index lies
    /// (damage `integrity_check` would report); the indexes are rebuilt from the table
    /// (ERROR in the log) and the file reads as unknown, so the caller enqueues it.
    pub fn contains(&self, f: &Discovered) -> Result<bool, JournalError> {
        let row = self.lookup(f)?;
        match row {
            None => Ok(false),
            Some(row) if row.0 != *f => {
                tracing::error!(
                    journal = %self.path,
                    root = %f.root,
                    path = ?f.path,
                    row_path = ?row.0.path,
                    "journal damage: its index points at a row holding another file; rebuilding the indexes (look for disk errors, and see docs/operations.md)"
                );
                self.db
                    .execute_batch("REINDEX files")
                    .map_err(sql(&self.path))?;
                Ok(self
                    .lookup(f)?
                    .is_some_and(|r| r.0 == *f && !r.1.is_absent()))
            }
            Some((_, state)) => Ok(!state.is_absent()),
        }
    }

    /// The row the identity index finds for `f`: its values as the table holds them.
    /// Two steps on purpose: a single indexed SELECT takes the columns the index holds
    /// from the index itself, and would never see that the row says otherwise.
    fn lookup(&self, f: &Discovered) -> Result<Option<(Discovered, Option<State>)>, JournalError> {
        self.db
            .prepare_cached(
                "SELECT root, path, size, mtime_ns, state FROM files
                 WHERE id = (SELECT id FROM files
                             WHERE root = ?1 AND path = ?2 AND size = ?3 AND mtime_ns = ?4)",
            )
            .and_then(|mut s| {
                s.query_row(params![f.root, f.path, f.size as i64, f.mtime_ns], |r| {
                    Ok((
                        Discovered {
                            root: r.get(0)?,
                            path: r.get(1)?,
                            size: r.get::<_, i64>(2)? as u64,
                            mtime_ns: r.get(3)?,
                        },
                        State::from_code(r.get(4)?),
                    ))
                })
                .optional()
            })
            .map_err(sql(&self.path))
    }

    /// Returns interrupted transfers to pending (called at startup and after shutdown).
    /// Lazy: a lost update leaves them in flight, which the next start undoes.
    /// Files of replays cancelled meanwhile are unqueued as the cancel would have done.
    pub fn requeue_inflight(&mut self) -> Result<usize, JournalError> {
        self.sync(Durability::Lazy)?;
        let tx = self.db.transaction().map_err(sql(&self.path))?;
        let n = tx
            .execute("UPDATE files SET state = 0 WHERE state = 1", [])
            .and_then(|n| crate::replay::unqueue_cancelled(&tx, None).map(|_| n))
            .map_err(sql(&self.path))?;
        tx.commit().map_err(sql(&self.path))?;
        Ok(n)
    }

    /// Returns one file to `pending` if it is still in flight (its upload was aborted
    /// before it recorded an end; an end recorded meanwhile stands).
    pub fn requeue_if_inflight(&mut self, id: i64) -> Result<(), JournalError> {
        let tx = self.db.transaction().map_err(sql(&self.path))?;
        tx.execute(
            "UPDATE files SET state = 0 WHERE id = ?1 AND state = 1",
            params![id],
        )
        .and_then(|_| crate::replay::unqueue_cancelled(&tx, Some(id)))
        .map_err(sql(&self.path))?;
        tx.commit().map_err(sql(&self.path))
    }

    /// Claims up to `limit` pending files of any class; see [`Journal::claim_classes`].
    pub fn claim(&mut self, limit: usize, live_since_ns: i64) -> Result<Vec<Job>, JournalError> {
        self.claim_classes(limit, limit, live_since_ns)
    }

    /// Claims up to `limit` pending files and marks them in flight, at most `bulk` of
    /// them backlog or replay: live files (no replay, source mtime at or after
    /// `live_since_ns`: tonight's data) first, newest first; then the backlog, oldest
    /// first; then the rows of active replays, oldest replay first, in the order they
    /// were queued. Rows of paused and cancelled replays are skipped. Each class comes
    /// off an index of its own, so a claim costs the same with ten or ten million files
    /// pending. Lazy: a claim lost to a power loss leaves the files pending, where a
    /// restart would put them.
    pub fn claim_classes(
        &mut self,
        limit: usize,
        bulk: usize,
        live_since_ns: i64,
    ) -> Result<Vec<Job>, JournalError> {
        self.sync(Durability::Lazy)?;
        let now = now_ns();
        let path = self.path.clone();
        let tx = self.db.transaction().map_err(sql(&path))?;
        let jobs: Vec<Job> = {
            let mut rows: Vec<Job> = Vec::with_capacity(limit);
            let active: Vec<i64> = tx
                .prepare_cached("SELECT id FROM replays WHERE state = 0 ORDER BY id")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(sql(&path))?;
            let mut queries: Vec<(Class, &str, Option<i64>)> = vec![
                (
                    Class::Live,
                    "SELECT id, root, path, size, mtime_ns, hash, attempts, replay FROM files
                     WHERE state = 0 AND replay IS NULL AND mtime_ns >= ?3 AND not_before <= ?1
                     ORDER BY mtime_ns DESC, id DESC LIMIT ?2",
                    None,
                ),
                (
                    Class::Backlog,
                    "SELECT id, root, path, size, mtime_ns, hash, attempts, replay FROM files
                     WHERE state = 0 AND replay IS NULL AND mtime_ns < ?3 AND not_before <= ?1
                     ORDER BY mtime_ns, id LIMIT ?2",
                    None,
                ),
            ];
            for id in active {
                queries.push((
                    Class::Replay,
                    "SELECT id, root, path, size, mtime_ns, hash, attempts, replay FROM files
                     WHERE state = 0 AND replay IS NOT NULL AND replay = ?3 AND not_before <= ?1
                     ORDER BY replay, id LIMIT ?2",
                    Some(id),
                ));
            }
            let mut bulk_left = bulk;
            for (class, query, replay) in queries {
                let mut want = limit - rows.len();
                if class != Class::Live {
                    want = want.min(bulk_left);
                }
                if want == 0 {
                    continue;
                }
                let third = replay.unwrap_or(live_since_ns);
                let mut select = tx.prepare_cached(query).map_err(sql(&path))?;
                let found = select
                    .query_map(params![now, want as i64, third], |r| {
                        let hash: Option<Vec<u8>> = r.get(5)?;
                        Ok(Job {
                            id: r.get(0)?,
                            class,
                            replay: r.get(7)?,
                            root: r.get(1)?,
                            path: r.get(2)?,
                            size: r.get::<_, i64>(3)? as u64,
                            mtime_ns: r.get(4)?,
                            hash: hash.and_then(|h| h.try_into().ok()),
                            attempts: r.get::<_, i64>(6)? as u32,
                        })
                    })
                    .and_then(|found| found.collect::<Result<Vec<Job>, _>>())
                    .map_err(sql(&path))?;
                if class != Class::Live {
                    bulk_left -= found.len();
                }
                rows.extend(found);
            }
            let mut mark = tx
                .prepare_cached("UPDATE files SET state = 1 WHERE id = ?1")
                .map_err(sql(&path))?;
            for j in &rows {
                let j: &Job = j;
                mark.execute([j.id]).map_err(sql(&path))?;
            }
            rows
        };
        tx.commit().map_err(sql(&path))?;
        Ok(jobs)
    }

    /// Remembers a file's hash for later offers. Lazy: a hash lost is computed again.
    pub fn set_hash(&mut self, id: i64, hash: &Hash) -> Result<(), JournalError> {
        self.sync(Durability::Lazy)?;
        self.db
            .execute(
                "UPDATE files SET hash = ?2 WHERE id = ?1",
                params![id, &hash[..]],
            )
            .map(drop)
            .map_err(sql(&self.path))
    }

    /// Records how an attempt ended: durably, except an interrupted attempt (`Requeue`,
    /// pending again as after a restart). A file pending again whose replay was
    /// cancelled while it was in flight is unqueued as the cancel would have done.
    pub fn finish(&mut self, id: i64, how: &Finish) -> Result<(), JournalError> {
        self.sync(match how {
            Finish::Requeue => Durability::Lazy,
            _ => Durability::Durable,
        })?;
        let now = now_ns();
        let tx = self.db.transaction().map_err(sql(&self.path))?;
        let db = &tx;
        let r = match how {
            Finish::Done => db.execute(
                "UPDATE files SET state = 2, finished_ns = ?2, last_error = NULL WHERE id = ?1",
                params![id, now],
            ),
            Finish::Present => db
                .execute(
                    "UPDATE replays SET present_files = present_files + 1,
                     present_bytes = present_bytes + (SELECT size FROM files WHERE id = ?1)
                     WHERE id = (SELECT replay FROM files WHERE id = ?1 AND state = 1)",
                    params![id],
                )
                .and_then(|_| {
                    db.execute(
                        "UPDATE files SET state = 2, finished_ns = ?2, last_error = NULL
                         WHERE id = ?1",
                        params![id, now],
                    )
                }),
            Finish::Vanished => db.execute(
                "UPDATE files SET state = 3, finished_ns = ?2 WHERE id = ?1",
                params![id, now],
            ),
            Finish::Superseded => db.execute(
                "UPDATE files SET state = 5, finished_ns = ?2 WHERE id = ?1",
                params![id, now],
            ),
            Finish::Failed(reason) => db.execute(
                "UPDATE files SET state = 4, finished_ns = ?2, last_error = ?3,
                 attempts = attempts + 1 WHERE id = ?1",
                params![id, now, reason],
            ),
            Finish::Retry {
                reason,
                forget_hash,
            } => db.execute(
                // Backoff 2^attempts seconds, capped at 5 minutes.
                "UPDATE files SET state = 0, attempts = attempts + 1, last_error = ?2,
                 not_before = ?3 + (MIN(300, 1 << MIN(attempts, 9)) * 1000000000),
                 hash = CASE WHEN ?4 THEN NULL ELSE hash END
                 WHERE id = ?1",
                params![id, reason, now, forget_hash],
            ),
            Finish::Wait { reason } => db.execute(
                "UPDATE files SET state = 0, last_error = ?2, not_before = ?3 WHERE id = ?1",
                params![id, reason, now + WAIT.as_nanos() as i64],
            ),
            Finish::Requeue => db.execute("UPDATE files SET state = 0 WHERE id = ?1", params![id]),
        };
        let pending_again = matches!(
            how,
            Finish::Retry { .. } | Finish::Wait { .. } | Finish::Requeue
        );
        r.and_then(|_| {
            if pending_again {
                crate::replay::unqueue_cancelled(&tx, Some(id))?;
            }
            Ok(())
        })
        .map_err(sql(&self.path))?;
        tx.commit().map_err(sql(&self.path))
    }

    /// The queue by class for the live cutoff `live_since_ns` (see [`Journal::claim`]).
    /// Each part comes off an index: pending live and backlog files off
    /// `files_pending_direct` (a range of mtimes each), files in flight off
    /// `files_pending`, pending replay files from `replay_counts`, so that it costs
    /// little next to millions of files done (measured in docs/operations.md, "Status").
    pub fn queue(&self, live_since_ns: i64) -> Result<Queue, JournalError> {
        let mut q = Queue::default();
        let n = |v: i64| v.max(0) as u64;
        for (class, op) in [(Class::Live, ">="), (Class::Backlog, "<")] {
            let (files, bytes, oldest): (i64, i64, Option<i64>) = self
                .db
                .prepare_cached(&format!(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(discovered_ns) FROM files
                     WHERE state = 0 AND replay IS NULL AND mtime_ns {op} ?1"
                ))
                .and_then(|mut s| {
                    s.query_row([live_since_ns], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                })
                .map_err(sql(&self.path))?;
            *q.class_mut(class) = ClassQueue {
                pending_files: n(files),
                bytes: n(bytes),
                oldest_ns: oldest,
                ..ClassQueue::default()
            };
        }
        // Replay files waiting: the counts the triggers keep, and the oldest replay
        // that still has files to send.
        let (files, bytes, oldest): (i64, i64, Option<i64>) = self
            .db
            .prepare_cached(
                "SELECT COALESCE(SUM(files), 0), COALESCE(SUM(bytes), 0),
                        (SELECT MIN(r.created_ns) FROM replays r
                         WHERE EXISTS (SELECT 1 FROM replay_counts c WHERE c.replay = r.id
                                       AND c.state IN (0, 1) AND c.files > 0))
                 FROM replay_counts WHERE state = 0",
            )
            .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
            .map_err(sql(&self.path))?;
        q.replay = ClassQueue {
            pending_files: n(files),
            bytes: n(bytes),
            oldest_ns: oldest,
            ..ClassQueue::default()
        };
        // In flight: at most `parallel_files` rows. `state IN (0, 1)` lets SQLite take
        // the partial index (with `state = 1` alone it scans the table: 2 s at 10 M rows).
        let mut stmt = self
            .db
            .prepare_cached(
                "SELECT replay IS NOT NULL, mtime_ns >= ?1, size, discovered_ns FROM files
                 WHERE state IN (0, 1) AND state = 1",
            )
            .map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([live_since_ns], |r| {
                Ok((
                    r.get::<_, bool>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(sql(&self.path))?;
        for row in rows {
            let (replay, live, size, discovered) = row.map_err(sql(&self.path))?;
            let class = match (replay, live) {
                (true, _) => Class::Replay,
                (false, true) => Class::Live,
                (false, false) => Class::Backlog,
            };
            let c = q.class_mut(class);
            c.inflight_files += 1;
            c.bytes += n(size);
            if class != Class::Replay {
                c.oldest_ns = Some(c.oldest_ns.map_or(discovered, |o| o.min(discovered)));
            }
        }
        Ok(q)
    }

    /// Files by state, and the bytes of those pending or in flight. Reads
    /// `state_counts` (a journal of an older schema, which `status` opens read-only
    /// before the agent migrated it, is counted row by row) and [`Journal::queue`].
    pub fn counts(&self) -> Result<Counts, JournalError> {
        let mut c = Counts::default();
        let version: i64 = self
            .db
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql(&self.path))?;
        let query = if version >= 4 {
            "SELECT state, files FROM state_counts"
        } else {
            "SELECT state, COUNT(*) FROM files GROUP BY state"
        };
        let mut stmt = self.db.prepare_cached(query).map_err(sql(&self.path))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(sql(&self.path))?;
        for row in rows {
            let (state, n) = row.map_err(sql(&self.path))?;
            if let Some(slot) = c.by_state.get_mut(state as usize) {
                *slot = n.max(0) as u64;
            }
        }
        // Every file not of a replay counts as live with the cutoff at the beginning of
        // time: one range of the pending index.
        let q = self.queue(i64::MIN)?;
        c.pending_bytes = q.all().bytes;
        c.oldest_pending_ns = q.live.oldest_ns;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64, mtime: i64) -> Discovered {
        Discovered {
            root: "/data".into(),
            path: path.into(),
            size,
            mtime_ns: mtime,
        }
    }

    /// `PRAGMA synchronous` of the connection: 1 NORMAL, 2 FULL.
    fn synchronous(j: &Journal) -> i64 {
        j.db.pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn only_the_commits_the_agent_can_repair_skip_the_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        assert_eq!(synchronous(&j), 2, "durable unless a commit says otherwise");
        j.enqueue_with(&[file("a", 1, 1), file("b", 1, 1)], Durability::Lazy)
            .unwrap();
        assert_eq!(synchronous(&j), 1);
        j.enqueue(&[file("c", 1, 1)]).unwrap();
        assert_eq!(synchronous(&j), 2, "enqueue without a say is durable");
        let jobs = j.claim(10, 0).unwrap();
        assert_eq!(synchronous(&j), 1, "a claim is lazy");
        j.set_hash(jobs[0].id, &[7; 32]).unwrap();
        assert_eq!(synchronous(&j), 1, "a remembered hash is lazy");
        // Each end of an attempt, after lazy commits: durable.
        for (job, how) in jobs.iter().zip([
            Finish::Done,
            Finish::Failed("bad_path".into()),
            Finish::Retry {
                reason: "x".into(),
                forget_hash: false,
            },
        ]) {
            j.claim(0, 0).unwrap();
            assert_eq!(synchronous(&j), 1);
            j.finish(job.id, &how).unwrap();
            assert_eq!(
                synchronous(&j),
                2,
                "{how:?} must be on disk when it returns"
            );
        }
        j.finish(jobs[2].id, &Finish::Requeue).unwrap();
        assert_eq!(synchronous(&j), 1, "an interrupted attempt is lazy");
        // Whatever the mode, the rows are there for the connection.
        let c = j.counts().unwrap();
        assert_eq!(
            (
                c.get(State::Done),
                c.get(State::Failed),
                c.get(State::Pending)
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn enqueue_is_idempotent_and_new_versions_supersede() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        assert_eq!(j.enqueue(&[file("a", 1, 1), file("a", 1, 1)]).unwrap(), 1);
        assert_eq!(j.enqueue(&[file("a", 1, 1)]).unwrap(), 0);
        let jobs = j.claim(10, 0).unwrap();
        assert_eq!(jobs.len(), 1);
        j.finish(jobs[0].id, &Finish::Done).unwrap();
        // The same version again after shipping: still nothing to do.
        assert_eq!(j.enqueue(&[file("a", 1, 1)]).unwrap(), 0);
        assert!(j.claim(10, 0).unwrap().is_empty());
        // Two new versions: the older unsent one is superseded.
        j.enqueue(&[file("a", 2, 2)]).unwrap();
        j.enqueue(&[file("a", 3, 3)]).unwrap();
        let jobs = j.claim(10, 0).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].size, 3);
        let c = j.counts().unwrap();
        assert_eq!(c.get(State::Superseded), 1);
        assert_eq!(c.get(State::Done), 1);
        assert_eq!(c.get(State::Inflight), 1);
    }

    #[test]
    fn interrupted_work_is_requeued_and_retries_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        let mut j = Journal::open(&path).unwrap();
        j.enqueue(&[file("a", 1, 1), file("b", 1, 1)]).unwrap();
        let jobs = j.claim(10, 0).unwrap();
        drop(j);
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.requeue_inflight().unwrap(), 2);
        j.finish(
            jobs[0].id,
            &Finish::Retry {
                reason: "storage full".into(),
                forget_hash: false,
            },
        )
        .unwrap();
        // The retried file waits for its backoff; the other is available now.
        let again = j.claim(10, 0).unwrap();
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].path, jobs[0].path);
    }

    #[test]
    fn live_files_go_first_newest_first_then_the_backlog_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        // mtimes: backlog 10, 20; live 100, 200 (cutoff 50), enqueued in mixed order.
        j.enqueue(&[
            file("b20", 1, 20),
            file("l100", 1, 100),
            file("b10", 1, 10),
            file("l200", 1, 200),
        ])
        .unwrap();
        let order: Vec<String> = (0..4)
            .map(|_| j.claim(1, 50).unwrap().remove(0).path)
            .collect();
        assert_eq!(order, ["l200", "l100", "b10", "b20"]);
    }

    #[test]
    fn the_queue_splits_live_backlog_and_replays_at_the_cutoff_and_leaves_done_files_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        assert_eq!(j.queue(50).unwrap(), Queue::default());
        j.enqueue(&[
            file("b10", 3, 10),
            file("b49", 5, 49),
            file("l50", 7, 50),
            file("l200", 11, 200),
        ])
        .unwrap();
        let q = j.queue(50).unwrap();
        assert_eq!((q.live.files(), q.live.bytes), (2, 18));
        assert_eq!((q.backlog.files(), q.backlog.bytes), (2, 8));
        assert_eq!(q.replay, ClassQueue::default());
        assert!(q.live.oldest_ns.is_some() && q.backlog.oldest_ns.is_some());
        // A replay's files are its own class whatever their mtime, paused or not.
        let r = j.create_replay("r", "", None).unwrap();
        j.enqueue_replay(r, &[file("r1", 13, 300), file("r2", 17, 1)], false)
            .unwrap();
        j.set_replay_state(r, crate::replay::ReplayState::Paused)
            .unwrap();
        let q = j.queue(50).unwrap();
        assert_eq!((q.replay.pending_files, q.replay.bytes), (2, 30));
        assert_eq!((q.live.files(), q.backlog.files()), (2, 2));
        assert_eq!((q.all().files(), q.all().bytes), (6, 56));
        // In flight still counts, in its class; done does not.
        j.set_replay_state(r, crate::replay::ReplayState::Active)
            .unwrap();
        let jobs = j.claim(2, 50).unwrap();
        let q = j.queue(50).unwrap();
        assert_eq!((q.live.pending_files, q.live.inflight_files), (0, 2));
        assert_eq!(q.live.bytes, 18);
        for job in &jobs {
            j.finish(job.id, &Finish::Done).unwrap();
        }
        let rows = j.claim(10, 50).unwrap();
        let q = j.queue(50).unwrap();
        assert_eq!((q.live.files(), q.backlog.inflight_files), (0, 2));
        assert_eq!((q.replay.inflight_files, q.replay.bytes), (2, 30));
        for job in &rows {
            j.finish(job.id, &Finish::Done).unwrap();
        }
        assert_eq!(j.queue(50).unwrap(), Queue::default());
    }

    fn pending_bytes(j: &Journal) -> u64 {
        j.db.query_row(
            "SELECT COALESCE(SUM(size), 0) FROM files WHERE state IN (0, 1)",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn state_counts_follow_every_change_and_match_a_recount() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let recount = |j: &Journal| {
            let mut c = [0u64; 6];
            let mut stmt =
                j.db.prepare("SELECT state, COUNT(*) FROM files GROUP BY state")
                    .unwrap();
            for row in stmt
                .query_map([], |r| Ok((r.get::<_, usize>(0)?, r.get::<_, u64>(1)?)))
                .unwrap()
            {
                let (s, n) = row.unwrap();
                c[s] = n;
            }
            c
        };
        j.enqueue(&[
            file("a", 1, 1),
            file("b", 2, 1),
            file("c", 3, 1),
            file("a", 1, 1),
        ])
        .unwrap();
        let jobs = j.claim(3, 0).unwrap();
        j.finish(jobs[0].id, &Finish::Done).unwrap();
        j.finish(jobs[1].id, &Finish::Failed("bad_path".into()))
            .unwrap();
        j.enqueue(&[file("c", 4, 2)]).unwrap(); // supersedes nothing: c/3 in flight
        j.requeue_inflight().unwrap();
        j.enqueue(&[file("c", 5, 3)]).unwrap(); // supersedes c/3 and c/4
        let r = j.create_replay("r", "", None).unwrap();
        j.enqueue_replay(r, &[file("d", 6, 1), file("a", 1, 1)], true)
            .unwrap();
        j.set_replay_state(r, crate::replay::ReplayState::Cancelled)
            .unwrap();
        let c = j.counts().unwrap();
        assert_eq!(c.by_state, recount(&j));
        assert_eq!((c.get(State::Done), c.get(State::Failed)), (1, 1));
        assert_eq!(
            c.by_state.iter().sum::<u64>(),
            5,
            "a, b, c in 3 versions; d removed"
        );
        assert_eq!(c.pending_bytes, pending_bytes(&j));
    }

    #[test]
    fn corrupt_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        std::fs::write(
            &path,
            b"this is not a database, just text that looks nothing like one",
        )
        .unwrap();
        let err = Journal::open(&path).err().expect("must refuse");
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_file_found_again_after_vanished_or_superseded_is_pending_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        j.enqueue(&[file("a", 1, 1)]).unwrap();
        let jobs = j.claim(10, 0).unwrap();
        j.finish(jobs[0].id, &Finish::Vanished).unwrap();
        // Back on disk with the same size and mtime (restored from a backup, say).
        assert!(!j.contains(&file("a", 1, 1)).unwrap());
        assert_eq!(j.enqueue(&[file("a", 1, 1)]).unwrap(), 1);
        assert_eq!(j.claim(10, 0).unwrap()[0].path, "a");
        // A newer version replaced an unsent one, then the old one came back.
        j.enqueue(&[file("b", 1, 1)]).unwrap();
        j.enqueue(&[file("b", 2, 2)]).unwrap();
        assert_eq!(j.enqueue(&[file("b", 1, 1)]).unwrap(), 1);
        let jobs = j.claim(10, 0).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].path.as_str(), jobs[0].size), ("b", 1));
        // Done and failed stay done and failed.
        j.finish(jobs[0].id, &Finish::Done).unwrap();
        assert!(j.contains(&file("b", 1, 1)).unwrap());
        assert_eq!(j.enqueue(&[file("b", 1, 1)]).unwrap(), 0);
    }

    /// Flips one byte of `needle` where it sits in a table leaf page of the database
    /// (not in an index page): the row then holds another value than its index entries.
    fn flip_in_table_row(db: &Path, needle: &[u8]) {
        let bytes = std::fs::read(db).unwrap();
        let page = match u16::from_be_bytes([bytes[16], bytes[17]]) {
            1 => 65536,
            n => usize::from(n),
        };
        let at: Vec<usize> = bytes
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .filter(|i| {
                let start = i / page * page;
                let header = if start == 0 { 100 } else { start };
                bytes[header] == 0x0D // b-tree leaf page of a table
            })
            .collect();
        assert_eq!(at.len(), 1, "one table row holds {needle:?}");
        let mut bytes = bytes;
        bytes[at[0] + needle.len() - 1] ^= 0x01;
        std::fs::write(db, bytes).unwrap();
    }

    #[test]
    fn a_byte_flipped_in_a_pending_row_is_refused_at_open_and_rescans_converge_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        let mut j = Journal::open(&path).unwrap();
        j.enqueue(&[file("n/det07.fits", 10, 1), file("n/det08.fits", 10, 1)])
            .unwrap();
        drop(j); // the last connection: the WAL is checkpointed into the file
        flip_in_table_row(&path, b"n/det07.fits");
        let err = check_integrity(&path).expect_err("the damage is detected");
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("integrity_check"), "{err}");

        // Until the check ends (or when the damage came later): the index still finds
        // det07 and points at the row that now holds "det07.fitr".
        let mut j = Journal::open(&path).unwrap();
        let det07 = file("n/det07.fits", 10, 1);
        assert!(!j.contains(&det07).unwrap(), "a rescan must not skip det07");
        assert_eq!(j.enqueue(&[det07]).unwrap(), 1);
        let mut claimed: Vec<String> = j
            .claim(10, 0)
            .unwrap()
            .into_iter()
            .map(|j| j.path)
            .collect();
        claimed.sort();
        assert_eq!(claimed, ["n/det07.fitr", "n/det07.fits", "n/det08.fits"]);
        // The indexes were rebuilt: the journal checks clean again.
        check_integrity(&path).unwrap();
    }
}
