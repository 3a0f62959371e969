//! The frame codec: how a [`Message`] is laid out in bytes.
//!
//! # Wire format (protocol version 1)
//!
//! A frame is a length prefix followed by that many bytes:
//!
//! ```text
//! len: u32 big-endian | type: u8 | body: len - 1 bytes
//! ```
//!
//! `len` counts the type byte and the body, not the prefix itself; `len == 0`
//! is an error. A reader checks `len` against its limit (see
//! [`super::MAX_CONTROL_FRAME`], [`super::max_data_frame`]) before it
//! allocates anything for the frame.
//!
//! Field encodings:
//!
//! - integers: big-endian, of the stated width (`i64` is two's complement);
//! - `string`: `u16` byte length, then that many bytes of UTF-8; invalid
//!   UTF-8 and lengths over [`super::MAX_PATH_LEN`] (4096) are errors;
//! - `hash`: 32 raw bytes (BLAKE3);
//! - `bool`: one byte, 0 or 1; any other value is an error;
//! - `ranges`: `u32` count, then `count` pairs of (`start: u32`, `end: u32`),
//!   each a half-open range of chunk indexes with `start < end`;
//! - `payload`: every byte after the fixed fields up to the end of the frame
//!   (no length prefix).
//!
//! A body is the fields of its type, in order, and nothing else: bytes left
//! over after the last field are an error. Optional groups: a `Hello`'s
//! lane (in brackets below) is present exactly when bytes follow
//! `capabilities`; it was added to protocol 2 before its release, and a hello
//! without it decodes as before. Heartbeats end the same way with an optional node-load
//! group (`load`: steal_bp u16, pressure_cpu_bp u16, pressure_io_bp u16, load1_centi
//! u32; all-ones means "not available"), and the receiver's with the stall start after it.
//!
//! | type | message            | body |
//! |------|--------------------|------|
//! | 0x01 | Hello              | version u16, agent_id string, capabilities u64, [instance u64, lane u16, lanes u16] |
//! | 0x02 | Welcome            | version u16, receiver_id string, heartbeat_interval_ms u32 |
//! | 0x03 | Refuse             | code u16, reason string |
//! | 0x04 | AgentHeartbeat     | seq u64, pending_files u64, pending_bytes u64, oldest_pending_age_s u64, send_rate_bps u64, [load] |
//! | 0x05 | ReceiverHeartbeat  | seq u64, storage u8 (0 ok, 1 stalled, 2 full), free_bytes u64, [load, stalled_since_s u64] |
//! | 0x10 | Offer              | path string, size u64, mtime_ns i64, has_hash bool, [file_hash hash if has_hash], chunk_size u32 |
//! | 0x11 | Resume             | missing ranges |
//! | 0x12 | Chunk              | index u32, codec u8 (0 raw, 1 zstd), raw_len u32, chunk_hash hash, payload |
//! | 0x13 | Commit             | chunks_sent u32, file_hash hash |
//! | 0x14 | Ack                | stored_path string, already_stored bool |
//! | 0x15 | Reject             | code u16, reason string |
//! | 0x16 | ChunkAck           | index u32 |
//! | 0x17 | NeedHash           | (empty) |
//! | 0x18 | FileHash           | file_hash hash |
//! | 0x19 | Attach             | path string |
//! | 0x1a | Attached           | (empty) |
//!
//! Error codes (`u16`): 1 bad_path, 2 too_large, 3 storage_full,
//! 4 storage_error, 5 hash_mismatch, 6 chunk_mismatch, 7 protocol,
//! 8 version_mismatch, 9 unauthorized, 10 busy, 11 shutting_down. A receiver
//! of an unknown code treats it as retryable.
//!
//! The codec checks structure only. Meaning (a valid path, a chunk size
//! within bounds, ranges in order, a payload matching `raw_len`) is checked
//! by the session that consumes the message.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::message::{
    Ack, AgentHeartbeat, Attach, Chunk, ChunkAck, ChunkRange, Codec, Commit, ErrorCode, Hello,
    Lane, Message, NodeLoadSummary, Offer, ReceiverHeartbeat, ReceiverNode, Refuse, Reject, Resume,
    StorageState, Welcome,
};
use super::MAX_PATH_LEN;

const HELLO: u8 = 0x01;
const WELCOME: u8 = 0x02;
const REFUSE: u8 = 0x03;
const AGENT_HEARTBEAT: u8 = 0x04;
const RECEIVER_HEARTBEAT: u8 = 0x05;
const OFFER: u8 = 0x10;
const RESUME: u8 = 0x11;
const CHUNK: u8 = 0x12;
const COMMIT: u8 = 0x13;
const ACK: u8 = 0x14;
const REJECT: u8 = 0x15;
const CHUNK_ACK: u8 = 0x16;
const NEED_HASH: u8 = 0x17;
const FILE_HASH: u8 = 0x18;
const ATTACH: u8 = 0x19;
const ATTACHED: u8 = 0x1a;

/// Bytes of a [`Chunk`] frame before the payload: type, index, codec, raw_len, hash.
const CHUNK_FIXED_LEN: usize = 1 + 4 + 1 + 4 + 32;

/// A frame that cannot be encoded or decoded.
///
/// Every variant returned by the decoders means the peer sent bad data (or
/// is not speaking this protocol); none of them is worth retrying on the
/// same stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("empty frame (length prefix is 0)")]
    Empty,
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("truncated {kind} frame")]
    Truncated { kind: &'static str },
    #[error("{kind} frame has {extra} trailing bytes after its last field")]
    TrailingBytes { kind: &'static str, extra: usize },
    #[error("{kind} frame: {field} is not valid utf-8")]
    InvalidUtf8 {
        kind: &'static str,
        field: &'static str,
    },
    #[error("{kind} frame: {field} is {len} bytes long, over the limit of {max} bytes")]
    StringTooLong {
        kind: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} frame: invalid {field} value {value}")]
    InvalidValue {
        kind: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("resume frame: chunk range [{start}, {end}) is empty or inverted")]
    InvalidRange { start: u32, end: u32 },
}

fn kind_of(ty: u8) -> Option<&'static str> {
    Some(match ty {
        HELLO => "hello",
        WELCOME => "welcome",
        REFUSE => "refuse",
        AGENT_HEARTBEAT => "agent_heartbeat",
        RECEIVER_HEARTBEAT => "receiver_heartbeat",
        OFFER => "offer",
        RESUME => "resume",
        CHUNK => "chunk",
        COMMIT => "commit",
        ACK => "ack",
        REJECT => "reject",
        CHUNK_ACK => "chunk_ack",
        NEED_HASH => "need_hash",
        FILE_HASH => "file_hash",
        ATTACH => "attach",
        ATTACHED => "attached",
        _ => return None,
    })
}

impl Message {
    /// Appends this message to `dst` as one whole frame, length prefix included.
    ///
    /// Fails, leaving `dst` as it was, on anything the decoder would reject:
    /// an identifier or path (`agent_id`, `receiver_id`, `path`,
    /// `stored_path`) longer than [`MAX_PATH_LEN`] bytes, an empty or
    /// inverted [`ChunkRange`], or a frame over `u32::MAX` bytes. Callers
    /// validate paths first, so an error here is a bug in the caller.
    ///
    /// A `reason` (in [`Refuse`] and [`Reject`]) is diagnostic text that may
    /// quote a peer-supplied path; it is truncated at a character boundary to
    /// `MAX_PATH_LEN` bytes rather than failing, so reporting an error can
    /// never itself fail.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        let result = self.encode_frame(dst, start);
        if result.is_err() {
            dst.truncate(start);
        }
        result
    }

    /// Like [`Message::encode`], but a chunk's payload is not copied: only the frame
    /// header (length prefix and fixed fields) goes into `dst`, and the payload is
    /// returned to be sent right after it. Other messages are encoded whole and `None`
    /// is returned. Saves a copy of every chunk on the sending hot path.
    pub fn encode_header(&self, dst: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Message::Chunk(m) = self else {
            return self.encode(dst).map(|()| None);
        };
        let len = CHUNK_FIXED_LEN.saturating_add(m.payload.len());
        let len32 = u32::try_from(len).map_err(|_| too_large(len))?;
        dst.put_u32(len32);
        dst.put_u8(CHUNK);
        dst.put_u32(m.index);
        dst.put_u8(m.codec.as_u8());
        dst.put_u32(m.raw_len);
        dst.put_slice(&m.chunk_hash);
        Ok(Some(m.payload.clone()))
    }

    fn encode_frame(&self, dst: &mut BytesMut, start: usize) -> Result<(), FrameError> {
        dst.put_u32(0); // Patched below once the length is known.
        let kind = self.kind();
        match self {
            Message::Hello(m) => {
                dst.put_u8(HELLO);
                dst.put_u16(m.version);
                put_str(dst, kind, "agent_id", &m.agent_id)?;
                dst.put_u64(m.capabilities);
                if let Some(lane) = m.lane {
                    dst.put_u64(lane.instance);
                    dst.put_u16(lane.index);
                    dst.put_u16(lane.count);
                }
            }
            Message::Welcome(m) => {
                dst.put_u8(WELCOME);
                dst.put_u16(m.version);
                put_str(dst, kind, "receiver_id", &m.receiver_id)?;
                dst.put_u32(m.heartbeat_interval_ms);
            }
            Message::Refuse(m) => {
                dst.put_u8(REFUSE);
                dst.put_u16(m.code.as_u16());
                put_reason(dst, &m.reason);
            }
            Message::AgentHeartbeat(m) => {
                dst.put_u8(AGENT_HEARTBEAT);
                dst.put_u64(m.seq);
                dst.put_u64(m.pending_files);
                dst.put_u64(m.pending_bytes);
                dst.put_u64(m.oldest_pending_age_s);
                dst.put_u64(m.send_rate_bps);
                if let Some(l) = &m.node_load {
                    put_load(dst, l);
                }
            }
            Message::ReceiverHeartbeat(m) => {
                dst.put_u8(RECEIVER_HEARTBEAT);
                dst.put_u64(m.seq);
                dst.put_u8(m.storage.as_u8());
                dst.put_u64(m.free_bytes);
                if let Some(n) = &m.node {
                    put_load(dst, &n.load);
                    dst.put_u64(n.stalled_since_s);
                }
            }
            Message::Offer(m) => {
                dst.put_u8(OFFER);
                put_str(dst, kind, "path", &m.path)?;
                dst.put_u64(m.size);
                dst.put_i64(m.mtime_ns);
                match &m.file_hash {
                    Some(h) => {
                        dst.put_u8(1);
                        dst.put_slice(h);
                    }
                    None => dst.put_u8(0),
                }
                dst.put_u32(m.chunk_size);
            }
            Message::Resume(m) => {
                let count = u32::try_from(m.missing.len())
                    .map_err(|_| too_large(m.missing.len().saturating_mul(8)))?;
                dst.put_u8(RESUME);
                dst.put_u32(count);
                for r in &m.missing {
                    if r.start >= r.end {
                        return Err(FrameError::InvalidRange {
                            start: r.start,
                            end: r.end,
                        });
                    }
                    dst.put_u32(r.start);
                    dst.put_u32(r.end);
                }
            }
            Message::Chunk(m) => {
                // Checked before copying a payload that cannot be framed.
                let len = CHUNK_FIXED_LEN.saturating_add(m.payload.len());
                if u32::try_from(len).is_err() {
                    return Err(too_large(len));
                }
                dst.put_u8(CHUNK);
                dst.put_u32(m.index);
                dst.put_u8(m.codec.as_u8());
                dst.put_u32(m.raw_len);
                dst.put_slice(&m.chunk_hash);
                dst.put_slice(&m.payload);
            }
            Message::ChunkAck(m) => {
                dst.put_u8(CHUNK_ACK);
                dst.put_u32(m.index);
            }
            Message::Commit(m) => {
                dst.put_u8(COMMIT);
                dst.put_u32(m.chunks_sent);
                dst.put_slice(&m.file_hash);
            }
            Message::NeedHash => dst.put_u8(NEED_HASH),
            Message::FileHash(h) => {
                dst.put_u8(FILE_HASH);
                dst.put_slice(h);
            }
            Message::Attach(m) => {
                dst.put_u8(ATTACH);
                put_str(dst, kind, "path", &m.path)?;
            }
            Message::Attached => dst.put_u8(ATTACHED),
            Message::Ack(m) => {
                dst.put_u8(ACK);
                put_str(dst, kind, "stored_path", &m.stored_path)?;
                dst.put_u8(u8::from(m.already_stored));
            }
            Message::Reject(m) => {
                dst.put_u8(REJECT);
                dst.put_u16(m.code.as_u16());
                put_reason(dst, &m.reason);
            }
        }
        let len = dst.len() - start - 4;
        let len32 = u32::try_from(len).map_err(|_| too_large(len))?;
        // `start..start + 4` is the prefix written at the top of this function.
        dst[start..start + 4].copy_from_slice(&len32.to_be_bytes());
        Ok(())
    }
}

fn too_large(len: usize) -> FrameError {
    FrameError::FrameTooLarge {
        len,
        max: u32::MAX as usize,
    }
}

fn put_load(dst: &mut BytesMut, l: &NodeLoadSummary) {
    for v in [l.steal_bp, l.pressure_cpu_bp, l.pressure_io_bp] {
        dst.put_u16(v.unwrap_or(u16::MAX));
    }
    dst.put_u32(l.load1_centi.unwrap_or(u32::MAX));
}

fn put_str(
    dst: &mut BytesMut,
    kind: &'static str,
    field: &'static str,
    s: &str,
) -> Result<(), FrameError> {
    if s.len() > MAX_PATH_LEN {
        return Err(FrameError::StringTooLong {
            kind,
            field,
            len: s.len(),
            max: MAX_PATH_LEN,
        });
    }
    // MAX_PATH_LEN < u16::MAX, so the length fits.
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
    Ok(())
}

fn put_reason(dst: &mut BytesMut, reason: &str) {
    let mut end = reason.len().min(MAX_PATH_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1; // Terminates: 0 is always a char boundary.
    }
    let kept = reason.get(..end).unwrap_or_default();
    dst.put_u16(kept.len() as u16); // <= MAX_PATH_LEN < u16::MAX
    dst.put_slice(kept.as_bytes());
}

/// Validates a frame's length prefix against `max` and returns the number of
/// bytes that follow it (type byte + body).
///
/// Readers call this on the first 4 bytes of a frame before allocating a
/// buffer for the rest.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::FrameTooLarge { len, max });
    }
    Ok(len)
}

/// Decodes one frame's type byte and body: the `len` bytes after the prefix.
///
/// A [`Chunk`]'s payload is a zero-copy slice of `body`.
pub fn decode_body(body: Bytes) -> Result<Message, FrameError> {
    let Some(&ty) = body.first() else {
        return Err(FrameError::Empty);
    };
    let kind = kind_of(ty).ok_or(FrameError::UnknownType(ty))?;
    let mut r = Reader {
        rest: body.slice(1..),
        kind,
    };
    let msg = match ty {
        HELLO => Message::Hello(Hello {
            version: r.u16()?,
            agent_id: r.string("agent_id")?,
            capabilities: r.u64()?,
            // Optional: present exactly when bytes follow (a partial group is an error).
            lane: if r.rest.is_empty() {
                None
            } else {
                Some(Lane {
                    instance: r.u64()?,
                    index: r.u16()?,
                    count: r.u16()?,
                })
            },
        }),
        WELCOME => Message::Welcome(Welcome {
            version: r.u16()?,
            receiver_id: r.string("receiver_id")?,
            heartbeat_interval_ms: r.u32()?,
        }),
        REFUSE => Message::Refuse(Refuse {
            code: ErrorCode::from_u16(r.u16()?),
            reason: r.string("reason")?,
        }),
        AGENT_HEARTBEAT => Message::AgentHeartbeat(AgentHeartbeat {
            seq: r.u64()?,
            pending_files: r.u64()?,
            pending_bytes: r.u64()?,
            oldest_pending_age_s: r.u64()?,
            send_rate_bps: r.u64()?,
            node_load: if r.rest.is_empty() {
                None
            } else {
                Some(r.load()?)
            },
        }),
        RECEIVER_HEARTBEAT => Message::ReceiverHeartbeat(ReceiverHeartbeat {
            seq: r.u64()?,
            storage: {
                let v = r.u8()?;
                StorageState::from_u8(v).ok_or(r.invalid("storage", v.into()))?
            },
            free_bytes: r.u64()?,
            node: if r.rest.is_empty() {
                None
            } else {
                Some(ReceiverNode {
                    load: r.load()?,
                    stalled_since_s: r.u64()?,
                })
            },
        }),
        OFFER => Message::Offer(Offer {
            path: r.string("path")?,
            size: r.u64()?,
            mtime_ns: i64::from_be_bytes(r.array()?),
            file_hash: match r.bool("has_hash")? {
                true => Some(r.array()?),
                false => None,
            },
            chunk_size: r.u32()?,
        }),
        RESUME => Message::Resume(Resume {
            missing: r.ranges()?,
        }),
        CHUNK => Message::Chunk(Chunk {
            index: r.u32()?,
            codec: {
                let v = r.u8()?;
                Codec::from_u8(v).ok_or(r.invalid("codec", v.into()))?
            },
            raw_len: r.u32()?,
            chunk_hash: r.array::<32>()?,
            payload: std::mem::take(&mut r.rest),
        }),
        COMMIT => Message::Commit(Commit {
            chunks_sent: r.u32()?,
            file_hash: r.array()?,
        }),
        NEED_HASH => Message::NeedHash,
        FILE_HASH => Message::FileHash(r.array()?),
        ATTACH => Message::Attach(Attach {
            path: r.string("path")?,
        }),
        ATTACHED => Message::Attached,
        CHUNK_ACK => Message::ChunkAck(ChunkAck { index: r.u32()? }),
        ACK => Message::Ack(Ack {
            stored_path: r.string("stored_path")?,
            already_stored: r.bool("already_stored")?,
        }),
        REJECT => Message::Reject(Reject {
            code: ErrorCode::from_u16(r.u16()?),
            reason: r.string("reason")?,
        }),
        // kind_of() accepted the byte, and every type it knows is matched above.
        _ => return Err(FrameError::UnknownType(ty)),
    };
    if !r.rest.is_empty() {
        return Err(FrameError::TrailingBytes {
            kind,
            extra: r.rest.len(),
        });
    }
    Ok(msg)
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, consuming
/// nothing; once the 4-byte prefix is present its length is checked against
/// `max` before any memory is reserved for the rest. On success exactly one
/// frame is consumed. On error the stream is unusable and must be closed:
/// a too-large or empty prefix is left in `buf`, a malformed frame is
/// consumed.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Message>, FrameError> {
    let Some(header) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = frame_len(*header, max)?;
    let total = len
        .checked_add(4)
        .ok_or(FrameError::FrameTooLarge { len, max })?;
    if buf.len() < total {
        // Bounded by `max`, checked above.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(4);
    decode_body(frame.freeze()).map(Some)
}

/// Reads fields off the front of a frame body; every read is bounds-checked.
struct Reader {
    rest: Bytes,
    kind: &'static str,
}

impl Reader {
    fn truncated(&self) -> FrameError {
        FrameError::Truncated { kind: self.kind }
    }

    fn invalid(&self, field: &'static str, value: u64) -> FrameError {
        FrameError::InvalidValue {
            kind: self.kind,
            field,
            value,
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let (head, _) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or_else(|| self.truncated())?;
        let head = *head;
        self.rest.advance(N); // At least N bytes remain: split_first_chunk succeeded.
        Ok(head)
    }

    /// A [`NodeLoadSummary`]: `u16::MAX` / `u32::MAX` mean "not available".
    fn load(&mut self) -> Result<NodeLoadSummary, FrameError> {
        let bp = |v: u16| (v != u16::MAX).then_some(v);
        Ok(NodeLoadSummary {
            steal_bp: bp(self.u16()?),
            pressure_cpu_bp: bp(self.u16()?),
            pressure_io_bp: bp(self.u16()?),
            load1_centi: Some(self.u32()?).filter(|v| *v != u32::MAX),
        })
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(field, v.into())),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, FrameError> {
        let len = usize::from(self.u16()?);
        if len > MAX_PATH_LEN {
            return Err(FrameError::StringTooLong {
                kind: self.kind,
                field,
                len,
                max: MAX_PATH_LEN,
            });
        }
        if self.rest.len() < len {
            return Err(self.truncated());
        }
        let bytes = self.rest.split_to(len); // len <= rest.len(), checked above.
        match std::str::from_utf8(&bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(FrameError::InvalidUtf8 {
                kind: self.kind,
                field,
            }),
        }
    }

    fn ranges(&mut self) -> Result<Vec<ChunkRange>, FrameError> {
        let count = self.u32()?;
        // Check the claimed count against the bytes present before allocating:
        // a 13-byte frame must not make us reserve 32 GiB.
        if u64::from(count) * 8 > self.rest.len() as u64 {
            return Err(self.truncated());
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (start, end) = (self.u32()?, self.u32()?);
            if start >= end {
                return Err(FrameError::InvalidRange { start, end });
            }
            ranges.push(ChunkRange { start, end });
        }
        Ok(ranges)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {

    #[test]
    fn header_plus_payload_is_the_whole_frame() {
        let chunk = Message::Chunk(Chunk {
            index: 7,
            codec: Codec::Zstd,
            raw_len: 1000,
            chunk_hash: [9; 32],
            payload: Bytes::from_static(b"some payload bytes"),
        });
        let mut whole = BytesMut::new();
        chunk.encode(&mut whole).unwrap();
        let mut split = BytesMut::new();
        let payload = chunk.encode_header(&mut split).unwrap().unwrap();
        split.extend_from_slice(&payload);
        assert_eq!(split, whole);
        let hello = Message::Commit(Commit {
            chunks_sent: 3,
            file_hash: [9; 32],
        });
        let mut a = BytesMut::new();
        assert_eq!(hello.encode_header(&mut a).unwrap(), None);
        let mut b = BytesMut::new();
        hello.encode(&mut b).unwrap();
        assert_eq!(a, b);
    }
    use super::*;
    use crate::protocol::{Hash, MAX_CONTROL_FRAME, MIN_CHUNK_SIZE};
    use proptest::prelude::*;
    use proptest::sample::Index;

    const TYPES: [u8; 16] = [
        HELLO,
        WELCOME,
        REFUSE,
        AGENT_HEARTBEAT,
        RECEIVER_HEARTBEAT,
        OFFER,
        RESUME,
        CHUNK,
        COMMIT,
        ACK,
        REJECT,
        CHUNK_ACK,
        NEED_HASH,
        FILE_HASH,
        ATTACH,
        ATTACHED,
    ];

    fn wire(msgs: &[Message]) -> BytesMut {
        let mut buf = BytesMut::new();
        for m in msgs {
            m.encode(&mut buf).unwrap();
        }
        buf
    }

    /// The body (type byte onwards) of one encoded message.
    /// Bytes of a hello's optional lane group: instance u64, lane u16, lanes u16.
    const LANE_LEN: usize = 12;

    fn body(msg: &Message) -> Bytes {
        wire(std::slice::from_ref(msg)).freeze().slice(4..)
    }

    /// Decodes every whole frame in `buf`.
    fn drain(buf: &mut BytesMut, out: &mut Vec<Message>) {
        while let Some(m) = decode(buf, usize::MAX).unwrap() {
            out.push(m);
        }
    }

    // ---- strategies ----

    fn text() -> impl Strategy<Value = String> {
        // Up to 300 chars of any Unicode: at most 1200 bytes, under MAX_PATH_LEN.
        ".{0,300}"
    }

    fn load() -> impl Strategy<Value = NodeLoadSummary> {
        let bp = || proptest::option::of(0..u16::MAX);
        (bp(), bp(), bp(), proptest::option::of(0..u32::MAX)).prop_map(|(s, c, i, l)| {
            NodeLoadSummary {
                steal_bp: s,
                pressure_cpu_bp: c,
                pressure_io_bp: i,
                load1_centi: l,
            }
        })
    }

    fn code() -> impl Strategy<Value = ErrorCode> {
        // Canonical codes only: Other(1) would decode as BadPath.
        any::<u16>().prop_map(ErrorCode::from_u16)
    }

    fn range() -> impl Strategy<Value = ChunkRange> {
        (0..u32::MAX).prop_flat_map(|start| {
            (start + 1..=u32::MAX).prop_map(move |end| ChunkRange { start, end })
        })
    }

    fn payload(max: usize) -> impl Strategy<Value = Bytes> {
        // Filled from a seed: generating 64 KiB byte by byte would dominate test time.
        (0..=max, any::<u64>()).prop_map(|(len, mut x)| {
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            Bytes::from(v)
        })
    }

    fn message(max_payload: usize) -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<u16>(),
                text(),
                any::<u64>(),
                any::<Option<(u64, u16, u16)>>()
            )
                .prop_map(|(version, agent_id, capabilities, lane)| {
                    Message::Hello(Hello {
                        version,
                        agent_id,
                        capabilities,
                        lane: lane.map(|(instance, index, count)| Lane {
                            instance,
                            index,
                            count,
                        }),
                    })
                }),
            (any::<u16>(), text(), any::<u32>()).prop_map(
                |(version, receiver_id, heartbeat_interval_ms)| Message::Welcome(Welcome {
                    version,
                    receiver_id,
                    heartbeat_interval_ms,
                })
            ),
            (code(), text()).prop_map(|(code, reason)| Message::Refuse(Refuse { code, reason })),
            (any::<[u64; 5]>(), proptest::option::of(load())).prop_map(
                |([a, b, c, d, e], node_load)| {
                    Message::AgentHeartbeat(AgentHeartbeat {
                        seq: a,
                        pending_files: b,
                        pending_bytes: c,
                        oldest_pending_age_s: d,
                        send_rate_bps: e,
                        node_load,
                    })
                }
            ),
            (
                any::<u64>(),
                0..=2u8,
                any::<u64>(),
                proptest::option::of((load(), any::<u64>()))
            )
                .prop_map(|(seq, s, free_bytes, node)| {
                    Message::ReceiverHeartbeat(ReceiverHeartbeat {
                        seq,
                        storage: StorageState::from_u8(s).unwrap(),
                        free_bytes,
                        node: node.map(|(load, stalled_since_s)| ReceiverNode {
                            load,
                            stalled_since_s,
                        }),
                    })
                }),
            (
                text(),
                any::<u64>(),
                any::<i64>(),
                any::<Option<Hash>>(),
                any::<u32>()
            )
                .prop_map(|(path, size, mtime_ns, file_hash, chunk_size)| {
                    Message::Offer(Offer {
                        path,
                        size,
                        mtime_ns,
                        file_hash,
                        chunk_size,
                    })
                }),
            prop::collection::vec(range(), 0..50)
                .prop_map(|missing| Message::Resume(Resume { missing })),
            (
                any::<u32>(),
                any::<bool>(),
                any::<u32>(),
                any::<Hash>(),
                payload(max_payload)
            )
                .prop_map(|(index, zstd, raw_len, chunk_hash, payload)| {
                    Message::Chunk(Chunk {
                        index,
                        codec: if zstd { Codec::Zstd } else { Codec::Raw },
                        raw_len,
                        chunk_hash,
                        payload,
                    })
                }),
            (any::<u32>(), any::<Hash>()).prop_map(|(chunks_sent, file_hash)| Message::Commit(
                Commit {
                    chunks_sent,
                    file_hash
                }
            )),
            Just(Message::NeedHash),
            any::<Hash>().prop_map(Message::FileHash),
            text().prop_map(|path| Message::Attach(Attach { path })),
            Just(Message::Attached),
            any::<u32>().prop_map(|index| Message::ChunkAck(ChunkAck { index })),
            (text(), any::<bool>()).prop_map(|(stored_path, already_stored)| {
                Message::Ack(Ack {
                    stored_path,
                    already_stored,
                })
            }),
            (code(), text()).prop_map(|(code, reason)| Message::Reject(Reject { code, reason })),
        ]
    }

    /// One message of each type with non-trivial fields.
    fn samples() -> Vec<Message> {
        let h = [7u8; 32];
        vec![
            Message::Hello(Hello {
                version: 1,
                agent_id: "edge-07".into(),
                capabilities: 3,
                lane: None,
            }),
            Message::Welcome(Welcome {
                version: 1,
                receiver_id: "rx".into(),
                heartbeat_interval_ms: 5000,
            }),
            Message::Refuse(Refuse {
                code: ErrorCode::Unauthorized,
                reason: "no".into(),
            }),
            Message::AgentHeartbeat(AgentHeartbeat {
                seq: 1,
                pending_files: 2,
                pending_bytes: 3,
                oldest_pending_age_s: 4,
                send_rate_bps: 5,
                node_load: None,
            }),
            Message::ReceiverHeartbeat(ReceiverHeartbeat {
                seq: 9,
                storage: StorageState::Stalled,
                free_bytes: 1 << 40,
                node: None,
            }),
            Message::Offer(Offer {
                path: "2024-05-01/det07.fits".into(),
                size: 1 << 33,
                mtime_ns: -5,
                file_hash: Some(h),
                chunk_size: 1 << 20,
            }),
            Message::Resume(Resume {
                missing: vec![
                    ChunkRange { start: 0, end: 2 },
                    ChunkRange { start: 5, end: 9 },
                ],
            }),
            Message::Chunk(Chunk {
                index: 4,
                codec: Codec::Zstd,
                raw_len: 100,
                chunk_hash: h,
                payload: Bytes::from_static(b"payload"),
            }),
            Message::Commit(Commit {
                chunks_sent: 6,
                file_hash: h,
            }),
            Message::ChunkAck(ChunkAck { index: 5 }),
            Message::Ack(Ack {
                stored_path: "a/b".into(),
                already_stored: true,
            }),
            Message::Reject(Reject {
                code: ErrorCode::HashMismatch,
                reason: "bad".into(),
            }),
            Message::Offer(Offer {
                path: "new.fits".into(),
                size: 7,
                mtime_ns: 1,
                file_hash: None,
                chunk_size: 1 << 16,
            }),
            Message::NeedHash,
            Message::FileHash(h),
            Message::Attach(Attach {
                path: "a/b.fits".into(),
            }),
            Message::Attached,
            Message::Hello(Hello {
                version: 2,
                agent_id: "edge-07".into(),
                capabilities: 0,
                lane: Some(Lane {
                    instance: 0xfeed,
                    index: 3,
                    count: 4,
                }),
            }),
            Message::AgentHeartbeat(AgentHeartbeat {
                seq: 1,
                pending_files: 2,
                pending_bytes: 3,
                oldest_pending_age_s: 4,
                send_rate_bps: 5,
                node_load: Some(NodeLoadSummary {
                    steal_bp: Some(250),
                    pressure_cpu_bp: None,
                    pressure_io_bp: Some(10_000),
                    load1_centi: Some(123),
                }),
            }),
            Message::ReceiverHeartbeat(ReceiverHeartbeat {
                seq: 9,
                storage: StorageState::Stalled,
                free_bytes: 1 << 40,
                node: Some(ReceiverNode {
                    load: NodeLoadSummary::default(),
                    stalled_since_s: 1_700_000_000,
                }),
            }),
        ]
    }

    // ---- round trips ----

    proptest! {
        #[test]
        fn every_message_round_trips(msg in message(64 * 1024)) {
            let mut buf = BytesMut::new();
            msg.encode(&mut buf).unwrap();
            let header = *buf.first_chunk::<4>().unwrap();
            prop_assert_eq!(frame_len(header, usize::MAX).unwrap(), buf.len() - 4);
            prop_assert_eq!(decode_body(buf.clone().freeze().slice(4..)).unwrap(), msg.clone());
            prop_assert_eq!(decode(&mut buf, usize::MAX).unwrap(), Some(msg));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn concatenated_frames_decode_at_any_split_points(
            msgs in prop::collection::vec(message(64 * 1024), 1..6),
            cuts in prop::collection::vec(any::<Index>(), 0..8),
        ) {
            let bytes = wire(&msgs).freeze();
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let (mut buf, mut out, mut from) = (BytesMut::new(), Vec::new(), 0);
            for to in cuts {
                buf.extend_from_slice(&bytes[from..to]);
                drain(&mut buf, &mut out);
                from = to;
            }
            prop_assert_eq!(out, msgs);
            prop_assert!(buf.is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn concatenated_frames_decode_byte_at_a_time(
            msgs in prop::collection::vec(message(2048), 1..6),
        ) {
            let bytes = wire(&msgs);
            let (mut buf, mut out) = (BytesMut::new(), Vec::new());
            for b in bytes.iter() {
                buf.put_u8(*b);
                drain(&mut buf, &mut out);
            }
            prop_assert_eq!(out, msgs);
            prop_assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_hello_decodes_with_or_without_its_lane_but_not_with_part_of_one() {
        let plain = Message::Hello(Hello {
            version: 2,
            agent_id: "kiso-01".into(),
            capabilities: 0,
            lane: None,
        });
        let laned = Message::Hello(Hello {
            lane: Some(Lane {
                instance: 42,
                index: 0,
                count: 2,
            }),
            ..match &plain {
                Message::Hello(h) => h.clone(),
                _ => unreachable!(),
            }
        });
        // A hello as agents sent it before lanes existed still decodes, to `lane: None`.
        assert_eq!(decode_body(body(&plain)).unwrap(), plain);
        assert_eq!(decode_body(body(&laned)).unwrap(), laned);
        // Any cut inside the lane group is an error, as is a byte after it.
        let full = body(&laned);
        for cut in body(&plain).len() + 1..full.len() {
            assert!(
                matches!(
                    decode_body(full.slice(..cut)),
                    Err(FrameError::Truncated { kind: "hello" })
                ),
                "cut at {cut}"
            );
        }
        let mut longer = BytesMut::from(&full[..]);
        longer.put_u8(0);
        assert!(decode_body(longer.freeze()).is_err());
    }

    #[test]
    fn lane_meaning_is_checked_apart_from_the_codec() {
        let lane = |index, count| Lane {
            instance: 1,
            index,
            count,
        };
        assert!(lane(0, 1).check(16).is_ok());
        assert!(lane(15, 16).check(16).is_ok());
        assert!(lane(0, 0).check(16).is_err());
        assert!(lane(4, 4).check(16).is_err());
        assert!(lane(0, 17).check(16).is_err());
    }

    #[test]
    fn wire_format_is_pinned() {
        // Round trips cannot catch a change made to encoder and decoder alike.
        let hello = Message::Hello(Hello {
            version: 1,
            agent_id: "ab".into(),
            capabilities: 0x0102,
            lane: None,
        });
        assert_eq!(
            &wire(&[hello])[..],
            b"\0\0\0\x0f\x01\0\x01\0\x02ab\0\0\0\0\0\0\x01\x02"
        );
        let hello = Message::Hello(Hello {
            version: 2,
            agent_id: "ab".into(),
            capabilities: 0,
            lane: Some(Lane {
                instance: 0x0102_0304_0506_0708,
                index: 1,
                count: 4,
            }),
        });
        assert_eq!(
            &wire(&[hello])[..],
            &b"\0\0\0\x1b\x01\0\x02\0\x02ab\0\0\0\0\0\0\0\0\x01\x02\x03\x04\x05\x06\x07\x08\0\x01\0\x04"[..]
        );
        let resume = Message::Resume(Resume {
            missing: vec![ChunkRange { start: 1, end: 3 }],
        });
        assert_eq!(
            &wire(&[resume])[..],
            b"\0\0\0\x0d\x11\0\0\0\x01\0\0\0\x01\0\0\0\x03"
        );
        let chunk = Message::Chunk(Chunk {
            index: 2,
            codec: Codec::Zstd,
            raw_len: 5,
            chunk_hash: [0xaa; 32],
            payload: Bytes::from_static(b"xy"),
        });
        let mut expected = b"\0\0\0\x2c\x12\0\0\0\x02\x01\0\0\0\x05".to_vec();
        expected.extend_from_slice(&[0xaa; 32]);
        expected.extend_from_slice(b"xy");
        assert_eq!(&wire(&[chunk])[..], &expected[..]);
        let ack = Message::Ack(Ack {
            stored_path: "p".into(),
            already_stored: true,
        });
        assert_eq!(&wire(&[ack])[..], b"\0\0\0\x05\x14\0\x01p\x01");
    }

    #[test]
    fn chunk_payload_is_a_zero_copy_slice_of_the_input() {
        let msg = &samples()[7];
        let input = body(msg);
        let Message::Chunk(chunk) = decode_body(input.clone()).unwrap() else {
            panic!("expected a chunk");
        };
        let range = input.as_ptr_range();
        assert!(range.contains(&chunk.payload.as_ptr()));
        assert_eq!(&chunk.payload[..], b"payload");
    }

    // ---- length prefix ----

    #[test]
    fn oversized_prefix_is_rejected_from_the_prefix_alone_without_allocating() {
        let mut buf = BytesMut::with_capacity(4);
        buf.put_u32(u32::MAX); // Claims a 4 GiB frame.
        let capacity = buf.capacity();
        let err = decode(&mut buf, MAX_CONTROL_FRAME).unwrap_err();
        assert!(
            matches!(err, FrameError::FrameTooLarge { len, max }
                if len == u32::MAX as usize && max == MAX_CONTROL_FRAME),
            "{err:?}"
        );
        assert_eq!(buf.capacity(), capacity, "decoder reserved memory");
        assert_eq!(buf.len(), 4);
        assert_eq!(
            err.to_string(),
            "frame of 4294967295 bytes exceeds the limit of 65536 bytes"
        );
    }

    #[test]
    fn limit_is_inclusive() {
        let mut buf = BytesMut::new();
        let chunk = Message::Chunk(Chunk {
            index: 0,
            codec: Codec::Raw,
            raw_len: 58,
            chunk_hash: [0; 32],
            payload: Bytes::from(vec![1; 58]),
        });
        chunk.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), 4 + 100);
        let err = decode(&mut buf.clone(), 99).unwrap_err();
        assert!(matches!(
            err,
            FrameError::FrameTooLarge { len: 100, max: 99 }
        ));
        assert_eq!(decode(&mut buf, 100).unwrap(), Some(chunk));
    }

    #[test]
    fn incomplete_input_consumes_nothing() {
        let bytes = wire(&samples()[..1]);
        for n in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..n]);
            assert_eq!(decode(&mut buf, MAX_CONTROL_FRAME).unwrap(), None);
            assert_eq!(&buf[..], &bytes[..n]);
        }
    }

    #[test]
    fn zero_length_prefix_is_empty_frame() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0, 0x13][..]);
        assert!(matches!(decode(&mut buf, 100), Err(FrameError::Empty)));
        assert!(matches!(frame_len([0; 4], 100), Err(FrameError::Empty)));
        assert!(matches!(decode_body(Bytes::new()), Err(FrameError::Empty)));
    }

    // ---- malformed bodies ----

    /// Bytes of `msg`'s optional trailing group, 0 when it has none (a hello's lane is
    /// handled on its own).
    fn optional_len(msg: &Message) -> usize {
        match msg {
            Message::AgentHeartbeat(AgentHeartbeat {
                node_load: Some(_), ..
            }) => LOAD_LEN,
            Message::ReceiverHeartbeat(ReceiverHeartbeat { node: Some(_), .. }) => LOAD_LEN + 8,
            _ => 0,
        }
    }

    const LOAD_LEN: usize = 3 * 2 + 4;

    #[test]
    fn every_strict_prefix_of_a_body_is_truncated() {
        for msg in samples() {
            let full = body(&msg);
            for n in 1..full.len() {
                let result = decode_body(full.slice(..n));
                if let Message::Hello(h) = &msg {
                    if h.lane.is_some() && n == full.len() - LANE_LEN {
                        // The lane is optional: without it, a hello all the same.
                        assert!(result.is_ok(), "hello prefix of {n} bytes: {result:?}");
                        continue;
                    }
                }
                if n == full.len() - optional_len(&msg) {
                    // Without its optional trailing group, the same message all the same.
                    assert!(
                        result.is_ok(),
                        "{} prefix of {n} bytes: {result:?}",
                        msg.kind()
                    );
                    continue;
                }
                if matches!(msg, Message::Chunk(_)) && n >= CHUNK_FIXED_LEN {
                    // The payload runs to the end of the frame: a shorter frame
                    // is a well-formed chunk with a shorter payload.
                    assert!(result.is_ok(), "chunk prefix of {n} bytes: {result:?}");
                    continue;
                }
                assert!(
                    matches!(result, Err(FrameError::Truncated { kind }) if kind == msg.kind()),
                    "{} prefix of {n} bytes: {result:?}",
                    msg.kind()
                );
            }
        }
    }

    #[test]
    fn unknown_type_is_rejected() {
        for ty in [0x00, 0x06, 0x0f, 0x1b, 0xff] {
            let result = decode_body(Bytes::from(vec![ty, 0, 0]));
            assert!(matches!(result, Err(FrameError::UnknownType(t)) if t == ty));
        }
        assert_eq!(
            FrameError::UnknownType(0x16).to_string(),
            "unknown frame type 0x16"
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for msg in samples() {
            let mut extended = body(&msg).to_vec();
            extended.extend_from_slice(&[0, 0]);
            let result = decode_body(Bytes::from(extended));
            if let Message::Chunk(_) = msg {
                // Trailing bytes of a chunk are payload.
                assert!(result.is_ok());
            } else if let Message::AgentHeartbeat(AgentHeartbeat {
                node_load: None, ..
            })
            | Message::ReceiverHeartbeat(ReceiverHeartbeat { node: None, .. }) = msg
            {
                // Bytes after a heartbeat's fields start its node-load group.
                assert!(
                    matches!(result, Err(FrameError::Truncated { kind }) if kind == msg.kind()),
                    "{}: {result:?}",
                    msg.kind()
                );
            } else if let Message::Hello(Hello { lane: None, .. }) = msg {
                // Bytes after a hello's capabilities start its lane: two are too few.
                assert!(
                    matches!(result, Err(FrameError::Truncated { kind: "hello" })),
                    "hello: {result:?}"
                );
            } else {
                assert!(
                    matches!(result, Err(FrameError::TrailingBytes { kind, extra: 2 }) if kind == msg.kind()),
                    "{}: {result:?}",
                    msg.kind()
                );
            }
        }
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let result = decode_body(Bytes::from_static(b"\x14\0\x02\xff\xfe\x00"));
        assert!(matches!(
            result,
            Err(FrameError::InvalidUtf8 {
                kind: "ack",
                field: "stored_path"
            })
        ));
    }

    #[test]
    fn over_long_string_is_rejected_before_reading_it() {
        let mut b = vec![OFFER];
        b.extend_from_slice(&4097u16.to_be_bytes());
        let result = decode_body(Bytes::from(b));
        assert!(matches!(
            result,
            Err(FrameError::StringTooLong {
                kind: "offer",
                field: "path",
                len: 4097,
                max: 4096
            })
        ));
    }

    #[test]
    fn out_of_range_enums_and_bools_are_rejected() {
        let ack = decode_body(Bytes::from_static(b"\x14\0\x01p\x02"));
        assert!(matches!(
            ack,
            Err(FrameError::InvalidValue {
                kind: "ack",
                field: "already_stored",
                value: 2
            })
        ));

        let mut chunk = body(&samples()[7]).to_vec();
        chunk[5] = 3; // codec byte: 0 raw, 1 zstd, 2 shuffle16 + zstd
        assert!(matches!(
            decode_body(Bytes::from(chunk)),
            Err(FrameError::InvalidValue {
                kind: "chunk",
                field: "codec",
                value: 3
            })
        ));

        let mut hb = body(&samples()[4]).to_vec();
        hb[9] = 3; // storage byte
        assert!(matches!(
            decode_body(Bytes::from(hb)),
            Err(FrameError::InvalidValue {
                kind: "receiver_heartbeat",
                field: "storage",
                value: 3
            })
        ));
    }

    #[test]
    fn empty_and_inverted_ranges_are_rejected() {
        for (start, end) in [(5u32, 5u32), (6, 5), (u32::MAX, 0)] {
            let mut b = vec![RESUME, 0, 0, 0, 1];
            b.extend_from_slice(&start.to_be_bytes());
            b.extend_from_slice(&end.to_be_bytes());
            let result = decode_body(Bytes::from(b));
            assert!(
                matches!(result, Err(FrameError::InvalidRange { start: s, end: e }) if s == start && e == end),
                "{result:?}"
            );
        }
    }

    #[test]
    fn resume_count_beyond_the_frame_is_rejected_before_allocating() {
        // Claims u32::MAX ranges (32 GiB as a Vec) but carries one.
        let mut b = vec![RESUME, 0xff, 0xff, 0xff, 0xff];
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        let result = decode_body(Bytes::from(b));
        assert!(matches!(
            result,
            Err(FrameError::Truncated { kind: "resume" })
        ));
    }

    // ---- encoder limits ----

    #[test]
    fn encode_rejects_what_decode_would_and_leaves_dst_untouched() {
        let long = "x".repeat(MAX_PATH_LEN + 1);
        let bad = [
            Message::Offer(Offer {
                path: long.clone(),
                size: 0,
                mtime_ns: 0,
                file_hash: Some([0; 32]),
                chunk_size: MIN_CHUNK_SIZE,
            }),
            Message::Hello(Hello {
                version: 1,
                agent_id: long,
                capabilities: 0,
                lane: None,
            }),
            Message::Resume(Resume {
                missing: vec![
                    ChunkRange { start: 1, end: 2 },
                    ChunkRange { start: 3, end: 3 },
                ],
            }),
        ];
        for msg in bad {
            let mut buf = BytesMut::from(&b"keep"[..]);
            assert!(msg.encode(&mut buf).is_err(), "{}", msg.kind());
            assert_eq!(&buf[..], b"keep");
        }
        // Exactly at the limit is fine.
        let at_limit = Message::Ack(Ack {
            stored_path: "y".repeat(MAX_PATH_LEN),
            already_stored: false,
        });
        assert_eq!(decode_body(body(&at_limit)).unwrap(), at_limit);
    }

    #[test]
    fn long_reasons_are_truncated_at_a_char_boundary() {
        // 1 + 2 * 3000 bytes: the cut at 4096 would split an 'é'.
        let reason = format!("a{}", "é".repeat(3000));
        let msg = Message::Reject(Reject {
            code: ErrorCode::BadPath,
            reason: reason.clone(),
        });
        let Message::Reject(back) = decode_body(body(&msg)).unwrap() else {
            panic!("expected a reject");
        };
        assert_eq!(back.reason.len(), MAX_PATH_LEN - 1);
        assert!(reason.starts_with(&back.reason));
    }

    // ---- never panic ----

    proptest! {
        #[test]
        fn decode_body_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_body(Bytes::from(bytes));
        }

        #[test]
        fn decode_body_never_panics_on_known_types(
            ty in prop::sample::select(&TYPES[..]),
            rest in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut b = vec![ty];
            b.extend_from_slice(&rest);
            let _ = decode_body(Bytes::from(b));
        }

        #[test]
        fn decode_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            max in prop_oneof![0..700usize, Just(usize::MAX)],
        ) {
            let mut buf = BytesMut::from(&bytes[..]);
            // Each Ok(Some) consumes at least 5 bytes, so this terminates.
            while let Ok(Some(_)) = decode(&mut buf, max) {}
        }

        #[test]
        fn decode_never_panics_on_corrupted_frames(
            msgs in prop::collection::vec(message(256), 1..4),
            edits in prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        ) {
            let mut buf = wire(&msgs);
            let len = buf.len();
            for (i, byte) in edits {
                buf[i.index(len)] = byte;
            }
            while let Ok(Some(_)) = decode(&mut buf, MAX_CONTROL_FRAME) {}
        }
    }
}
