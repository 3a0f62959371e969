//! Ships one file over one QUIC stream, driving the pure `SendSession`.
//!
//! Reading, hashing and compressing run on the blocking pool, a bounded two chunks ahead
//! of the network; memory per file is a few chunks, whatever the file size.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use skyferry_common::chunk::hash_bytes;
use skyferry_common::compress::Compressor;
use skyferry_common::protocol::{Chunk, ErrorCode, Hash, Message, Offer, MAX_CONTROL_FRAME};
use skyferry_common::session::{ChunkRead, Outcome, SendSession};
use skyferry_common::unix_time::mtime_ns;
use skyferry_common::wire::{FrameReader, FrameWriter, WireError};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::journal::{Finish, Job, Journal};
use crate::metrics::Metrics;
use crate::tally::Tally;

/// How long to wait for the receiver's reason after it stopped a stream.
const REJECT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What uploads share.
pub struct UploadContext {
    pub journal: Arc<Mutex<Journal>>,
    pub chunk_size: u32,
    pub compression_level: i32,
    /// Chunks in flight per file before waiting for the receiver's acknowledgement.
    pub window: u32,
    pub metrics: Arc<Metrics>,
    pub tally: Arc<Tally>,
}

/// The source file, opened and identified.
struct Source {
    file: Arc<File>,
    hash: Hash,
}

/// Why a transfer was abandoned just before its commit: the source is no longer the
/// file that was read.
struct Abandoned {
    finish: Finish,
    /// Metric label and log text.
    reason: &'static str,
}

/// Whether `file` (open since the offer) is still the journaled file at `path`: not
/// deleted (it has a link), the very inode `path` names now (not renamed away, not
/// replaced), and unchanged in size and mtime. Checked before the commit so that the
/// receiver never publishes a file the source no longer has under that name: a deleted
/// file is not published, nor a temporary file under the name it was renamed from.
fn still_in_place(file: &File, path: &Path, job: &Job) -> Result<(), Abandoned> {
    let abandon = |finish, reason| Err(Abandoned { finish, reason });
    let open = match file.metadata() {
        Ok(m) => m,
        Err(e) => {
            return abandon(
                Finish::Retry {
                    reason: format!("cannot stat the open source {}: {e}", path.display()),
                    forget_hash: false,
                },
                "stat_failed",
            )
        }
    };
    if open.nlink() == 0 {
        return abandon(Finish::Vanished, "deleted");
    }
    let named = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return abandon(Finish::Vanished, "moved")
        }
        Err(e) => {
            return abandon(
                Finish::Retry {
                    reason: format!("cannot stat {}: {e}", path.display()),
                    forget_hash: false,
                },
                "stat_failed",
            )
        }
    };
    if (named.dev(), named.ino()) != (open.dev(), open.ino()) {
        return abandon(Finish::Superseded, "replaced");
    }
    if open.len() != job.size || mtime_ns(&open) != job.mtime_ns {
        return abandon(Finish::Superseded, "modified");
    }
    Ok(())
}

enum Prepared {
    Ready(Source),
    Finished(Finish),
}

/// Opens the file, checks it is still the version that was journaled, and computes its
/// BLAKE3 unless the journal already has it. The hash is computed before the offer so
/// that the receiver can recognise a file it already stores (and answer without any
/// data), and so that a resumed partial is matched to exactly this content.
fn prepare(job: &Job, path: &PathBuf, journal: &Mutex<Journal>) -> Prepared {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Prepared::Finished(Finish::Vanished)
        }
        Err(e) => {
            return Prepared::Finished(Finish::Retry {
                reason: format!("cannot open {}: {e}", path.display()),
                forget_hash: false,
            })
        }
    };
    let same = |f: &File| {
        f.metadata()
            .map(|m| m.len() == job.size && mtime_ns(&m) == job.mtime_ns)
            .unwrap_or(false)
    };
    if !same(&file) {
        return Prepared::Finished(Finish::Superseded);
    }
    let hash = match job.hash {
        Some(h) => h,
        None => {
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut offset = 0u64;
            loop {
                match file.read_at(&mut buf, offset) {
                    Ok(0) => break,
                    Ok(n) => {
                        hasher.update(&buf[..n]);
                        offset += n as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Prepared::Finished(Finish::Retry {
                            reason: format!("reading {}: {e}", path.display()),
                            forget_hash: true,
                        })
                    }
                }
            }
            // Changed while hashing: wait for the writer to finish (a new version will
            // be discovered when it settles).
            if offset != job.size || !same(&file) {
                return Prepared::Finished(Finish::Superseded);
            }
            let hash = *hasher.finalize().as_bytes();
            let mut j = journal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = j.set_hash(job.id, &hash) {
                warn!(error = %e, "cannot record the file hash; it will be computed again");
            }
            hash
        }
    };
    Prepared::Ready(Source {
        file: Arc::new(file),
        hash,
    })
}

/// Ships `job` and returns how it ended (the caller records it in the journal).
pub async fn upload(conn: &quinn::Connection, ctx: &UploadContext, job: &Job) -> Finish {
    let path = PathBuf::from(&job.root).join(&job.path);
    let (j, p, journal) = (job.clone(), path.clone(), ctx.journal.clone());
    let source = match tokio::task::spawn_blocking(move || prepare(&j, &p, &journal)).await {
        Ok(Prepared::Ready(s)) => s,
        Ok(Prepared::Finished(f)) => return f,
        Err(e) => {
            return Finish::Retry {
                reason: format!("hashing task failed: {e}"),
                forget_hash: true,
            }
        }
    };
    let (send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(_) => return Finish::Requeue,
    };
    let offer = Offer {
        path: job.path.clone(),
        size: job.size,
        mtime_ns: job.mtime_ns,
        file_hash: source.hash,
        chunk_size: ctx.chunk_size,
    };
    let mut session = SendSession::new(offer, ctx.window);
    let mut writer = FrameWriter::new(send);
    let replies = spawn_reader(FrameReader::new(recv, MAX_CONTROL_FRAME));
    match exchange(ctx, &mut session, &mut writer, replies, source, &path, job).await {
        Ok(None) => {}
        Ok(Some(a)) => {
            // No commit: the receiver keeps an unpublished partial (removed by its
            // sweep, or discarded when a different file is offered under this path).
            writer.reset(0);
            ctx.metrics
                .files_abandoned
                .get_or_create(&crate::metrics::ReasonLabels { reason: a.reason })
                .inc();
            info!(path = %job.path, source = a.reason, "the source changed while it was sent; not committing it");
            return a.finish;
        }
        Err(e) => {
            writer.reset(0);
            if e.is_peer_fault() || conn.close_reason().is_none() {
                warn!(path = %job.path, error = %e, "transfer failed on a live connection; retrying later");
                return Finish::Retry {
                    reason: e.to_string(),
                    forget_hash: false,
                };
            }
            debug!(path = %job.path, error = %e, "transfer interrupted");
            return Finish::Requeue;
        }
    }
    writer.finish();
    match session.outcome() {
        Some(Outcome::Stored {
            stored_path,
            already_stored,
            chunks_sent,
        }) => {
            ctx.metrics.files_sent.inc();
            info!(path = %job.path, size = job.size, chunks_sent, already_stored, stored = %stored_path, "stored");
            Finish::Done
        }
        Some(Outcome::Rejected(r))
            if matches!(
                r.code,
                ErrorCode::StorageFull | ErrorCode::Busy | ErrorCode::ShuttingDown
            ) =>
        {
            ctx.metrics.rejected(r.code);
            warn!(path = %job.path, code = %r.code, reason = %r.reason, "receiver cannot take the file now; it stays queued");
            Finish::Wait {
                reason: format!("{}: {}", r.code, r.reason),
            }
        }
        Some(Outcome::Rejected(r)) if r.code.is_retryable() => {
            ctx.metrics.rejected(r.code);
            warn!(path = %job.path, code = %r.code, reason = %r.reason, "receiver rejected the file; will retry");
            Finish::Retry {
                reason: format!("{}: {}", r.code, r.reason),
                forget_hash: r.code == ErrorCode::HashMismatch,
            }
        }
        Some(Outcome::Rejected(r)) => {
            ctx.metrics.rejected(r.code);
            tracing::error!(path = %job.path, code = %r.code, reason = %r.reason, "receiver refused the file for good; not retrying");
            Finish::Failed(format!("{}: {}", r.code, r.reason))
        }
        None => Finish::Requeue,
    }
}

/// Forwards replies from the receiver; a task of its own because reading a frame is not
/// cancel-safe and must not sit in a `select!`.
fn spawn_reader(mut reader: FrameReader) -> mpsc::Receiver<Result<Message, WireError>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let msg = reader.read().await;
            let end = !matches!(msg, Ok(Some(_)));
            let item = match msg {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(WireError::Truncated),
                Err(e) => Err(e),
            };
            if tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    rx
}

async fn reply(
    replies: &mut mpsc::Receiver<Result<Message, WireError>>,
) -> Result<Message, WireError> {
    replies
        .recv()
        .await
        .unwrap_or(Err(WireError::Connection("reply stream closed".into())))
}

fn session_error(e: skyferry_common::session::SessionError) -> WireError {
    WireError::Connection(format!("protocol: {e}"))
}

/// Drives the stream to its verdict; `Some` when it was abandoned before the commit.
async fn exchange(
    ctx: &UploadContext,
    session: &mut SendSession,
    writer: &mut FrameWriter,
    mut replies: mpsc::Receiver<Result<Message, WireError>>,
    source: Source,
    path: &Path,
    job: &Job,
) -> Result<Option<Abandoned>, WireError> {
    while let Some(m) = session.poll_transmit() {
        writer.send(&m).await?;
    }
    session
        .handle(reply(&mut replies).await?)
        .map_err(session_error)?;

    let plan = session.plan();
    if !plan.is_empty() {
        let mut chunks = spawn_chunk_reader(plan, source.file.clone(), ctx.compression_level);
        while session.chunks_to_send() > 0 {
            tokio::select! {
                // Acknowledgements open the window; a rejection can arrive at any time.
                msg = replies.recv() => {
                    let msg = msg.unwrap_or(Err(WireError::Connection("reply stream closed".into())))?;
                    session.handle(msg).map_err(session_error)?;
                    if session.outcome().is_some() {
                        return Ok(None);
                    }
                }
                chunk = chunks.recv(), if session.can_send() => {
                    let Some(chunk) = chunk else { break };
                    let (msg, raw_len) = chunk.map_err(|e| WireError::Connection(format!("reading source: {e}")))?;
                    if let Err(e) = writer.send(&msg).await {
                        return rejection_after_stop(session, &mut replies, e).await.map(|()| None);
                    }
                    ctx.metrics.chunks_sent.inc();
                    ctx.metrics.bytes_sent.inc_by(u64::from(raw_len));
                    let tally = ctx.tally.clone();
                    tokio::task::spawn_blocking(move || tally.add_chunk(u64::from(raw_len)));
                    session.handle_chunk_sent();
                }
            }
        }
    }
    // What is left to send is the commit (unless the receiver already answered).
    if session.outcome().is_none() {
        let (file, p, j) = (source.file.clone(), path.to_owned(), job.clone());
        let check = tokio::task::spawn_blocking(move || still_in_place(&file, &p, &j)).await;
        match check {
            Ok(Ok(())) => {}
            Ok(Err(abandoned)) => return Ok(Some(abandoned)),
            Err(e) => {
                return Ok(Some(Abandoned {
                    finish: Finish::Retry {
                        reason: format!("source check task failed: {e}"),
                        forget_hash: false,
                    },
                    reason: "stat_failed",
                }))
            }
        }
    }
    while let Some(m) = session.poll_transmit() {
        writer.send(&m).await?;
    }
    // The last acknowledgements, then the verdict.
    while session.outcome().is_none() {
        session
            .handle(reply(&mut replies).await?)
            .map_err(session_error)?;
    }
    Ok(None)
}

/// The receiver stops the stream when it rejects a file: its reason may already be on
/// the way back, behind acknowledgements.
async fn rejection_after_stop(
    session: &mut SendSession,
    replies: &mut mpsc::Receiver<Result<Message, WireError>>,
    error: WireError,
) -> Result<(), WireError> {
    let deadline = tokio::time::Instant::now() + REJECT_WAIT;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, replies.recv()).await {
        if matches!(msg, Message::Reject(_) | Message::ChunkAck(_)) {
            session.handle(msg).map_err(session_error)?;
            if session.outcome().is_some() {
                return Ok(());
            }
        }
    }
    Err(error)
}

/// Reads, hashes and compresses the planned chunks on the blocking pool, at most two
/// ahead of the sender.
fn spawn_chunk_reader(
    plan: Vec<ChunkRead>,
    file: Arc<File>,
    level: i32,
) -> mpsc::Receiver<std::io::Result<(Message, u32)>> {
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let mut compressor = Compressor::new(level);
        for c in plan {
            // A fresh buffer per chunk: it becomes the payload and is handed to QUIC
            // without a copy.
            let mut raw = vec![0u8; c.len as usize];
            let item = file.read_exact_at(&mut raw, c.offset).map(|()| {
                let chunk_hash = hash_bytes(&raw);
                let (codec, payload) = compressor.encode(raw);
                let msg = Message::Chunk(Chunk {
                    index: c.index,
                    codec,
                    raw_len: c.len,
                    chunk_hash,
                    payload: Bytes::from(payload),
                });
                (msg, c.len)
            });
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Records the end of an attempt in the journal (blocking).
pub fn record(journal: &Mutex<Journal>, job: &Job, how: &Finish) {
    let mut j = journal
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(e) = j.finish(job.id, how) {
        tracing::error!(path = %job.path, error = %e, "cannot record the transfer result in the journal");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn job_for(path: &Path) -> Job {
        let m = std::fs::metadata(path).unwrap();
        Job {
            id: 1,
            root: path.parent().unwrap().display().to_string(),
            path: path.file_name().unwrap().to_string_lossy().into_owned(),
            size: m.len(),
            mtime_ns: mtime_ns(&m),
            hash: None,
            attempts: 0,
        }
    }

    fn verdict(file: &File, path: &Path, job: &Job) -> &'static str {
        match still_in_place(file, path, job) {
            Ok(()) => "ok",
            Err(a) => a.reason,
        }
    }

    #[test]
    fn the_source_must_still_be_the_file_at_its_path_before_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.fits");
        std::fs::write(&path, b"0123456789").unwrap();
        let job = job_for(&path);
        let file = File::open(&path).unwrap();
        assert_eq!(verdict(&file, &path, &job), "ok");

        // Renamed away: the open file lives on under another name.
        let moved = dir.path().join("b.fits");
        std::fs::rename(&path, &moved).unwrap();
        assert_eq!(verdict(&file, &path, &job), "moved");
        assert!(matches!(
            still_in_place(&file, &path, &job).err().unwrap().finish,
            Finish::Vanished
        ));

        // Replaced: another file now has the name.
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(verdict(&file, &path, &job), "replaced");
        std::fs::remove_file(&path).unwrap();

        // Deleted: no name left at all.
        std::fs::remove_file(&moved).unwrap();
        assert_eq!(verdict(&file, &path, &job), "deleted");

        // Appended to in place.
        std::fs::write(&path, b"0123456789").unwrap();
        let job = job_for(&path);
        let file = File::open(&path).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        assert_eq!(verdict(&file, &path, &job), "modified");
    }
}
