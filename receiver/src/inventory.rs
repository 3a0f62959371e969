//! The inventory: which file version is published at each path, with its BLAKE3.
//!
//! It answers "do we already have this?" without re-reading stored files, and is the
//! receiver's side of a journal rebuild (docs/operations.md). All SQL of the receiver's
//! storage lives here.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use skyferry_common::protocol::Hash;

/// Schema version, stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

pub struct Inventory {
    db: Connection,
}

pub struct StoredFile {
    pub agent: String,
    pub path: String,
    pub hash: Hash,
    pub size: u64,
    pub mtime_ns: i64,
}

impl Inventory {
    pub fn open(path: &Path) -> rusqlite::Result<Inventory> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // The published file is already fsynced and renamed when a row is written, and a
        // lost row is recovered by hashing the file: NORMAL is durable enough.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version == 0 {
            db.execute_batch(
                "CREATE TABLE IF NOT EXISTS stored (
                    agent     TEXT NOT NULL,
                    path      TEXT NOT NULL,
                    hash      BLOB NOT NULL,
                    size      INTEGER NOT NULL,
                    mtime_ns  INTEGER NOT NULL,
                    stored_at INTEGER NOT NULL,
                    PRIMARY KEY (agent, path)
                 ) WITHOUT ROWID;",
            )?;
            db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        Ok(Inventory { db })
    }

    pub fn stored(&self, agent: &str, path: &str) -> rusqlite::Result<Option<StoredFile>> {
        self.db
            .prepare_cached(
                "SELECT hash, size, mtime_ns FROM stored WHERE agent = ?1 AND path = ?2",
            )?
            .query_row(params![agent, path], |r| {
                let blob: Vec<u8> = r.get(0)?;
                let mut hash = [0u8; 32];
                if blob.len() == 32 {
                    hash.copy_from_slice(&blob);
                }
                Ok(StoredFile {
                    agent: agent.to_owned(),
                    path: path.to_owned(),
                    hash,
                    size: r.get::<_, i64>(1)? as u64,
                    mtime_ns: r.get(2)?,
                })
            })
            .optional()
    }

    pub fn record(&self, f: &StoredFile) -> rusqlite::Result<()> {
        let now = skyferry_common::unix_time::now_ns() / 1_000_000_000;
        self.db
            .prepare_cached(
                "INSERT INTO stored (agent, path, hash, size, mtime_ns, stored_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (agent, path) DO UPDATE SET
                   hash = excluded.hash, size = excluded.size,
                   mtime_ns = excluded.mtime_ns, stored_at = excluded.stored_at",
            )?
            .execute(params![
                f.agent,
                f.path,
                &f.hash[..],
                f.size as i64,
                f.mtime_ns,
                now
            ])?;
        Ok(())
    }

    /// Every row, with the time it was stored (Unix seconds), in (agent, path) order: what
    /// `catalog rebuild` walks.
    pub fn all(&self) -> rusqlite::Result<Vec<(StoredFile, i64)>> {
        let mut stmt = self.db.prepare(
            "SELECT agent, path, hash, size, mtime_ns, stored_at FROM stored ORDER BY agent, path",
        )?;
        let rows = stmt.query_map([], |r| {
            let blob: Vec<u8> = r.get(2)?;
            let mut hash = [0u8; 32];
            if blob.len() == 32 {
                hash.copy_from_slice(&blob);
            }
            Ok((
                StoredFile {
                    agent: r.get(0)?,
                    path: r.get(1)?,
                    hash,
                    size: r.get::<_, i64>(3)? as u64,
                    mtime_ns: r.get(4)?,
                },
                r.get(5)?,
            ))
        })?;
        rows.collect()
    }

    /// Removes the row of (agent, path), if any.
    pub fn forget(&self, agent: &str, path: &str) -> rusqlite::Result<()> {
        self.db
            .prepare_cached("DELETE FROM stored WHERE agent = ?1 AND path = ?2")?
            .execute(params![agent, path])?;
        Ok(())
    }
}
