//! The async edge of the protocol: reading and writing frames on QUIC streams.
//!
//! The only code in `common` that touches a socket. Readers check a frame's length
//! prefix against the stream's limit before allocating its body, and keep "the peer sent
//! bad bytes" ([`WireError::Frame`]) apart from "the connection went away"
//! ([`WireError::Connection`]), because the first is counted and logged as a protocol
//! violation and the second is an ordinary outage to retry.

use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;

use crate::protocol::{decode_body, frame_len, FrameError, Message};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("peer sent a bad frame: {0}")]
    Frame(FrameError),
    #[error("cannot encode a frame: {0}")]
    Encode(FrameError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("connection lost: {0}")]
    Connection(String),
    /// The peer sent no frame, or took no reply, for this long (see
    /// [`FrameReader::set_timeout`], [`FrameWriter::set_timeout`]).
    #[error("nothing moved on the stream for {0:?}")]
    Timeout(Duration),
}

impl WireError {
    /// Whether the peer violated the protocol (as opposed to the link failing).
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, WireError::Frame(_))
    }
}

impl From<quinn::ReadError> for WireError {
    fn from(e: quinn::ReadError) -> Self {
        WireError::Connection(e.to_string())
    }
}

impl From<quinn::WriteError> for WireError {
    fn from(e: quinn::WriteError) -> Self {
        WireError::Connection(e.to_string())
    }
}

/// Runs `f` within `limit`, if there is one.
async fn bounded<T>(
    limit: Option<Duration>,
    f: impl Future<Output = Result<T, WireError>>,
) -> Result<T, WireError> {
    match limit {
        None => f.await,
        Some(d) => tokio::time::timeout(d, f)
            .await
            .unwrap_or(Err(WireError::Timeout(d))),
    }
}

/// Reads whole frames from a QUIC receive stream.
pub struct FrameReader {
    stream: quinn::RecvStream,
    max: usize,
    timeout: Option<Duration>,
    peeked: Option<Message>,
    /// Frame bodies are read into these buffers, in turn, and split off them.
    bodies: [BytesMut; 2],
    turn: bool,
}

impl FrameReader {
    pub fn new(stream: quinn::RecvStream, max: usize) -> Self {
        FrameReader {
            stream,
            max,
            timeout: None,
            peeked: None,
            bodies: [BytesMut::new(), BytesMut::new()],
            turn: false,
        }
    }

    /// Bounds each [`FrameReader::read`]: a whole frame must arrive within `limit` of the
    /// call, or the read fails with [`WireError::Timeout`] (a slow or idle peer cannot
    /// hold the stream). A timed-out read may have consumed part of a frame: the stream
    /// is then unusable and must be abandoned. `None` (the default) waits for ever.
    pub fn set_timeout(&mut self, limit: Option<Duration>) {
        self.timeout = limit;
    }

    /// Reads the next frame and keeps it: the following [`FrameReader::read`] returns it
    /// again. Lets a caller look at a stream's first frame before handing the stream on.
    pub async fn peek(&mut self) -> Result<Option<&Message>, WireError> {
        if self.peeked.is_none() {
            self.peeked = self.read().await?;
        }
        Ok(self.peeked.as_ref())
    }

    /// Raises or lowers the frame size limit (e.g. once an offer set the chunk size).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// The next frame, or `None` when the peer finished the stream at a frame boundary.
    pub async fn read(&mut self) -> Result<Option<Message>, WireError> {
        if let Some(m) = self.peeked.take() {
            return Ok(Some(m));
        }
        let limit = self.timeout;
        bounded(limit, self.read_frame()).await
    }

    async fn read_frame(&mut self) -> Result<Option<Message>, WireError> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated),
            Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        let len = frame_len(header, self.max).map_err(WireError::Frame)?;
        // Gather the body from QUIC's own buffers (no zero-fill of a 4 MiB buffer first).
        // Two buffers take turns: a caller may hold one frame while the next is read, and
        // once the older frame is dropped `reserve` reclaims its memory, so no fresh pages
        // are faulted in for every chunk.
        self.turn = !self.turn;
        let body = &mut self.bodies[usize::from(self.turn)];
        body.clear();
        body.reserve(len);
        while body.len() < len {
            match self.stream.read_chunk(len - body.len(), true).await? {
                Some(chunk) => body.extend_from_slice(&chunk.bytes),
                None => return Err(WireError::Truncated),
            }
        }
        decode_body(body.split().freeze())
            .map(Some)
            .map_err(WireError::Frame)
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.stream.stop(code.into());
    }
}

/// The send priority of a connection's control stream, above every file stream (the
/// agent gives live files 1, backlog and replays 0): heartbeats leave even while file
/// data fills the congestion window. Below it, on a lossy or rate-capped path, a live
/// file's queued data kept the agent's heartbeats from leaving for 20 s, and the
/// receiver dropped the connection as silent.
pub const CONTROL_PRIORITY: i32 = 1 << 16;

/// Writes frames to a QUIC send stream, reusing one encode buffer.
pub struct FrameWriter {
    stream: quinn::SendStream,
    buf: BytesMut,
    timeout: Option<Duration>,
}

impl FrameWriter {
    pub fn new(stream: quinn::SendStream) -> Self {
        FrameWriter {
            stream,
            buf: BytesMut::new(),
            timeout: None,
        }
    }

    /// Bounds each [`FrameWriter::send`]: a peer that does not read (so that flow control
    /// never lets the frame out) fails the send with [`WireError::Timeout`] after `limit`.
    /// `None` (the default) waits for ever.
    pub fn set_timeout(&mut self, limit: Option<Duration>) {
        self.timeout = limit;
    }

    /// Sends one frame. A chunk's payload is handed to QUIC by reference, not copied.
    pub async fn send(&mut self, msg: &Message) -> Result<(), WireError> {
        let limit = self.timeout;
        bounded(limit, self.send_frame(msg)).await
    }

    async fn send_frame(&mut self, msg: &Message) -> Result<(), WireError> {
        self.buf.clear();
        let payload = msg
            .encode_header(&mut self.buf)
            .map_err(WireError::Encode)?;
        let header = self.buf.split().freeze();
        match payload {
            Some(p) => self.stream.write_all_chunks(&mut [header, p]).await,
            None => self.stream.write_all_chunks(&mut [header]).await,
        }
        .map_err(|e| WireError::Connection(e.to_string()))
    }

    /// Finishes the stream (no more frames). Errors mean the peer already went away.
    pub fn finish(&mut self) {
        let _ = self.stream.finish();
    }

    /// Finishes the stream, then waits at most `limit` until the peer has acknowledged
    /// every byte of it at the QUIC level, or has stopped reading it. True if it did.
    ///
    /// Closing a connection (or its endpoint) discards stream data not yet sent or lost
    /// in flight, so a last frame is only safe once acknowledged: then it sits in the
    /// peer's QUIC buffers, and quinn hands buffered data to the peer's reader before it
    /// reports the connection closed.
    pub async fn finish_delivered(&mut self, limit: Duration) -> bool {
        let _ = self.stream.finish();
        matches!(
            tokio::time::timeout(limit, self.stream.stopped()).await,
            Ok(Ok(_))
        )
    }

    /// Abandons the stream.
    pub fn reset(&mut self, code: u32) {
        let _ = self.stream.reset(code.into());
    }

    /// QUIC sends the data of higher-priority streams first (locally; nothing goes on the
    /// wire). See [`CONTROL_PRIORITY`].
    pub fn set_priority(&self, priority: i32) {
        let _ = self.stream.set_priority(priority);
    }
}
