//! Replays: files queued by `skyferry-agent replay` (a backfill, a resend after storage
//! loss on the receiver) in the journal, which stays the only queue. Each replay is a
//! row of `replays`; the files it queued carry its id in `files.replay`, and the daemon
//! claims them after live files and the backlog, only while the replay is active.
//!
//! The SQL of replays is here; the tree walk and the command line are in
//! `replay_cli.rs`.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use skyferry_common::unix_time::now_ns;

use crate::journal::{Discovered, Journal, JournalError, State};

/// Schema version 3 (see `journal.rs`): `replay_counts` holds each replay's files and
/// bytes by state, kept by triggers on `files` in the transaction that changes a row,
/// so that `replay show` and the metrics read six rows instead of counting millions
/// (measured: 2.6 s for a replay of 10 M files before). Each replay has a row for
/// every state from its creation on (the triggers only update). Existing replays are
/// counted once here.
pub(crate) const SCHEMA_3: &str = "BEGIN IMMEDIATE;
    ALTER TABLE replays ADD COLUMN present_files INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE replays ADD COLUMN present_bytes INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE replay_counts (
        replay INTEGER NOT NULL,
        state  INTEGER NOT NULL,
        files  INTEGER NOT NULL DEFAULT 0,
        bytes  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (replay, state)
    ) WITHOUT ROWID;
    INSERT INTO replay_counts (replay, state)
        SELECT r.id, s.value FROM replays r,
        (SELECT 0 AS value UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3
         UNION ALL SELECT 4 UNION ALL SELECT 5) s;
    UPDATE replay_counts SET (files, bytes) =
        (SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files f
         WHERE f.replay = replay_counts.replay AND f.state = replay_counts.state);
    CREATE TRIGGER replay_counts_insert AFTER INSERT ON files WHEN NEW.replay IS NOT NULL
    BEGIN
        UPDATE replay_counts SET files = files + 1, bytes = bytes + NEW.size
        WHERE replay = NEW.replay AND state = NEW.state;
    END;
    CREATE TRIGGER replay_counts_delete AFTER DELETE ON files WHEN OLD.replay IS NOT NULL
    BEGIN
        UPDATE replay_counts SET files = files - 1, bytes = bytes - OLD.size
        WHERE replay = OLD.replay AND state = OLD.state;
    END;
    CREATE TRIGGER replay_counts_update AFTER UPDATE OF state, replay ON files
    WHEN (OLD.replay IS NOT NULL OR NEW.replay IS NOT NULL)
     AND (OLD.state IS NOT NEW.state OR OLD.replay IS NOT NEW.replay)
    BEGIN
        UPDATE replay_counts SET files = files - 1, bytes = bytes - OLD.size
        WHERE replay = OLD.replay AND state = OLD.state;
        UPDATE replay_counts SET files = files + 1, bytes = bytes + NEW.size
        WHERE replay = NEW.replay AND state = NEW.state;
    END;
    PRAGMA user_version = 3;
    COMMIT;";

/// A replay's state (`replays.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayState {
    Active = 0,
    Paused = 1,
    Cancelled = 2,
    Done = 3,
}

impl ReplayState {
    fn from_code(code: i64) -> ReplayState {
        match code {
            1 => ReplayState::Paused,
            2 => ReplayState::Cancelled,
            3 => ReplayState::Done,
            _ => ReplayState::Active,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ReplayState::Active => "active",
            ReplayState::Paused => "paused",
            ReplayState::Cancelled => "cancelled",
            ReplayState::Done => "done",
        }
    }
}

/// One replay with its progress, as `replay list` and `replay show` report it.
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    pub id: i64,
    pub name: String,
    pub created_ns: i64,
    /// When it ended (done or cancelled).
    pub finished_ns: Option<i64>,
    pub state: ReplayState,
    /// The command line's selection, as text.
    pub selection: String,
    /// Its own cap in bytes per second, if any.
    pub max_rate: Option<u64>,
    /// Whether the tree walk is over (the counts below are final).
    pub enqueued: bool,
    pub queued_files: u64,
    pub queued_bytes: u64,
    /// Files selected but already queued or done (without `--resend`).
    pub skipped_files: u64,
    pub progress: Progress,
}

/// Where a replay's files are now, from the journal.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub pending_files: u64,
    pub pending_bytes: u64,
    pub inflight_files: u64,
    pub inflight_bytes: u64,
    pub done_files: u64,
    pub done_bytes: u64,
    /// Of the done files, those the receiver acknowledged without data (it already
    /// held them: a `--resend`, or a file stored before its acknowledgement was lost).
    pub present_files: u64,
    pub present_bytes: u64,
    pub failed_files: u64,
    pub failed_bytes: u64,
    /// Vanished or superseded before they were sent.
    pub gone_files: u64,
    /// The failed files grouped by their error text, most files first (up to ten
    /// reasons).
    pub failures: Vec<Failure>,
}

/// Failed files of a replay that share an error text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The error, as the journal recorded it (`bad_path: ...`).
    pub reason: String,
    pub files: u64,
    /// One of them (the first by path), relative to its root.
    pub example: String,
}

/// How many distinct failure reasons a replay reports.
const FAILURE_REASONS_SHOWN: i64 = 10;

/// Counts of one batch queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Batch {
    pub queued: u64,
    pub queued_bytes: u64,
    pub skipped: u64,
}

/// Parses a replay id given on the command line.
pub fn parse_id(s: &str) -> Result<i64, String> {
    s.trim()
        .parse::<i64>()
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| format!("{s:?} is not a replay id (a positive number, see `replay list`)"))
}

impl Journal {
    /// Creates a replay (state active, nothing queued yet) and returns its id.
    pub fn create_replay(
        &mut self,
        name: &str,
        selection: &str,
        max_rate: Option<u64>,
    ) -> Result<i64, JournalError> {
        let (db, path) = self.db();
        db.execute(
            "INSERT INTO replays (name, created_ns, selection, max_rate) VALUES (?1, ?2, ?3, ?4)",
            params![name, now_ns(), selection, max_rate.map(|r| r as i64)],
        )
        .map_err(sql(path))?;
        let id = db.last_insert_rowid();
        db.execute(
            "INSERT INTO replay_counts (replay, state)
             VALUES (?1, 0), (?1, 1), (?1, 2), (?1, 3), (?1, 4), (?1, 5)",
            [id],
        )
        .map_err(sql(path))?;
        Ok(id)
    }

    /// Queues one batch of a replay's files in one durable transaction. A file never
    /// journaled is a new row of the replay; one journaled as vanished or superseded is
    /// pending again; one done (or failed) is queued again only with `resend`, keeping
    /// its hash so that the receiver acknowledges what it still holds without data.
    /// Pending and in-flight files are left as they are (skipped).
    pub fn enqueue_replay(
        &mut self,
        replay: i64,
        files: &[Discovered],
        resend: bool,
    ) -> Result<Batch, JournalError> {
        let now = now_ns();
        let (db, path) = self.db();
        let tx = db.transaction().map_err(sql(path))?;
        let mut b = Batch::default();
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO files (root, path, size, mtime_ns, discovered_ns, replay)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (root, path, size, mtime_ns) DO NOTHING",
                )
                .map_err(sql(path))?;
            let mut state = tx
                .prepare_cached(
                    "SELECT id, state FROM files
                     WHERE root = ?1 AND path = ?2 AND size = ?3 AND mtime_ns = ?4",
                )
                .map_err(sql(path))?;
            // finished_ns is kept on a resent row: it tells cancel that the row was done.
            let mut requeue = tx
                .prepare_cached(
                    "UPDATE files SET state = 0, replay = ?2, attempts = 0, not_before = 0,
                     last_error = NULL WHERE id = ?1",
                )
                .map_err(sql(path))?;
            let mut revive = tx
                .prepare_cached(
                    "UPDATE files SET state = 0, replay = ?2, not_before = 0, finished_ns = NULL
                     WHERE id = ?1",
                )
                .map_err(sql(path))?;
            for f in files {
                let n = insert
                    .execute(params![
                        f.root,
                        f.path,
                        f.size as i64,
                        f.mtime_ns,
                        now,
                        replay
                    ])
                    .map_err(sql(path))?;
                let queued = if n > 0 {
                    true
                } else {
                    let row: Option<(i64, i64)> = state
                        .query_row(params![f.root, f.path, f.size as i64, f.mtime_ns], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .optional()
                        .map_err(sql(path))?;
                    match row {
                        Some((id, s))
                            if s == State::Vanished as i64 || s == State::Superseded as i64 =>
                        {
                            revive.execute(params![id, replay]).map_err(sql(path))?;
                            true
                        }
                        Some((id, s))
                            if resend && (s == State::Done as i64 || s == State::Failed as i64) =>
                        {
                            requeue.execute(params![id, replay]).map_err(sql(path))?;
                            true
                        }
                        _ => false,
                    }
                };
                if queued {
                    b.queued += 1;
                    b.queued_bytes += f.size;
                } else {
                    b.skipped += 1;
                }
            }
            tx.execute(
                "UPDATE replays SET queued_files = queued_files + ?2,
                 queued_bytes = queued_bytes + ?3, skipped_files = skipped_files + ?4
                 WHERE id = ?1",
                params![
                    replay,
                    b.queued as i64,
                    b.queued_bytes as i64,
                    b.skipped as i64
                ],
            )
            .map_err(sql(path))?;
        }
        tx.commit().map_err(sql(path))?;
        Ok(b)
    }

    /// Marks the tree walk of a replay as finished.
    pub fn replay_enqueued(&mut self, replay: i64) -> Result<(), JournalError> {
        let (db, path) = self.db();
        db.execute("UPDATE replays SET enqueued = 1 WHERE id = ?1", [replay])
            .map(drop)
            .map_err(sql(path))
    }

    /// Pauses, resumes or cancels a replay. Cancel unqueues its files not yet sent: new
    /// rows are removed, resent rows are done again (the files stay stored); files in
    /// flight finish. Refused for a replay that is over, or not there.
    pub fn set_replay_state(&mut self, replay: i64, to: ReplayState) -> Result<(), String> {
        let current = self
            .replay(replay)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no replay {replay} in this journal (see `replay list`)"))?;
        if matches!(current.state, ReplayState::Cancelled | ReplayState::Done) {
            return Err(format!(
                "replay {replay} is {}; it cannot be {}",
                current.state.name(),
                match to {
                    ReplayState::Active => "resumed",
                    ReplayState::Paused => "paused",
                    _ => "cancelled",
                }
            ));
        }
        let (db, path) = self.db();
        let fail = |e: rusqlite::Error| sql(path)(e).to_string();
        let tx = db.transaction().map_err(fail)?;
        tx.execute(
            "UPDATE replays SET state = ?2, finished_ns = CASE WHEN ?2 = 2 THEN ?3 END
             WHERE id = ?1",
            params![replay, to as i64, now_ns()],
        )
        .map_err(fail)?;
        if to == ReplayState::Cancelled {
            tx.execute(
                "UPDATE files SET state = 2, replay = NULL
                 WHERE replay = ?1 AND state = 0 AND finished_ns IS NOT NULL",
                [replay],
            )
            .map_err(fail)?;
            tx.execute(
                "DELETE FROM files WHERE replay = ?1 AND state = 0",
                [replay],
            )
            .map_err(fail)?;
        }
        tx.commit().map_err(fail)
    }

    /// Every replay, oldest first.
    pub fn replays(&mut self) -> Result<Vec<Replay>, JournalError> {
        self.replays_where("1")
    }

    /// The replays not over (active or paused), oldest first.
    pub fn open_replays(&mut self) -> Result<Vec<Replay>, JournalError> {
        let mut open = self.replays_where("state IN (0, 1)")?;
        // `replay` records a replay whose files are all through as done.
        open.retain(|r| r.state != ReplayState::Done);
        Ok(open)
    }

    /// The replays whose row matches `filter` (SQL), oldest first.
    fn replays_where(&mut self, filter: &str) -> Result<Vec<Replay>, JournalError> {
        let ids: Vec<i64> = {
            let (db, path) = self.db();
            db.prepare_cached(&format!(
                "SELECT id FROM replays WHERE {filter} ORDER BY id"
            ))
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(sql(path))?
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.replay(id)?);
        }
        Ok(out)
    }

    /// The active replays with a rate cap of their own: (id, bytes per second).
    pub fn replay_rates(&mut self) -> Result<Vec<(i64, u64)>, JournalError> {
        let (db, path) = self.db();
        db.prepare_cached(
            "SELECT id, max_rate FROM replays WHERE state = 0 AND max_rate IS NOT NULL",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect()
        })
        .map_err(sql(path))
    }

    /// One replay and its progress. An active replay whose walk is over and whose files
    /// are all through is reported (and recorded, when the journal is writable) as done.
    pub fn replay(&mut self, id: i64) -> Result<Option<Replay>, JournalError> {
        let (db, path) = self.db();
        let row = db
            .query_row(
                "SELECT name, created_ns, state, selection, max_rate, enqueued, queued_files,
                        queued_bytes, skipped_files, finished_ns, present_files, present_bytes
                 FROM replays WHERE id = ?1",
                [id],
                |r| {
                    Ok(Replay {
                        id,
                        name: r.get(0)?,
                        created_ns: r.get(1)?,
                        finished_ns: r.get(9)?,
                        state: ReplayState::from_code(r.get(2)?),
                        selection: r.get(3)?,
                        max_rate: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                        enqueued: r.get::<_, i64>(5)? != 0,
                        queued_files: r.get::<_, i64>(6)? as u64,
                        queued_bytes: r.get::<_, i64>(7)? as u64,
                        skipped_files: r.get::<_, i64>(8)? as u64,
                        progress: Progress {
                            present_files: r.get::<_, i64>(10)? as u64,
                            present_bytes: r.get::<_, i64>(11)? as u64,
                            ..Progress::default()
                        },
                    })
                },
            )
            .optional()
            .map_err(sql(path))?;
        let Some(mut replay) = row else {
            return Ok(None);
        };
        let mut p = std::mem::take(&mut replay.progress);
        {
            let mut stmt = db
                .prepare_cached("SELECT state, files, bytes FROM replay_counts WHERE replay = ?1")
                .map_err(sql(path))?;
            let rows = stmt
                .query_map([id], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?.max(0) as u64,
                        r.get::<_, i64>(2)?.max(0) as u64,
                    ))
                })
                .map_err(sql(path))?;
            for row in rows {
                let (state, n, bytes) = row.map_err(sql(path))?;
                match state {
                    0 => (p.pending_files, p.pending_bytes) = (n, bytes),
                    1 => (p.inflight_files, p.inflight_bytes) = (n, bytes),
                    2 => (p.done_files, p.done_bytes) = (n, bytes),
                    4 => (p.failed_files, p.failed_bytes) = (n, bytes),
                    _ => p.gone_files += n,
                }
            }
        }
        if p.failed_files > 0 {
            p.failures = db
                .prepare_cached(
                    "SELECT COALESCE(last_error, ''), COUNT(*), MIN(path) FROM files
                     WHERE replay = ?1 AND replay IS NOT NULL AND state = 4
                     GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?2",
                )
                .and_then(|mut s| {
                    s.query_map(params![id, FAILURE_REASONS_SHOWN], |r| {
                        Ok(Failure {
                            reason: r.get(0)?,
                            files: r.get::<_, i64>(1)?.max(0) as u64,
                            example: r.get(2)?,
                        })
                    })?
                    .collect()
                })
                .map_err(sql(path))?;
        }
        if replay.state == ReplayState::Active
            && replay.enqueued
            && p.pending_files == 0
            && p.inflight_files == 0
        {
            replay.state = ReplayState::Done;
            replay.finished_ns = Some(now_ns());
            // Best effort: a read-only journal (`status`) cannot record it.
            let _ = db.execute(
                "UPDATE replays SET state = 3, finished_ns = ?2 WHERE id = ?1 AND state = 0",
                params![id, now_ns()],
            );
        }
        replay.progress = p;
        Ok(Some(replay))
    }
}

/// Applies a cancel to rows of cancelled replays that are pending again: files that
/// were in flight when their replay was cancelled finish, and one whose attempt then
/// ends without an acknowledgement (a retry, a lost connection, an agent restart) is
/// unqueued as cancel would have done (a resent row done again, a new row removed),
/// instead of staying pending and unclaimed, where a later replay or rescan would
/// skip it as already queued. `id`: one row, or every row (at startup). Runs inside
/// the caller's transaction, if any.
pub(crate) fn unqueue_cancelled(
    db: &rusqlite::Connection,
    id: Option<i64>,
) -> rusqlite::Result<usize> {
    let cancelled = "state = 0 AND replay IS NOT NULL
         AND replay IN (SELECT id FROM replays WHERE state = 2)
         AND (?1 IS NULL OR id = ?1)";
    let done = db
        .prepare_cached(&format!(
            "UPDATE files SET state = 2, replay = NULL
             WHERE {cancelled} AND finished_ns IS NOT NULL"
        ))?
        .execute([id])?;
    let removed = db
        .prepare_cached(&format!("DELETE FROM files WHERE {cancelled}"))?
        .execute([id])?;
    Ok(done + removed)
}

fn sql(path: &str) -> impl Fn(rusqlite::Error) -> JournalError + '_ {
    move |error| JournalError::Sqlite {
        path: path.to_owned(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Class, Finish};

    fn file(path: &str, size: u64) -> Discovered {
        Discovered {
            root: "/archive".into(),
            path: path.into(),
            size,
            mtime_ns: 1,
        }
    }

    #[test]
    fn replay_rows_come_after_live_and_backlog_and_pause_and_cancel_hold_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let r = j.create_replay("old", "--root /archive", None).unwrap();
        let b = j
            .enqueue_replay(r, &[file("a", 10), file("b", 20), file("c", 30)], false)
            .unwrap();
        assert_eq!((b.queued, b.queued_bytes, b.skipped), (3, 60, 0));
        j.enqueue(&[Discovered {
            root: "/data".into(),
            path: "live".into(),
            size: 1,
            mtime_ns: 100,
        }])
        .unwrap();
        // Paused: only the live file.
        j.set_replay_state(r, ReplayState::Paused).unwrap();
        let got = j.claim(10, 50).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].path.as_str(), got[0].class), ("live", Class::Live));
        j.set_replay_state(r, ReplayState::Active).unwrap();
        // At most one bulk file per claim here, in queue order.
        let got = j.claim_classes(10, 1, 50).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].path.as_str(), got[0].class), ("a", Class::Replay));
        assert_eq!(got[0].replay, Some(r));
        j.finish(got[0].id, &Finish::Done).unwrap();
        // Cancel: b and c unqueued, a stays done.
        j.set_replay_state(r, ReplayState::Cancelled).unwrap();
        assert!(j.claim(10, 50).unwrap().is_empty());
        let shown = j.replay(r).unwrap().unwrap();
        assert_eq!(shown.state, ReplayState::Cancelled);
        assert_eq!(
            (shown.progress.done_files, shown.progress.pending_files),
            (1, 0)
        );
        assert!(j.set_replay_state(r, ReplayState::Active).is_err());
    }

    #[test]
    fn resend_requeues_done_files_with_their_hash_and_cancel_restores_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        j.enqueue(&[file("a", 10), file("b", 10)]).unwrap();
        for job in j.claim(10, 0).unwrap() {
            j.set_hash(job.id, &[3; 32]).unwrap();
            j.finish(job.id, &Finish::Done).unwrap();
        }
        let r = j.create_replay("again", "", None).unwrap();
        let b = j
            .enqueue_replay(r, &[file("a", 10), file("b", 10)], false)
            .unwrap();
        assert_eq!((b.queued, b.skipped), (0, 2), "done files need --resend");
        let b = j
            .enqueue_replay(r, &[file("a", 10), file("b", 10)], true)
            .unwrap();
        assert_eq!((b.queued, b.skipped), (2, 0));
        let jobs = j.claim(10, 0).unwrap();
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.hash == Some([3; 32])));
        j.finish(jobs[0].id, &Finish::Requeue).unwrap();
        j.set_replay_state(r, ReplayState::Cancelled).unwrap();
        let c = j.counts().unwrap();
        assert_eq!((c.get(State::Done), c.get(State::Inflight)), (1, 1));
    }

    #[test]
    fn files_in_flight_at_cancel_that_come_back_are_unqueued_not_stranded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite");
        let mut j = Journal::open(&path).unwrap();
        // "old" was sent before; the replay resends it and queues three new files.
        j.enqueue(&[file("old", 10)]).unwrap();
        let job = j.claim(10, 0).unwrap().remove(0);
        j.finish(job.id, &Finish::Done).unwrap();
        let r = j.create_replay("x", "", None).unwrap();
        let all = [file("old", 10), file("a", 1), file("b", 2), file("c", 3)];
        assert_eq!(j.enqueue_replay(r, &all, true).unwrap().queued, 4);
        j.replay_enqueued(r).unwrap();
        let jobs = j.claim(10, 0).unwrap();
        assert_eq!(jobs.len(), 4, "all in flight when the cancel comes");
        j.set_replay_state(r, ReplayState::Cancelled).unwrap();
        let id = |p: &str| jobs.iter().find(|j| j.path == p).unwrap().id;
        // Each way an attempt ends without an acknowledgement; "old" by a restart.
        j.finish(id("a"), &Finish::Requeue).unwrap();
        j.finish(
            id("b"),
            &Finish::Retry {
                reason: "timeout".into(),
                forget_hash: false,
            },
        )
        .unwrap();
        j.finish(
            id("c"),
            &Finish::Wait {
                reason: "busy".into(),
            },
        )
        .unwrap();
        drop(j);
        let mut j = Journal::open(&path).unwrap();
        j.requeue_inflight().unwrap();
        let c = j.counts().unwrap();
        assert_eq!(
            (
                c.get(State::Pending),
                c.get(State::Inflight),
                c.get(State::Done)
            ),
            (0, 0, 1),
            "nothing of a cancelled replay stays queued; the resent file is done again"
        );
        assert_eq!(j.replay(r).unwrap().unwrap().progress.pending_files, 0);
        // A later replay of the same files queues the ones never sent.
        let again = j.create_replay("again", "", None).unwrap();
        let b = j.enqueue_replay(again, &all, false).unwrap();
        assert_eq!((b.queued, b.skipped), (3, 1));
    }

    #[test]
    fn a_replay_whose_files_are_through_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let r = j.create_replay("x", "", Some(1000)).unwrap();
        j.enqueue_replay(r, &[file("a", 10)], false).unwrap();
        assert_eq!(j.replay_rates().unwrap(), [(r, 1000)]);
        j.replay_enqueued(r).unwrap();
        let job = j.claim(10, 0).unwrap().remove(0);
        assert_eq!(j.replay(r).unwrap().unwrap().state, ReplayState::Active);
        j.finish(job.id, &Finish::Done).unwrap();
        assert_eq!(j.replay(r).unwrap().unwrap().state, ReplayState::Done);
        assert!(j.replay_rates().unwrap().is_empty());
        assert!(parse_id("0").is_err() && parse_id("x").is_err());
        assert_eq!(parse_id(" 7 "), Ok(7));
    }
}
