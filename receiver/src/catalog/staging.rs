//! The catalog's source of truth: a SQLite database of one row per stored file version,
//! keyed by (agent, path, BLAKE3), and the nights whose Arrow file is out of date. All of
//! the catalog's SQL is here.
//!
//! A row is committed with `synchronous = FULL` before the file is acknowledged: after a
//! crash or power loss a file the agent has as done has its row. The row and its night's
//! "dirty" mark go in one transaction, so a crash before the Arrow file is rewritten is
//! repaired by the exporter at the next start.

use std::path::Path;

use chrono::NaiveDate;
use rusqlite::{params, Connection, OptionalExtension};

use super::row::{Fields, Row};

/// Schema version, in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

pub struct Staging {
    db: Connection,
}

/// What [`Staging::insert`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A new version row.
    New { version: u32, superseded: usize },
    /// The row was there already (a re-offer): nothing changed.
    Present,
}

impl Staging {
    pub fn open(path: &Path) -> rusqlite::Result<Staging> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // The row is the promise behind the agent's `done`: it must survive power loss.
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(30))?;
        let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version == 0 {
            db.execute_batch(
                "CREATE TABLE IF NOT EXISTS files (
                    agent         TEXT NOT NULL,
                    path          TEXT NOT NULL,
                    blake3        BLOB NOT NULL,
                    version       INTEGER NOT NULL,
                    size          INTEGER NOT NULL,
                    mtime_ns      INTEGER NOT NULL,
                    received_at   INTEGER NOT NULL,
                    superseded_at INTEGER,
                    night         TEXT NOT NULL,
                    fields        TEXT NOT NULL,
                    PRIMARY KEY (agent, path, blake3)
                 ) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS files_night ON files (night);
                 CREATE TABLE IF NOT EXISTS dirty_nights (
                    night TEXT PRIMARY KEY,
                    generation INTEGER NOT NULL
                 ) WITHOUT ROWID;",
            )?;
            db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        } else if version != SCHEMA_VERSION {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISMATCH),
                Some(format!(
                    "catalog database schema {version} is not the supported {SCHEMA_VERSION}"
                )),
            ));
        }
        Ok(Staging { db })
    }

    /// Whether the version (agent, path, hash) has a row that is current.
    pub fn has_current(&self, agent: &str, path: &str, hash: &[u8; 32]) -> rusqlite::Result<bool> {
        self.db
            .prepare_cached(
                "SELECT superseded_at IS NULL FROM files
                 WHERE agent = ?1 AND path = ?2 AND blake3 = ?3",
            )?
            .query_row(params![agent, path, &hash[..]], |r| r.get::<_, bool>(0))
            .optional()
            .map(|v| v == Some(true))
    }

    /// Records `row` (its `version` and `superseded_at_us` are ignored: they are derived
    /// here) and marks every other current version of its path superseded, in one
    /// transaction. The same content under the same path again (a re-offer) changes
    /// nothing; content that was superseded and comes back (A → B → A) makes its old row
    /// current again rather than adding a second row of the same bytes.
    pub fn insert(&mut self, row: &Row, now_us: i64) -> rusqlite::Result<Inserted> {
        let tx = self.db.transaction()?;
        let inserted = insert_in(&tx, row, now_us)?;
        tx.commit()?;
        Ok(inserted)
    }

    /// [`Staging::insert`] of several rows in one transaction (one fsync): each row in a
    /// savepoint of its own, so that a row that fails is rolled back alone and the others
    /// still commit. The outer error is the commit's, which fails them all.
    pub fn insert_all(
        &mut self,
        rows: &[Row],
        now_us: i64,
    ) -> rusqlite::Result<Vec<rusqlite::Result<Inserted>>> {
        let mut tx = self.db.transaction()?;
        let mut results = Vec::with_capacity(rows.len());
        for row in rows {
            let sp = tx.savepoint()?;
            let r = insert_in(&sp, row, now_us);
            if r.is_ok() {
                sp.commit()?;
            }
            // Dropping an uncommitted savepoint rolls it back.
            results.push(r);
        }
        tx.commit()?;
        Ok(results)
    }

    /// Every row of `night`, in no particular order.
    pub fn night_rows(&self, night: NaiveDate) -> rusqlite::Result<Vec<Row>> {
        let mut stmt = self.db.prepare_cached(
            "SELECT agent, path, blake3, version, size, mtime_ns, received_at, superseded_at,
                    night, fields
             FROM files WHERE night = ?1",
        )?;
        let rows = stmt.query_map(params![night.to_string()], row_of)?;
        rows.collect()
    }

    /// Every row, of every night (for comparisons and tests).
    pub fn all_rows(&self) -> rusqlite::Result<Vec<Row>> {
        let mut stmt = self.db.prepare_cached(
            "SELECT agent, path, blake3, version, size, mtime_ns, received_at, superseded_at,
                    night, fields
             FROM files ORDER BY agent, path, version",
        )?;
        let rows = stmt.query_map([], row_of)?;
        rows.collect()
    }

    pub fn nights(&self) -> rusqlite::Result<Vec<NaiveDate>> {
        let mut stmt = self
            .db
            .prepare_cached("SELECT DISTINCT night FROM files ORDER BY night")?;
        let nights = stmt.query_map([], |r| r.get::<_, String>(0))?;
        nights
            .filter_map(|n| n.map(|s| s.parse().ok()).transpose())
            .collect()
    }

    pub fn dirty_nights(&self) -> rusqlite::Result<Vec<NaiveDate>> {
        let mut stmt = self
            .db
            .prepare_cached("SELECT night FROM dirty_nights ORDER BY night")?;
        let nights = stmt.query_map([], |r| r.get::<_, String>(0))?;
        nights
            .filter_map(|n| n.map(|s| s.parse().ok()).transpose())
            .collect()
    }

    /// Marks every night out of date (after a rebuild, or a lost catalog directory).
    pub fn mark_all_dirty(&self) -> rusqlite::Result<()> {
        self.db.execute_batch(
            "INSERT INTO dirty_nights (night, generation) SELECT DISTINCT night, 1 FROM files
             WHERE true ON CONFLICT (night) DO UPDATE SET generation = generation + 1",
        )
    }

    /// The rows of `night` and the generation of its mark, read together: the exporter
    /// writes the file from these rows and then calls [`Staging::clean`] with the
    /// generation, which keeps the mark if a row arrived in between.
    pub fn export_snapshot(&mut self, night: NaiveDate) -> rusqlite::Result<(Vec<Row>, i64)> {
        let tx = self.db.transaction()?;
        let generation: i64 = tx
            .prepare_cached("SELECT generation FROM dirty_nights WHERE night = ?1")?
            .query_row(params![night.to_string()], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let rows = {
            let mut stmt = tx.prepare_cached(
                "SELECT agent, path, blake3, version, size, mtime_ns, received_at, superseded_at,
                        night, fields
                 FROM files WHERE night = ?1",
            )?;
            let rows = stmt.query_map(params![night.to_string()], row_of)?;
            rows.collect::<rusqlite::Result<Vec<Row>>>()?
        };
        tx.commit()?;
        Ok((rows, generation))
    }

    /// Clears `night`'s mark if it is still at `generation`.
    pub fn clean(&self, night: NaiveDate, generation: i64) -> rusqlite::Result<()> {
        self.db
            .prepare_cached("DELETE FROM dirty_nights WHERE night = ?1 AND generation = ?2")?
            .execute(params![night.to_string(), generation])?;
        Ok(())
    }
}

/// One row's part of [`Staging::insert`], inside the caller's transaction.
fn insert_in(tx: &rusqlite::Connection, row: &Row, now_us: i64) -> rusqlite::Result<Inserted> {
    let existing: Option<Option<i64>> = tx
        .prepare_cached(
            "SELECT superseded_at FROM files WHERE agent = ?1 AND path = ?2 AND blake3 = ?3",
        )?
        .query_row(params![row.agent, row.path, &row.blake3[..]], |r| r.get(0))
        .optional()?;
    if existing == Some(None) {
        return Ok(Inserted::Present);
    }
    let mut nights: Vec<String> = tx
        .prepare_cached(
            "SELECT night FROM files WHERE agent = ?1 AND path = ?2 AND blake3 != ?3
               AND superseded_at IS NULL",
        )?
        .query_map(params![row.agent, row.path, &row.blake3[..]], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let superseded = tx
        .prepare_cached(
            "UPDATE files SET superseded_at = ?4 WHERE agent = ?1 AND path = ?2
               AND blake3 != ?3 AND superseded_at IS NULL",
        )?
        .execute(params![row.agent, row.path, &row.blake3[..], now_us])?;
    let night = row.night.to_string();
    let version = if existing.is_some() {
        tx.prepare_cached(
            "UPDATE files SET superseded_at = NULL WHERE agent = ?1 AND path = ?2 AND blake3 = ?3",
        )?
        .execute(params![row.agent, row.path, &row.blake3[..]])?;
        tx.prepare_cached(
            "SELECT version FROM files WHERE agent = ?1 AND path = ?2 AND blake3 = ?3",
        )?
        .query_row(params![row.agent, row.path, &row.blake3[..]], |r| r.get(0))?
    } else {
        let version: u32 = tx
            .prepare_cached(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM files WHERE agent = ?1 AND path = ?2",
            )?
            .query_row(params![row.agent, row.path], |r| r.get(0))?;
        let fields = serde_json::to_string(&row.fields)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        tx.prepare_cached(
            "INSERT INTO files (agent, path, blake3, version, size, mtime_ns, received_at,
                                superseded_at, night, fields)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9)",
        )?
        .execute(params![
            row.agent,
            row.path,
            &row.blake3[..],
            version,
            row.size_bytes as i64,
            row.mtime_ns,
            row.received_at_us,
            night,
            fields
        ])?;
        version
    };
    nights.push(night);
    for n in &nights {
        tx.prepare_cached(
            "INSERT INTO dirty_nights (night, generation) VALUES (?1, 1)
             ON CONFLICT (night) DO UPDATE SET generation = generation + 1",
        )?
        .execute(params![n])?;
    }
    Ok(Inserted::New {
        version,
        superseded,
    })
}

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let blob: Vec<u8> = r.get(2)?;
    let mut blake3 = [0u8; 32];
    if blob.len() == 32 {
        blake3.copy_from_slice(&blob);
    }
    let night: String = r.get(8)?;
    let fields: String = r.get(9)?;
    let conv = |e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(9, rusqlite::types::Type::Text, e)
    };
    Ok(Row {
        agent: r.get(0)?,
        path: r.get(1)?,
        blake3,
        version: r.get(3)?,
        size_bytes: r.get::<_, i64>(4)? as u64,
        mtime_ns: r.get(5)?,
        received_at_us: r.get(6)?,
        superseded_at_us: r.get(7)?,
        night: night.parse().map_err(|e| conv(Box::new(e)))?,
        fields: serde_json::from_str::<Fields>(&fields).map_err(|e| conv(Box::new(e)))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: &str, hash: u8) -> Row {
        Row {
            agent: "kiso".into(),
            path: path.into(),
            blake3: [hash; 32],
            size_bytes: 10,
            mtime_ns: 1,
            received_at_us: 2,
            version: 0,
            superseded_at_us: None,
            night: "2024-05-01".parse().unwrap(),
            fields: Fields::default(),
        }
    }

    #[test]
    fn versions_supersede_and_reoffers_add_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Staging::open(&dir.path().join("c.sqlite")).unwrap();
        assert_eq!(
            s.insert(&row("a", 1), 10).unwrap(),
            Inserted::New {
                version: 1,
                superseded: 0
            }
        );
        assert_eq!(s.insert(&row("a", 1), 11).unwrap(), Inserted::Present);
        assert_eq!(
            s.insert(&row("a", 2), 12).unwrap(),
            Inserted::New {
                version: 2,
                superseded: 1
            }
        );
        assert!(s.has_current("kiso", "a", &[2; 32]).unwrap());
        assert!(!s.has_current("kiso", "a", &[1; 32]).unwrap());
        // Back to the first content: its row is current again, no third row.
        assert_eq!(
            s.insert(&row("a", 1), 13).unwrap(),
            Inserted::New {
                version: 1,
                superseded: 1
            }
        );
        let all = s.all_rows().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all.iter().filter(|r| r.superseded_at_us.is_none()).count(),
            1
        );
        assert_eq!(s.dirty_nights().unwrap().len(), 1);
    }
}
