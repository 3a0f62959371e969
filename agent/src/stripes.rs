//! Striping one file over several lanes (docs/protocol.md §3, "Striping one file"). A
//! large file's session lives on the lane that offered it; once the receiver said which
//! chunks it misses, the upload attaches a stripe stream on each other live lane, and
//! every chunk goes to whichever stream (its own or a stripe) has the fewest chunks in
//! flight, so that each lane's congestion window carries a share in proportion to what
//! it can move. The file's window (`transfer.window`) covers all of them together.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use skyferry_common::protocol::{Attach, Message, MAX_CONTROL_FRAME};
use skyferry_common::wire::{FrameReader, FrameWriter, WireError};
use tokio::sync::mpsc;
use tracing::debug;

/// A file stripes when the receiver misses at least this many of its chunks: a smaller
/// one is over before stripes would have attached (one round trip).
pub const STRIPE_MIN_CHUNKS: usize = 8;

/// The live connection of each lane, for uploads that stripe over the others.
pub struct LaneTable {
    lanes: Vec<Mutex<Option<quinn::Connection>>>,
}

impl LaneTable {
    pub fn new(count: u16) -> LaneTable {
        LaneTable {
            lanes: (0..count).map(|_| Mutex::new(None)).collect(),
        }
    }

    fn slot(&self, lane: u16) -> Option<std::sync::MutexGuard<'_, Option<quinn::Connection>>> {
        // A plain value replaced in one step: a panicking holder cannot leave it torn.
        let slot = self.lanes.get(usize::from(lane))?;
        Some(slot.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Lane `lane` is connected (`Some`) or not any more (`None`).
    pub fn set(&self, lane: u16, conn: Option<quinn::Connection>) {
        if let Some(mut slot) = self.slot(lane) {
            *slot = conn;
        }
    }

    /// The live connections of every lane but `own`.
    fn others(&self, own: u16) -> Vec<(u16, quinn::Connection)> {
        (0..self.lanes.len() as u16)
            .filter(|&i| i != own)
            .filter_map(|i| {
                let conn = self.slot(i)?.clone()?;
                conn.close_reason().is_none().then_some((i, conn))
            })
            .collect()
    }
}

/// What a stripe's reader forwards: which stripe, and its frame or how it ended.
pub type StripeEvent = (usize, Result<Message, WireError>);

/// What [`Stripes::next`] waited for.
pub enum Event {
    Attached(Box<(u16, FrameWriter, FrameReader)>),
    Frame(usize, Result<Message, WireError>),
}

/// One stripe stream of an upload.
pub struct Stripe {
    pub lane: u16,
    writer: FrameWriter,
    /// Chunks sent on it and not yet acknowledged, oldest first (acknowledged in order).
    unacked: VecDeque<u32>,
    /// Ended (its reader reported an end); no more chunks go to it.
    ended: bool,
}

/// The stripes of one upload, attaching in the background.
pub struct Stripes {
    list: Vec<Stripe>,
    attached: mpsc::Receiver<(u16, FrameWriter, FrameReader)>,
    events_tx: mpsc::Sender<StripeEvent>,
    events: mpsc::Receiver<StripeEvent>,
}

impl Stripes {
    /// Starts attaching a stripe for `path` on every other live lane (none when `table`
    /// has no other lane up).
    pub fn attach(table: &LaneTable, own: u16, path: &str) -> Stripes {
        let others = table.others(own);
        let (tx, attached) = mpsc::channel(others.len().max(1));
        for (lane, conn) in others {
            let (tx, path) = (tx.clone(), path.to_owned());
            tokio::spawn(async move {
                match open(&conn, path).await {
                    Ok((writer, reader)) => {
                        let _ = tx.send((lane, writer, reader)).await;
                    }
                    Err(e) => debug!(lane, error = %e, "no stripe on this lane"),
                }
            });
        }
        let (events_tx, events) = mpsc::channel(16);
        Stripes {
            list: Vec::new(),
            attached,
            events_tx,
            events,
        }
    }

    /// No stripes at all, for files that do not stripe.
    pub fn none() -> Stripes {
        let (_, attached) = mpsc::channel(1);
        let (events_tx, events) = mpsc::channel(1);
        Stripes {
            list: Vec::new(),
            attached,
            events_tx,
            events,
        }
    }

    /// Waits for the next stripe that attached, or the next frame of one in use
    /// (pending forever when neither can come).
    pub async fn next(&mut self) -> Event {
        tokio::select! {
            Some(attached) = self.attached.recv() => Event::Attached(Box::new(attached)),
            Some((i, msg)) = self.events.recv() => Event::Frame(i, msg),
            else => std::future::pending().await,
        }
    }

    /// Takes what [`Stripes::next`] returned: `Ok(true)` when it acknowledged a chunk.
    pub fn handle_event(&mut self, event: Event) -> Result<bool, WireError> {
        match event {
            Event::Attached(attached) => {
                let (lane, writer, reader) = *attached;
                self.add(lane, writer, reader);
                Ok(false)
            }
            Event::Frame(i, msg) => self.handle(i, msg),
        }
    }

    /// Takes an attached stripe into use; its replies arrive through [`Stripes::next`].
    fn add(&mut self, lane: u16, writer: FrameWriter, mut reader: FrameReader) {
        let index = self.list.len();
        self.list.push(Stripe {
            lane,
            writer,
            unacked: VecDeque::new(),
            ended: false,
        });
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            loop {
                let msg = match reader.read().await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(WireError::Truncated),
                    Err(e) => Err(e),
                };
                let end = msg.is_err();
                if tx.send((index, msg)).await.is_err() || end {
                    return;
                }
            }
        });
    }

    /// The stripe with the fewest chunks in flight, if it has fewer than `own` (the
    /// session's own stream, which wins ties).
    pub fn pick(&self, own: usize) -> Option<usize> {
        self.list
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.ended)
            .min_by_key(|(_, s)| s.unacked.len())
            .filter(|(_, s)| s.unacked.len() < own)
            .map(|(i, _)| i)
    }

    /// Sends chunk `index` (`msg`) on stripe `i`.
    pub async fn send(&mut self, i: usize, index: u32, msg: &Message) -> Result<(), WireError> {
        let stripe = &mut self.list[i];
        stripe.writer.send(msg).await?;
        stripe.unacked.push_back(index);
        Ok(())
    }

    /// A frame from stripe `i`: `Ok(true)` for an acknowledgement of its oldest chunk in
    /// flight, `Ok(false)` for a stripe that ended with nothing in flight (it is simply
    /// not used any more), an error when chunks sent on it are lost.
    fn handle(&mut self, i: usize, msg: Result<Message, WireError>) -> Result<bool, WireError> {
        let stripe = &mut self.list[i];
        let lane = stripe.lane;
        match msg {
            Ok(Message::ChunkAck(a)) if stripe.unacked.front() == Some(&a.index) => {
                stripe.unacked.pop_front();
                Ok(true)
            }
            Ok(Message::ChunkAck(a)) => Err(WireError::Connection(format!(
                "protocol: stripe on lane {lane} acknowledged chunk {}, which was not its oldest unacknowledged one",
                a.index
            ))),
            other => {
                stripe.ended = true;
                let why = match other {
                    Ok(Message::Reject(r)) => format!("{}: {}", r.code, r.reason),
                    Ok(m) => format!("protocol: unexpected {} frame", m.kind()),
                    Err(e) => e.to_string(),
                };
                if stripe.unacked.is_empty() {
                    debug!(lane, reason = %why, "stripe ended");
                    Ok(false)
                } else {
                    Err(WireError::Connection(format!(
                        "stripe on lane {lane} ended with {} chunks unacknowledged: {why}",
                        stripe.unacked.len()
                    )))
                }
            }
        }
    }

    /// The file is committed or abandoned: stripes end (finished, or reset when the
    /// upload failed).
    pub fn close(&mut self, failed: bool) {
        for s in &mut self.list {
            if failed {
                s.writer.reset(0);
            } else {
                s.writer.finish();
            }
        }
    }
}

/// How long a stripe may take to attach before the upload goes on without it.
const ATTACH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens a stripe stream on `conn` and waits for the receiver's `Attached`.
async fn open(
    conn: &quinn::Connection,
    path: String,
) -> Result<(FrameWriter, FrameReader), WireError> {
    match tokio::time::timeout(ATTACH_WAIT, try_open(conn, path)).await {
        Ok(r) => r,
        Err(_) => Err(WireError::Timeout(ATTACH_WAIT)),
    }
}

async fn try_open(
    conn: &quinn::Connection,
    path: String,
) -> Result<(FrameWriter, FrameReader), WireError> {
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| WireError::Connection(e.to_string()))?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv, MAX_CONTROL_FRAME);
    writer.send(&Message::Attach(Attach { path })).await?;
    match reader.read().await? {
        Some(Message::Attached) => Ok((writer, reader)),
        Some(Message::Reject(r)) => Err(WireError::Connection(format!("{}: {}", r.code, r.reason))),
        Some(m) => Err(WireError::Connection(format!(
            "protocol: unexpected {} frame",
            m.kind()
        ))),
        None => Err(WireError::Truncated),
    }
}
