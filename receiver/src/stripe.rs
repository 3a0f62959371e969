//! Stripe streams: more chunks for a file session that is open on another stream of the
//! same agent, typically on another of its lanes (docs/protocol.md §3, "Striping one
//! file"). One file then moves over several connections, each with its own congestion
//! window, which on a lossy long link multiplies what one file gets.
//!
//! A session that receives chunks opens itself to stripes ([`Stripes::open`]) under its
//! (agent, path) claim. A stripe stream starts with `Attach{path}`, reserves its own frame
//! memory from the agent's `limits.max_bytes_in_flight_per_agent`, is answered `Attached`,
//! and then carries only `Chunk` frames. They go to the session's one blocking worker, in
//! turn with the session's own frames (the worker takes frames first come, first served),
//! and the acknowledgement of each returns on the stream that carried it. Whatever ends
//! the session (commit, rejection, the owner stream's end) ends its stripes: their next
//! frame finds the worker gone, and the stripe stream is finished.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use skyferry_common::protocol::{max_data_frame, ErrorCode, Message, Reject};
use skyferry_common::wire::{FrameReader, FrameWriter, WireError};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::session::{Frame, Step, StreamFrames};
use crate::shared::Shared;

/// The sessions open to stripes, by (agent, path).
#[derive(Default)]
pub struct Stripes {
    open: Mutex<HashMap<(Arc<str>, String), Entry>>,
}

#[derive(Clone)]
struct Entry {
    /// The session's worker inbox, held weakly: a stripe never keeps a session alive.
    inbox: mpsc::WeakUnboundedSender<Frame>,
    chunk_size: u32,
}

/// Keeps a session open to stripes; closed on drop.
pub struct OpenGuard<'a> {
    stripes: &'a Stripes,
    key: (Arc<str>, String),
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.stripes.map().remove(&self.key);
    }
}

impl Stripes {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(Arc<str>, String), Entry>> {
        // A plain map changed in one step: a panicking holder cannot leave it torn.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the session of (agent, path), which holds that path's claim, to stripes.
    pub(crate) fn open(
        &self,
        agent: &Arc<str>,
        path: &str,
        chunk_size: u32,
        inbox: &mpsc::UnboundedSender<Frame>,
    ) -> OpenGuard<'_> {
        let key = (agent.clone(), path.to_owned());
        let entry = Entry {
            inbox: inbox.downgrade(),
            chunk_size,
        };
        self.map().insert(key.clone(), entry);
        OpenGuard { stripes: self, key }
    }

    fn find(&self, agent: &Arc<str>, path: &str) -> Option<Entry> {
        self.map().get(&(agent.clone(), path.to_owned())).cloned()
    }
}

/// Serves a stream whose first frame is `Attach` (already peeked by the caller).
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    agent: &Arc<str>,
    mut reader: FrameReader,
    mut writer: FrameWriter,
) {
    let path = match reader.read().await {
        Ok(Some(Message::Attach(a))) => a.path,
        _ => return,
    };
    let Some(entry) = shared.stripes.find(agent, &path) else {
        let reason = format!("{path}: no file session of this path is receiving chunks");
        refuse(&mut reader, &mut writer, ErrorCode::Busy, reason).await;
        return;
    };
    let _bytes = match shared.acquire_stripe_bytes(agent, entry.chunk_size) {
        Ok(permit) => permit,
        Err(refusal) => {
            shared.metrics.stream_refused(refusal.label());
            refuse(
                &mut reader,
                &mut writer,
                ErrorCode::Busy,
                refusal.to_string(),
            )
            .await;
            return;
        }
    };
    if writer.send(&Message::Attached).await.is_err() {
        return;
    }
    reader.set_max(max_data_frame(entry.chunk_size));
    reader.set_timeout(Some(shared.config.peer_limits.stream_idle_timeout));
    shared.metrics.stripes.inc();
    let mut chunks = 0u64;
    let end = carry(shared, &entry.inbox, &mut reader, &mut writer, &mut chunks).await;
    shared.metrics.stripes.dec();
    info!(agent = %agent, path = %path, chunks, "stripe stream ended");
    let fault = match end {
        Ok(()) => None,
        Err(Ended::NotAChunk(kind)) => {
            Some(format!("a stripe stream carries only chunks, got {kind}"))
        }
        Err(Ended::Wire(e)) if e.is_peer_fault() => Some(e.to_string()),
        Err(Ended::Wire(e)) => {
            debug!(agent = %agent, path = %path, error = %e, "stripe stream ended");
            None
        }
    };
    match fault {
        Some(reason) => {
            shared.metrics.protocol_errors.inc();
            warn!(agent = %agent, path = %path, reason = %reason, "closing stripe stream: bad frame from agent");
            refuse(&mut reader, &mut writer, ErrorCode::Protocol, reason).await;
        }
        None => writer.finish(),
    }
}

/// Why a stripe stream stopped early.
enum Ended {
    Wire(WireError),
    NotAChunk(&'static str),
}

impl From<WireError> for Ended {
    fn from(e: WireError) -> Self {
        Ended::Wire(e)
    }
}

async fn refuse(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    code: ErrorCode,
    reason: String,
) {
    let _ = writer.send(&Message::Reject(Reject { code, reason })).await;
    reader.stop(0);
    writer.finish();
}

/// Forwards the stream's chunks to the session's worker and sends back their
/// acknowledgements, until the agent finishes the stream or the session ends.
async fn carry(
    shared: &Arc<Shared>,
    inbox: &mpsc::WeakUnboundedSender<Frame>,
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    chunks: &mut u64,
) -> Result<(), Ended> {
    let (steps_tx, mut steps_rx) = mpsc::unbounded_channel::<Step>();
    let forward = async move {
        let frames = StreamFrames::new();
        loop {
            // Room among this stripe's own frames first (what it reserved), then the
            // frame: a stripe whose next frame is slow to arrive (a lossy lane) holds up
            // nobody.
            let Some(held) = frames.room().await else {
                return Ok(());
            };
            let msg = match reader.read().await? {
                None => return Ok(()), // the agent has no more chunks for this stripe
                Some(msg @ Message::Chunk(_)) => msg,
                Some(other) => return Err(Ended::NotAChunk(other.kind())),
            };
            let frame = Frame::Data {
                msg,
                reply: steps_tx.clone(),
                held,
            };
            let sent = inbox
                .upgrade()
                .is_some_and(|inbox| inbox.send(frame).is_ok());
            if !sent {
                return Ok(()); // the session ended
            }
        }
    };
    let acks = async {
        // Only chunk acknowledgements come back here; the session's verdict goes to its
        // own stream.
        while let Some(step) = steps_rx.recv().await {
            if let Step::Chunk { bytes, ack } = step {
                shared.metrics.chunks_received.inc();
                shared.metrics.stripe_chunks.inc();
                *chunks += 1;
                shared.metrics.bytes_received.inc_by(bytes);
                if let Some(ack) = ack {
                    writer.send(&ack).await?;
                }
            }
        }
        Ok::<(), Ended>(())
    };
    // `forward` holds the only reply sender: once it ends (and the worker answered what
    // it took), `acks` ends too. The first error ends both.
    tokio::try_join!(forward, acks).map(|_| ())
}
