//! Drives one file session (the pure `ReceiveSession`) over a QUIC stream, with the
//! blocking work (decompression, hashing, writes, fsync) off the async runtime.

use std::sync::Arc;

use skyferry_common::buf::AlignedBuf;
use skyferry_common::protocol::{max_data_frame, ErrorCode, Message, MAX_CONTROL_FRAME};
use skyferry_common::session::{reject, Event, OfferDecision, ReceiveSession};
use skyferry_common::wire::{FrameReader, FrameWriter, WireError};
use tracing::{debug, info, warn};

use crate::shared::Shared;
use crate::storage::{Partial, PublishError, StorageError};

/// Serves one file stream from `agent` to completion.
///
/// Limits (docs/protocol.md, "Limits and timeouts"): the first frame must arrive within
/// `limits.offer_timeout`; only an `Offer` takes a file slot, an agent at its cap is
/// refused with `busy` at once, and a global slot is waited for at most
/// `limits.stream_idle_timeout`. From then on every frame must arrive, and every reply be
/// taken, within `limits.stream_idle_timeout`, or the stream is closed with `busy` and
/// the reason.
pub async fn serve(
    shared: Arc<Shared>,
    agent: Arc<str>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let limits = &shared.config.peer_limits;
    let mut reader = FrameReader::new(recv, MAX_CONTROL_FRAME);
    let mut writer = FrameWriter::new(send);
    writer.set_timeout(Some(limits.stream_idle_timeout));
    reader.set_timeout(Some(limits.offer_timeout));
    let session = ReceiveSession::new(shared.config.max_file_size);
    let first = reader.peek().await.map(|m| match m {
        Some(Message::Offer(o)) => Some(Some(o.chunk_size)),
        Some(Message::Attach(_)) => None,
        _ => Some(None),
    });
    let first = match first {
        Ok(None) => return crate::stripe::serve(&shared, &agent, reader, writer).await,
        Ok(Some(offer)) => Ok(offer),
        Err(e) => Err(e),
    };
    reader.set_timeout(Some(limits.stream_idle_timeout));
    // Refusals by a limit are logged (throttled) by `refused`, not once more below.
    let mut limited = false;
    let (mut session, result) = match first {
        Err(WireError::Timeout(waited)) => {
            let reason = format!(
                "no offer within {waited:?} of opening the stream (limits.offer_timeout); stream closed"
            );
            refused(&shared, &agent, "offer_timeout", &reason);
            limited = true;
            let mut session = session;
            session.fail(reject(ErrorCode::Busy, reason));
            reader.stop(0);
            (session, Ok(()))
        }
        Err(e) => (session, Err(e)),
        Ok(Some(chunk_size)) => {
            let wait = limits.stream_idle_timeout;
            match shared.acquire_slot(&agent, chunk_size, wait).await {
                Ok(_slot) => {
                    shared.metrics.files_in_progress.inc();
                    let out = drive(&shared, &agent, &mut reader, &mut writer, session).await;
                    shared.metrics.files_in_progress.dec();
                    out
                }
                Err(refusal) => {
                    let reason = refusal.to_string();
                    refused(&shared, &agent, refusal.label(), &reason);
                    limited = true;
                    let mut session = session;
                    session.fail(reject(ErrorCode::Busy, reason));
                    reader.stop(0);
                    (session, Ok(()))
                }
            }
        }
        // Not an offer, or no frame at all: the session rejects it (or ends) without a
        // slot and without touching storage.
        Ok(None) => drive(&shared, &agent, &mut reader, &mut writer, session).await,
    };
    let path = session.path().map(ToString::to_string).unwrap_or_default();
    match result {
        Ok(()) => {}
        Err(e) if e.is_peer_fault() => {
            shared.metrics.protocol_errors.inc();
            warn!(agent = ?agent, path = ?path, error = %e, "closing file stream: bad frame from agent");
            session.fail(reject(ErrorCode::Protocol, e.to_string()));
        }
        Err(WireError::Timeout(waited)) => {
            let reason = format!(
                "{path:?}: nothing moved on the stream for {waited:?} (limits.stream_idle_timeout): \
                 no frame from the agent, or it did not read the replies; stream closed"
            );
            refused(&shared, &agent, "idle_timeout", &reason);
            limited = true;
            session.fail(reject(ErrorCode::Busy, reason));
            reader.stop(0);
        }
        Err(e) => debug!(agent = ?agent, path = ?path, error = %e, "file stream ended early"),
    }
    while let Some(reply) = session.poll_transmit() {
        if let Message::Reject(r) = &reply {
            shared.metrics.rejected(r.code);
            if limited {
                debug!(agent = ?agent, path = ?path, code = %r.code, reason = ?r.reason, "file rejected");
            } else {
                warn!(agent = ?agent, path = ?path, code = %r.code, reason = ?r.reason, "file rejected");
            }
        }
        if writer.send(&reply).await.is_err() {
            break;
        }
    }
    // The session ends only once the agent has the verdict: on shutdown the endpoint is
    // closed as soon as every session has ended, and a close discards what the agent
    // has not acknowledged yet (it would re-offer a file already stored).
    if !writer.finish_delivered(VERDICT_WAIT).await {
        debug!(agent = ?agent, path = ?path, "the agent did not acknowledge the end of the file stream");
    }
}

/// How long a session waits for the agent to acknowledge its last frames (within the
/// shutdown grace, which bounds the whole drain).
const VERDICT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A stream refused or closed by a limit: counted by reason, and logged as a WARN at most
/// once per 10 s per reason (an attack must not flood the log).
fn refused(shared: &Shared, agent: &str, label: &'static str, reason: &str) {
    shared.metrics.stream_refused(label);
    match shared.warn_allowed(label, std::time::Instant::now()) {
        Some(suppressed) => warn!(
            agent = %agent, limit = label, reason, suppressed,
            "file stream refused by a limit (suppressed: similar refusals not logged in the last 10s)"
        ),
        None => debug!(agent = %agent, limit = label, reason, "file stream refused by a limit"),
    }
}

/// The state a file session carries to its worker and back.
struct Work {
    session: ReceiveSession,
    partial: Partial,
    buf: AlignedBuf,
}

/// A frame for a session's worker, and where the acknowledgement of a chunk goes: the
/// session's own stream, or the stripe stream that carried it ([`crate::stripe`]).
pub(crate) enum Frame {
    Data {
        msg: Message,
        reply: tokio::sync::mpsc::UnboundedSender<Step>,
        /// Its place among the frames its stream holds; the worker lets go of it once
        /// the frame is decoded.
        held: tokio::sync::OwnedSemaphorePermit,
    },
    /// The session's own stream is done (it ended or failed): the worker stops.
    End,
}

pub(crate) enum Step {
    /// A chunk was verified and written; its acknowledgement is to be sent.
    Chunk {
        bytes: u64,
        ack: Option<Message>,
    },
    Commit,
    Stop,
    /// Writing failed: the partial is discarded and the session rejected the file.
    Failed {
        full: bool,
        needed: u64,
    },
}

/// The frames one stream of a session holds ([`crate::shared::FRAMES_PER_STREAM`]): a
/// stream reads its next frame only once it holds fewer, and each stream counts only its
/// own. A shared bound would let a stream that waits for its next frame hold the room
/// that another stream's frame needs. The session's own stream, with nothing more to
/// send until a stripe's last chunk is acknowledged, would then keep that chunk from
/// the worker.
pub(crate) struct StreamFrames(std::sync::Arc<tokio::sync::Semaphore>);

impl StreamFrames {
    pub(crate) fn new() -> StreamFrames {
        StreamFrames(std::sync::Arc::new(tokio::sync::Semaphore::new(
            crate::shared::FRAMES_PER_STREAM,
        )))
    }

    /// Waits until the stream may read another frame (`None` only if the semaphore were
    /// closed, which it never is).
    pub(crate) async fn room(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().acquire_owned().await.ok()
    }
}

/// How the chunk phase of a session ended (the verdict, if any, is queued in the session).
enum ChunksEnd {
    Commit,
    Stopped,
    Failed { full: bool, needed: u64 },
}

/// Receives chunks until the agent's commit. One blocking worker per file verifies and
/// writes the chunks while the async side reads the next frame and sends the
/// acknowledgements, so that reading, hashing and the (direct, synchronous) write overlap
/// and QUIC's receive buffers drain while a chunk is written (data left in them gets
/// copied again when quinn compacts its buffers). Each stream stays at most one frame
/// ahead of the worker ([`StreamFrames`]): a session holds two frames of its own stream
/// and two decoded chunks ([`crate::shared::session_bytes`]). Stripe streams feed the
/// same worker through `inbox` (their acknowledgements go back to them; anything else
/// ends the session here).
async fn receive_chunks(
    shared: &Arc<Shared>,
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    work: Work,
    inbox: (
        tokio::sync::mpsc::UnboundedSender<Frame>,
        tokio::sync::mpsc::UnboundedReceiver<Frame>,
    ),
) -> (Work, Result<ChunksEnd, WireError>) {
    let (frames_tx, frames_rx) = inbox;
    let (steps_tx, mut steps_rx) = tokio::sync::mpsc::unbounded_channel::<Step>();
    let own_reply = steps_tx.clone();
    let worker = tokio::task::spawn_blocking(move || work.run(frames_rx, steps_tx));
    let closer = frames_tx.clone();
    let end = {
        let forward = async move {
            let frames = StreamFrames::new();
            loop {
                // Room first: the next frame is read once the worker decoded the one
                // before the last.
                let Some(held) = frames.room().await else {
                    return Ok(());
                };
                let Some(msg) = reader.read().await? else {
                    return Err(WireError::Truncated);
                };
                let commit = matches!(msg, Message::Commit(_));
                let frame = Frame::Data {
                    msg,
                    reply: own_reply.clone(),
                    held,
                };
                if frames_tx.send(frame).is_err() || commit {
                    return Ok(()); // the worker stopped, or the chunks are done
                }
            }
        };
        let handle = async move {
            while let Some(step) = steps_rx.recv().await {
                match step {
                    Step::Chunk { bytes, ack } => {
                        shared.metrics.chunks_received.inc();
                        shared.metrics.bytes_received.inc_by(bytes);
                        // The chunk acknowledgement opens the agent's window.
                        if let Some(ack) = ack {
                            writer.send(&ack).await?;
                        }
                    }
                    Step::Commit => return Ok(ChunksEnd::Commit),
                    Step::Stop => return Ok(ChunksEnd::Stopped),
                    Step::Failed { full, needed } => return Ok(ChunksEnd::Failed { full, needed }),
                }
            }
            Ok(ChunksEnd::Stopped)
        };
        tokio::pin!(forward, handle);
        let mut reading = true;
        loop {
            tokio::select! {
                read = &mut forward, if reading => match read {
                    Ok(()) => reading = false,
                    Err(e) => break Err(e),
                },
                end = &mut handle => break end,
            }
        }
    };
    // Stripes may still hold the inbox open: `End` tells the worker that this side is
    // done (unless it ended already).
    let _ = closer.send(Frame::End);
    drop(closer);
    match worker.await {
        Ok(work) => (work, end),
        // Input errors are values, never panics; a panic here is a bug and is re-raised.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Work {
    /// The worker: verifies each chunk (decompression and hash) while a second thread
    /// writes the one before it (write-behind), so that the device's write time overlaps
    /// the hashing instead of adding to it. The writer takes a chunk only once it has
    /// written the last (a rendezvous): at most one chunk is verified ahead of the write,
    /// so a session holds two decoded chunks. Anything but a chunk first waits for the
    /// writes queued before it: a `Commit` sees every chunk recorded.
    fn run(
        self,
        mut frames: tokio::sync::mpsc::UnboundedReceiver<Frame>,
        steps: tokio::sync::mpsc::UnboundedSender<Step>,
    ) -> Work {
        let Work {
            session,
            mut partial,
            buf,
        } = self;
        let session = std::sync::Mutex::new(session);
        let buf = std::thread::scope(|scope| {
            // Decode buffers go round: verifier → writer → back.
            let (spare_tx, spare) = std::sync::mpsc::channel::<AlignedBuf>();
            let _ = spare_tx.send(buf);
            let _ = spare_tx.send(AlignedBuf::new());
            let (queue, writes) = std::sync::mpsc::sync_channel::<Write>(0);
            let (session_w, steps_w, partial_w) = (&session, steps.clone(), &mut partial);
            let spawned = std::thread::Builder::new()
                .name("chunk-writer".into())
                .spawn_scoped(scope, move || {
                    write_chunks(session_w, partial_w, writes, spare_tx, steps_w)
                });
            let writer = match spawned {
                Ok(writer) => writer,
                // Out of threads: this file waits (the partial is kept), the others go on.
                Err(e) => {
                    lock(&session).fail(reject(
                        ErrorCode::Busy,
                        format!("the receiver cannot start a writer thread ({e}); offer it again"),
                    ));
                    let _ = steps.send(Step::Stop);
                    return AlignedBuf::new();
                }
            };
            // A message that is not a chunk ends the chunk phase.
            let mut last = None;
            while let Some(Frame::Data { msg, reply, held }) = frames.blocking_recv() {
                if !matches!(msg, Message::Chunk(_)) {
                    last = Some(msg);
                    break;
                }
                let Ok(mut buf) = spare.recv() else { break };
                let verified = lock(&session).handle(msg, &mut buf);
                drop(held); // decoded: its stream may read the next frame

                let Ok(Event::Chunk(v)) = verified else {
                    let _ = steps.send(Step::Stop); // the session queued its rejection
                    break;
                };
                let write = Write {
                    index: v.index,
                    offset: v.offset,
                    value: v.value,
                    buf,
                    reply,
                };
                // The writer stopped after a failed write (it reported the failure).
                if queue.send(write).is_err() {
                    break;
                }
            }
            drop(queue);
            // A panic in the writer is a bug: re-raised.
            writer
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            let mut buf = spare.try_recv().unwrap_or_default();
            if let Some(msg) = last {
                let step = match lock(&session).handle(msg, &mut buf) {
                    Ok(Event::Commit) => Step::Commit,
                    _ => Step::Stop,
                };
                let _ = steps.send(step);
            }
            buf
        });
        Work {
            session: session
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            partial,
            buf,
        }
    }
}

/// A verified chunk on its way to the writer.
struct Write {
    index: u32,
    offset: u64,
    value: skyferry_common::protocol::Hash,
    buf: AlignedBuf,
    reply: tokio::sync::mpsc::UnboundedSender<Step>,
}

/// The writer thread of [`Work::run`]: writes each chunk, records it in the session and
/// sends its acknowledgement. A failed write discards the partial (the bytes of a failed
/// write cannot be trusted, and writes are never retried in place: the agent sends the
/// file again from the source), fails the session and stops.
fn write_chunks(
    session: &std::sync::Mutex<ReceiveSession>,
    partial: &mut Partial,
    writes: std::sync::mpsc::Receiver<Write>,
    spare: std::sync::mpsc::Sender<AlignedBuf>,
    steps: tokio::sync::mpsc::UnboundedSender<Step>,
) {
    for w in writes {
        let written = partial.write_chunk(w.index, w.offset, &w.buf, &w.value);
        let bytes = w.buf.len() as u64;
        let _ = spare.send(w.buf);
        match written {
            Ok(()) => {
                let ack = {
                    let mut s = lock(session);
                    s.handle_chunk_stored(w.index);
                    s.poll_transmit()
                };
                // A stripe that is gone loses only its acknowledgement.
                let _ = w.reply.send(Step::Chunk { bytes, ack });
            }
            Err(e) => {
                let needed = partial.missing_bytes();
                partial.discard();
                lock(session).fail(e.to_reject());
                let _ = steps.send(Step::Failed {
                    full: e.is_full(),
                    needed,
                });
                break;
            }
        }
    }
}

fn lock(session: &std::sync::Mutex<ReceiveSession>) -> std::sync::MutexGuard<'_, ReceiveSession> {
    // A panic while holding it is re-raised by the join; the state stays usable.
    session
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn drive(
    shared: &Arc<Shared>,
    agent: &Arc<str>,
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    mut session: ReceiveSession,
) -> (ReceiveSession, Result<(), WireError>) {
    let mut buf = AlignedBuf::new();
    let first = match reader.read().await {
        Ok(Some(m)) => m,
        Ok(None) => return (session, Ok(())),
        Err(e) => return (session, Err(e)),
    };
    if session.handle(first, &mut buf) != Ok(Event::Offered) {
        return (session, Ok(())); // the session queued a rejection
    }
    let (Some(path), Some(offer)) = (session.path().cloned(), session.offer().cloned()) else {
        return (session, Ok(()));
    };
    let Some(_busy) = shared.claim(agent, path.as_str()) else {
        session.fail(reject(
            ErrorCode::Busy,
            format!("{path}: another stream is already receiving this file"),
        ));
        return (session, Ok(()));
    };

    let storage = shared.storage.clone();
    let (a, p, o) = (agent.clone(), path.clone(), offer.clone());
    let lookup = match blocking(move || storage.lookup(&a, &p, &o)).await {
        Ok(l) => l,
        Err(e) => {
            session.fail(e.to_reject());
            return (session, Ok(()));
        }
    };
    // Whatever is stored at the path has its catalog row before anything is acknowledged
    // (a crash between publication and the catalog write left it without one).
    if let (Some(stored), Some(catalog)) = (lookup.stored, &shared.catalog) {
        let catalogued =
            catalog.ensure_stored(agent, path.as_str(), stored.hash, stored.size, None);
        if let Err(r) = catalogued.await {
            session.fail(r);
            return (session, Ok(()));
        }
    }
    let mut decision = session.handle_lookup(lookup);
    if decision == OfferDecision::NeedHash {
        // A file of this path and size is stored: the agent hashes its source and
        // answers with `FileHash`, which decides.
        while let Some(m) = session.poll_transmit() {
            if let Err(e) = writer.send(&m).await {
                return (session, Err(e));
            }
        }
        let msg = match reader.read().await {
            Ok(Some(m)) => m,
            Ok(None) => return (session, Err(WireError::Truncated)),
            Err(e) => return (session, Err(e)),
        };
        decision = match session.handle(msg, &mut buf) {
            Ok(Event::Decided(d)) => d,
            _ => return (session, Ok(())), // the session queued a rejection
        };
    }
    let Some(offer) = session.offer().cloned() else {
        return (session, Ok(()));
    };
    let discard = match decision {
        OfferDecision::NeedHash => {
            session.fail(reject(ErrorCode::Protocol, "file hash asked for twice"));
            return (session, Ok(()));
        }
        OfferDecision::AlreadyStored => {
            shared.metrics.files_already_stored.inc();
            info!(agent = ?agent, path = ?path.as_str(), "already stored; acknowledged without transfer");
            return (session, Ok(()));
        }
        OfferDecision::Refused { discard_partial } => {
            // This file does not fit; that says nothing about the others, so the storage
            // state other agents see is left alone. Nothing was created for it; a partial
            // of another version is useless and goes.
            if discard_partial {
                let storage = shared.storage.clone();
                let (a, p) = (agent.clone(), path.clone());
                if let Err(e) = blocking(move || storage.discard_partial(&a, &p)).await {
                    warn!(agent = ?agent, path = ?path.as_str(), error = %e, "cannot remove an outdated partial file");
                }
            }
            return (session, Ok(()));
        }
        OfferDecision::Receive { discard_partial } => discard_partial,
    };
    let storage = shared.storage.clone();
    let (a, p, o) = (agent.clone(), path.clone(), offer.clone());
    let partial = match blocking(move || storage.open_partial(&a, &p, &o, discard)).await {
        Ok(partial) => partial,
        Err(e) => {
            if e.is_full() {
                note_full(shared, offer.size);
            }
            // The session queued `Resume` already: drop it, the rejection is the answer.
            session.fail_instead(e.to_reject());
            return (session, Ok(()));
        }
    };
    let epoch = shared.health.epoch();
    let resumed_from = session.have().present();
    // Open to stripes before the agent learns what is missing (it attaches stripes only
    // after the resume).
    let inbox = tokio::sync::mpsc::unbounded_channel::<Frame>();
    let stripes = shared
        .stripes
        .open(agent, path.as_str(), offer.chunk_size, &inbox.0);
    if let Some(resume) = session.poll_transmit() {
        if let Err(e) = writer.send(&resume).await {
            return (session, Err(e));
        }
    }
    debug!(agent = ?agent, path = ?path.as_str(), size = offer.size, have = resumed_from, "receiving");
    reader.set_max(max_data_frame(offer.chunk_size));

    let work = Work {
        session,
        partial,
        buf,
    };
    let (work, end) = receive_chunks(shared, reader, writer, work, inbox).await;
    drop(stripes);
    match end {
        Ok(ChunksEnd::Commit) => {}
        Ok(ChunksEnd::Stopped) => return (work.session, Ok(())),
        Ok(ChunksEnd::Failed { full, needed }) => {
            if full {
                note_full(shared, needed);
            }
            return (work.session, Ok(()));
        }
        Err(e) => return (work.session, Err(e)),
    }

    let Work {
        mut session,
        partial,
        ..
    } = work;
    let storage = shared.storage.clone();
    let a = agent.clone();
    // `Event::Commit` comes only with the agent's file hash recorded.
    let Some(expected) = session.committed_hash() else {
        session.fail(reject(ErrorCode::Protocol, "commit without a file hash"));
        return (session, Ok(()));
    };
    match blocking(move || storage.publish(&a, partial, expected)).await {
        Ok(published) => {
            shared.metrics.files_stored.inc();
            shared.metrics.bytes_stored.inc_by(offer.size);
            info!(agent = ?agent, path = ?path.as_str(), size = offer.size,
                  chunks = session.chunks_received(), resumed_from, "stored");
            match &published.inventory_error {
                // The file is durably in place: tell the agent the truth. The row heals at
                // the next lookup of the path (the file is hashed and recorded then).
                Some(e) => {
                    warn!(agent = ?agent, path = ?path.as_str(), error = %e,
                          "stored, but its inventory row could not be written; the next offer of this path re-hashes the file");
                    if e.is_full() {
                        note_full(shared, 0);
                    }
                }
                None => {
                    if shared.health.note_stored(epoch) {
                        info!("storage accepts writes again; reporting ok to agents");
                    }
                }
            }
            // Acknowledged only once its catalog row is durable.
            let catalogued = match &shared.catalog {
                Some(c) => {
                    c.ensure_stored(
                        agent,
                        path.as_str(),
                        expected,
                        offer.size,
                        Some(offer.mtime_ns),
                    )
                    .await
                }
                None => Ok(()),
            };
            session.handle_published(catalogued.map(|()| published.stored_path));
        }
        Err(e) => {
            if let PublishError::Storage(s) = &e {
                if s.is_full() {
                    note_full(shared, offer.size);
                }
            }
            session.handle_published(Err(e.to_reject()))
        }
    }
    (session, Ok(()))
}

/// Storage ran out of space: agents are told `full` in heartbeats until space returns.
fn note_full(shared: &Shared, needed: u64) {
    if shared.health.note_full(needed, std::time::Instant::now()) {
        warn!(
            needed_bytes = needed,
            storage = %shared.config.storage_root.display(),
            "storage full; telling agents to pause until space returns"
        );
    }
}

/// Runs blocking storage work off the runtime.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<StorageError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(E::from(StorageError::Io {
            doing: "storage task".into(),
            source: std::io::Error::other(e.to_string()),
        })),
    }
}
