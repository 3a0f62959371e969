//! Ships one file over one QUIC stream, driving the pure `SendSession`.
//!
//! Reading, hashing and compressing run on the blocking pool, a bounded two chunks ahead
//! of the network; memory per file is a few chunks, whatever the file size. A new file
//! is read once and each byte hashed once: the chunk values sent with the chunks also
//! give the whole-file BLAKE3 for the commit ([`skyferry_common::chunk::TreeHasher`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use skyferry_common::chunk::{chunk_value, file_tree_hash, ChunkLayout, TreeHasher};
use skyferry_common::compress::Compressor;
use skyferry_common::protocol::{Chunk, Codec, ErrorCode, Hash, Message, Offer, MAX_CONTROL_FRAME};
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
    /// Whether to compress chunks now (`transfer.compression`).
    pub link: Arc<crate::link::LinkMeter>,
    /// Chunks in flight per file before waiting for the receiver's acknowledgement.
    pub window: u32,
    pub metrics: Arc<Metrics>,
    pub tally: Arc<Tally>,
    /// Read buffers, reused once QUIC has let go of them.
    pub buffers: Arc<crate::buffers::ChunkBuffers>,
    /// Every lane's connection, for stripes, and the lane this connection is.
    pub lanes: Arc<crate::stripes::LaneTable>,
    pub lane: u16,
    /// Rate caps and the byte budget of backlog and replay chunks in flight.
    pub pace: Arc<crate::pace::Pacer>,
}

/// The source file, opened and checked to be the journaled version.
struct Source {
    file: Arc<File>,
}

/// Why a transfer was abandoned just before its commit: the source is no longer the
/// file that was read.
struct Abandoned {
    finish: Finish,
    /// Metric label and log text.
    reason: &'static str,
}

impl Abandoned {
    /// A blocking task of the upload failed (it panicked or was cancelled): retry later.
    fn task_failed(what: &str, e: tokio::task::JoinError) -> Abandoned {
        Abandoned {
            finish: Finish::Retry {
                reason: format!("{what} task failed: {e}"),
                forget_hash: false,
            },
            reason: "stat_failed",
        }
    }
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

/// Opens the file and checks it is still the version that was journaled. Nothing is
/// read yet: the hash comes with the chunks (or, when the receiver asks for it first,
/// from [`hash_source`]).
fn prepare(job: &Job, path: &PathBuf) -> Prepared {
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
    if !unchanged(&file, job) {
        return Prepared::Finished(Finish::Superseded);
    }
    Prepared::Ready(Source {
        file: Arc::new(file),
    })
}

/// Whether the open file still has the journaled size and mtime.
fn unchanged(file: &File, job: &Job) -> bool {
    file.metadata()
        .map(|m| m.len() == job.size && mtime_ns(&m) == job.mtime_ns)
        .unwrap_or(false)
}

/// The whole file's BLAKE3 (from its chunk values, as the receiver derives it), when the
/// receiver asks for it before any data (it stores a file of this path and size).
/// Recorded in the journal for later offers.
fn hash_source(
    file: &File,
    job: &Job,
    chunk_size: u32,
    journal: &Mutex<Journal>,
) -> Result<Hash, Abandoned> {
    let layout = ChunkLayout::new(job.size, chunk_size);
    let hash = file_tree_hash(file, &layout).map_err(|e| Abandoned {
        finish: Finish::Retry {
            reason: format!("reading {}: {e}", job.path),
            forget_hash: true,
        },
        reason: "read_failed",
    })?;
    // Changed while hashing: wait for the writer to finish (a new version will be
    // discovered when it settles).
    if !unchanged(file, job) {
        return Err(Abandoned {
            finish: Finish::Superseded,
            reason: "modified",
        });
    }
    remember_hash(journal, job, &hash);
    Ok(hash)
}

fn remember_hash(journal: &Mutex<Journal>, job: &Job, hash: &Hash) {
    let mut j = journal
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(e) = j.set_hash(job.id, hash) {
        warn!(error = %e, "cannot record the file hash; it will be computed again");
    }
}

/// Ships `job` and returns how it ended (the caller records it in the journal).
pub async fn upload(conn: &quinn::Connection, ctx: &UploadContext, job: &Job) -> Finish {
    let path = PathBuf::from(&job.root).join(&job.path);
    let (j, p) = (job.clone(), path.clone());
    let source = match tokio::task::spawn_blocking(move || prepare(&j, &p)).await {
        Ok(Prepared::Ready(s)) => s,
        Ok(Prepared::Finished(f)) => return f,
        Err(e) => {
            return Finish::Retry {
                reason: format!("opening task failed: {e}"),
                forget_hash: true,
            }
        }
    };
    let (send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(_) => return Finish::Requeue,
    };
    // Live data first among what QUIC has queued to send.
    let _ = send.set_priority(crate::pace::priority(job.class));
    let offer = Offer {
        path: job.path.clone(),
        size: job.size,
        mtime_ns: job.mtime_ns,
        file_hash: job.hash,
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
            if *already_stored {
                Finish::Present
            } else {
                Finish::Done
            }
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
    if session.needs_hash() {
        // The receiver stores a file of this path and size: the hash decides whether
        // any data must move at all.
        let (file, j, journal, cs) = (
            source.file.clone(),
            job.clone(),
            ctx.journal.clone(),
            ctx.chunk_size,
        );
        let hashed =
            tokio::task::spawn_blocking(move || hash_source(&file, &j, cs, &journal)).await;
        match hashed {
            Ok(Ok(hash)) => session.handle_file_hash(hash),
            Ok(Err(abandoned)) => return Ok(Some(abandoned)),
            Err(e) => return Ok(Some(Abandoned::task_failed("hashing", e))),
        }
        while let Some(m) = session.poll_transmit() {
            writer.send(&m).await?;
        }
        session
            .handle(reply(&mut replies).await?)
            .map_err(session_error)?;
    }

    let plan = session.plan();
    if session.outcome().is_none() && (!plan.is_empty() || session.awaits_file_hash()) {
        // Without a known file hash, the reader derives it from the chunk values.
        let derive = session.file_hash().is_none();
        let layout = ChunkLayout::new(job.size, ctx.chunk_size);
        // A large file also travels on the other lanes (stripes).
        let mut stripes = if plan.len() >= crate::stripes::STRIPE_MIN_CHUNKS {
            crate::stripes::Stripes::attach(&ctx.lanes, ctx.lane, &job.path)
        } else {
            crate::stripes::Stripes::none()
        };
        let mut items = spawn_chunk_reader(
            plan,
            layout,
            derive,
            source.file.clone(),
            ctx.compression_level,
            ctx.link.clone(),
            ctx.buffers.clone(),
        );
        let sent = send_chunks(
            ctx,
            session,
            writer,
            &mut replies,
            &mut items,
            &mut stripes,
            job,
        )
        .await;
        stripes.close(sent.is_err() || session.outcome().is_some());
        sent?;
        if session.outcome().is_some() {
            return Ok(None);
        }
    }
    // What is left to send is the commit (unless the receiver already answered).
    if session.outcome().is_none() {
        let (file, p, j) = (source.file.clone(), path.to_owned(), job.clone());
        let check = tokio::task::spawn_blocking(move || still_in_place(&file, &p, &j)).await;
        match check {
            Ok(Ok(())) => {}
            Ok(Err(abandoned)) => return Ok(Some(abandoned)),
            Err(e) => return Ok(Some(Abandoned::task_failed("source check", e))),
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

/// Sends the planned chunks, on this stream or its stripes, until every one is
/// acknowledged by a stripe or queued here behind the commit (or the receiver answered).
async fn send_chunks(
    ctx: &UploadContext,
    session: &mut SendSession,
    writer: &mut FrameWriter,
    replies: &mut mpsc::Receiver<Result<Message, WireError>>,
    items: &mut mpsc::Receiver<std::io::Result<ReadItem>>,
    stripes: &mut crate::stripes::Stripes,
    job: &Job,
) -> Result<(), WireError> {
    // Shares of `transfer.bulk_in_flight` of the chunks not yet acknowledged (backlog and
    // replay only).
    let mut budget = std::collections::VecDeque::new();
    {
        while session.outcome().is_none()
            && (session.chunks_to_send() > 0
                || session.awaits_file_hash()
                || session.in_flight_elsewhere() > 0)
        {
            tokio::select! {
                // Acknowledgements open the window; a rejection can arrive at any time.
                msg = replies.recv() => on_reply(session, msg, &mut budget)?,
                event = stripes.next() => on_stripe(session, stripes, event, &mut budget)?,
                // Only chunks still to send, or the derived file hash, come from the
                // reader; acknowledgements of stripes may still be due after both.
                item = items.recv(), if (session.can_send() && session.chunks_to_send() > 0) || session.awaits_file_hash() => {
                    let Some(item) = item else { break };
                    match item.map_err(|e| WireError::Connection(format!("reading source: {e}")))? {
                        ReadItem::Chunk { msg, index, raw_len } => {
                            if job.class != crate::journal::Class::Live {
                                // Acknowledgements keep coming while this waits.
                                let share = loop {
                                    tokio::select! {
                                        share = ctx.pace.bulk_budget(job.class, u64::from(raw_len)) => break share,
                                        msg = replies.recv() => on_reply(session, msg, &mut budget)?,
                                        event = stripes.next() => on_stripe(session, stripes, event, &mut budget)?,
                                    }
                                    if session.outcome().is_some() {
                                        return Ok(());
                                    }
                                };
                                budget.extend(share);
                            }
                            ctx.pace.pace(job.class, job.replay, u64::from(raw_len)).await;
                            let started = std::time::Instant::now();
                            match stripes.pick(session.in_flight_here()) {
                                Some(i) => {
                                    stripes.send(i, index, &msg).await?;
                                    session.handle_chunk_sent_elsewhere();
                                }
                                None => {
                                    if let Err(e) = writer.send(&msg).await {
                                        return rejection_after_stop(session, replies, e).await;
                                    }
                                    session.handle_chunk_sent();
                                }
                            }
                            ctx.link.note_blocked(started.elapsed());
                            ctx.metrics.chunks_sent.inc();
                            if job.attempts > 0 {
                                ctx.metrics.chunks_resent.inc();
                            }
                            ctx.metrics.sent(job.class, u64::from(raw_len));
                            let tally = ctx.tally.clone();
                            tokio::task::spawn_blocking(move || tally.add_chunk(u64::from(raw_len)));
                        }
                        ReadItem::FileHash(hash) => {
                            let j = job.clone();
                            let journal = ctx.journal.clone();
                            tokio::task::spawn_blocking(move || remember_hash(&journal, &j, &hash));
                            session.handle_file_hash(hash);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// A stripe's event while chunks are sent: a chunk acknowledged returns its budget share.
fn on_stripe(
    session: &mut SendSession,
    stripes: &mut crate::stripes::Stripes,
    event: crate::stripes::Event,
    budget: &mut std::collections::VecDeque<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), WireError> {
    if stripes.handle_event(event)? {
        budget.pop_front();
        session.handle_ack_elsewhere().map_err(session_error)?;
    }
    Ok(())
}

/// A reply while chunks are sent: a chunk acknowledged returns its budget share.
fn on_reply(
    session: &mut SendSession,
    msg: Option<Result<Message, WireError>>,
    budget: &mut std::collections::VecDeque<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), WireError> {
    let msg = msg.unwrap_or(Err(WireError::Connection("reply stream closed".into())))?;
    if matches!(msg, Message::ChunkAck(_)) {
        budget.pop_front();
    }
    session.handle(msg).map_err(session_error)
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

/// What the chunk reader yields: a chunk to send, then (when asked to derive it) the
/// whole file's BLAKE3.
enum ReadItem {
    Chunk {
        msg: Message,
        index: u32,
        raw_len: u32,
    },
    FileHash(Hash),
}

/// Reads, hashes and compresses the planned chunks on the blocking pool, at most two
/// ahead of the sender. With `derive`, it reads every chunk of the file in order (those
/// the receiver already holds only to hash them) and ends with the file hash derived
/// from the chunk values; each byte is read and hashed once.
fn spawn_chunk_reader(
    plan: Vec<ChunkRead>,
    layout: ChunkLayout,
    derive: bool,
    file: Arc<File>,
    level: i32,
    link: Arc<crate::link::LinkMeter>,
    buffers: Arc<crate::buffers::ChunkBuffers>,
) -> mpsc::Receiver<std::io::Result<ReadItem>> {
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        // FITS files of 16-bit pixels get the byte-shuffle codec (docs/protocol.md §6).
        let mut compressor = Compressor::for_head(level, &head(&file, level));
        let mut tree = TreeHasher::new(&layout);
        let mut planned = plan.into_iter().peekable();
        let mut every = 0..layout.count();
        let mut held = Vec::new();
        loop {
            // The next chunk to read: the next of the whole file when deriving, else the
            // next planned one.
            let next = if derive {
                every.next()
            } else {
                planned.peek().map(|c| c.index)
            };
            let Some(index) = next else { break };
            let send = planned.peek().is_some_and(|c| c.index == index);
            let len = layout.len(index).unwrap_or(0);
            let item = if send {
                planned.next();
                // The buffer becomes the payload and is handed to QUIC without a copy;
                // the pool takes it back once QUIC has dropped it.
                let mut raw = buffers.take(len as usize);
                file.read_exact_at(&mut raw, layout.offset(index))
                    .map(|()| {
                        let chunk_hash = chunk_value(&layout, index, &raw);
                        tree.push(chunk_hash);
                        let (codec, payload) = if link.compress_now() {
                            let (codec, payload) = compressor.encode(raw.to_vec());
                            (codec, Bytes::from(payload))
                        } else {
                            let payload = raw.freeze();
                            buffers.keep(&payload);
                            (Codec::Raw, payload)
                        };
                        Some(ReadItem::Chunk {
                            msg: Message::Chunk(Chunk {
                                index,
                                codec,
                                raw_len: len,
                                chunk_hash,
                                payload,
                            }),
                            index,
                            raw_len: len,
                        })
                    })
            } else {
                // Held by the receiver: read only to hash it.
                held.resize(len as usize, 0);
                file.read_exact_at(&mut held, layout.offset(index))
                    .map(|()| {
                        tree.push(chunk_value(&layout, index, &held));
                        None
                    })
            };
            let failed = item.is_err();
            match item {
                Ok(None) => continue,
                Ok(Some(item)) => {
                    if tx.blocking_send(Ok(item)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                }
            }
            if failed {
                return;
            }
        }
        if derive {
            let item = tree
                .finalize()
                .map(ReadItem::FileHash)
                .ok_or_else(|| std::io::Error::other("chunk count mismatch while hashing"));
            let _ = tx.blocking_send(item);
        }
    });
    rx
}

/// The file's first bytes, from which the compressor picks its codec; none when
/// compression is off, or the file cannot be read (plain zstd then; the chunk reads
/// report the error).
fn head(file: &File, level: i32) -> Vec<u8> {
    if level == 0 {
        return Vec::new();
    }
    let mut head = vec![0; skyferry_common::compress::HEAD_LEN];
    let n = file.read_at(&mut head, 0).unwrap_or(0);
    head.truncate(n);
    head
}

/// Records the end of an attempt in the journal (blocking); false if it could not.
pub fn record(journal: &Mutex<Journal>, job: &Job, how: &Finish) -> bool {
    let mut j = journal
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(e) = j.finish(job.id, how) {
        tracing::error!(path = %job.path, error = %e, "cannot record the transfer result in the journal");
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn job_for(path: &Path) -> Job {
        let m = std::fs::metadata(path).unwrap();
        Job {
            id: 1,
            class: crate::journal::Class::Live,
            replay: None,
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
