//! The async edge of the protocol: reading and writing frames on QUIC streams.
//!
//! The only code in `common` that touches a socket. Readers check a frame's length
//! prefix against the stream's limit before allocating its body, and keep "the peer sent
//! bad bytes" ([`WireError::Frame`]) apart from "the connection went away"
//! ([`WireError::Connection`]), because the first is counted and logged as a protocol
//! violation and the second is an ordinary outage to retry.

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

/// Reads whole frames from a QUIC receive stream.
pub struct FrameReader {
    stream: quinn::RecvStream,
    max: usize,
}

impl FrameReader {
    pub fn new(stream: quinn::RecvStream, max: usize) -> Self {
        FrameReader { stream, max }
    }

    /// Raises or lowers the frame size limit (e.g. once an offer set the chunk size).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// The next frame, or `None` when the peer finished the stream at a frame boundary.
    pub async fn read(&mut self) -> Result<Option<Message>, WireError> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated),
            Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        let len = frame_len(header, self.max).map_err(WireError::Frame)?;
        // Gather the body from QUIC's own buffers (no zero-fill of a 4 MiB buffer first).
        let mut body = BytesMut::with_capacity(len);
        while body.len() < len {
            match self.stream.read_chunk(len - body.len(), true).await? {
                Some(chunk) => body.extend_from_slice(&chunk.bytes),
                None => return Err(WireError::Truncated),
            }
        }
        decode_body(body.freeze())
            .map(Some)
            .map_err(WireError::Frame)
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.stream.stop(code.into());
    }
}

/// Writes frames to a QUIC send stream, reusing one encode buffer.
pub struct FrameWriter {
    stream: quinn::SendStream,
    buf: BytesMut,
}

impl FrameWriter {
    pub fn new(stream: quinn::SendStream) -> Self {
        FrameWriter {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Sends one frame. A chunk's payload is handed to QUIC by reference, not copied.
    pub async fn send(&mut self, msg: &Message) -> Result<(), WireError> {
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

    /// Abandons the stream.
    pub fn reset(&mut self, code: u32) {
        let _ = self.stream.reset(code.into());
    }

    pub fn set_priority(&self, priority: i32) {
        let _ = self.stream.set_priority(priority);
    }
}
