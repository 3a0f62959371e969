//! The skyferry wire protocol: message types and the frame codec.
//!
//! An agent opens one QUIC connection to a receiver (ALPN [`ALPN`]).
//!
//! - **Control stream** (the first bidirectional stream): the agent sends
//!   [`Hello`]; the receiver answers [`Welcome`], or [`Refuse`] and closes.
//!   Afterwards both sides send heartbeats ([`AgentHeartbeat`],
//!   [`ReceiverHeartbeat`]) for the life of the connection.
//! - **File stream** (one bidirectional stream per file): the agent sends
//!   [`Offer`]; the receiver answers [`Resume`] listing the chunk ranges it
//!   still needs (empty if none), or [`Ack`] if it already has the file, or
//!   [`Reject`]. The agent sends a [`Chunk`] for each missing chunk (the
//!   receiver answers each with a [`ChunkAck`] once it is verified and written;
//!   the agent keeps at most a small window unacknowledged), then
//!   [`Commit`]; the receiver verifies, stores durably and answers [`Ack`] or
//!   [`Reject`].
//!
//! Every message is one length-prefixed frame; the byte layout is specified
//! in [`codec`]. Readers bound every frame before allocating:
//! [`MAX_CONTROL_FRAME`] on the control stream and for the first frame of a
//! file stream, [`max_data_frame`] for chunk frames.
//!
//! This module is pure: it reads no clock and touches no socket.

mod codec;
mod message;

pub use codec::{decode, decode_body, frame_len, FrameError};
pub use message::{
    hex, short_hex, Ack, AgentHeartbeat, Attach, Chunk, ChunkAck, ChunkRange, Codec, Commit,
    ErrorCode, Hash, Hello, Lane, Message, NodeLoadSummary, Offer, ReceiverHeartbeat, ReceiverNode,
    Refuse, Reject, Resume, StorageState, Welcome,
};

/// The QUIC ALPN protocol identifier. A new major protocol gets a new ALPN.
pub const ALPN: &[u8] = b"skyferry/2";

/// Version carried in [`Hello`] and [`Welcome`].
pub const PROTOCOL_VERSION: u16 = 2;

/// Most connections (lanes, [`Lane`]) one agent instance may keep; also the ceiling of
/// the agent's `transfer.connections`.
pub const MAX_LANES: u16 = 16;

/// Application close codes of a connection (docs/protocol.md §2), the same numbers on
/// both sides. Shutting down (either side).
pub const CLOSE_SHUTDOWN: u32 = 0;
/// Receiver: the hello failed or was refused; the close reason is
/// [`Refuse::close_reason`].
pub const CLOSE_REFUSED: u32 = 1;
/// Either side: no heartbeat for three intervals.
pub const CLOSE_HEARTBEAT_LOST: u32 = 2;
/// Receiver: a newer connection of the same agent id took over.
pub const CLOSE_SUPERSEDED: u32 = 3;

/// Largest frame accepted on the control stream and as the first frame of a
/// file stream (before the chunk size is known). Counts the type byte and
/// the body, not the 4-byte length prefix.
///
/// This bounds a [`Resume`] to 8191 ranges; a receiver with a more
/// fragmented set of missing chunks must coalesce ranges (re-sending a chunk
/// it already has is harmless).
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

/// Smallest chunk size a peer may offer.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;

/// Largest chunk size a peer may offer.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;

/// Longest string (path, identifier, reason) a frame may carry, in bytes.
pub const MAX_PATH_LEN: usize = 4096;

/// Room for a [`Chunk`] frame's fixed fields: type (1) + index (4) +
/// codec (1) + raw_len (4) + chunk_hash (32) = 42 bytes, rounded up.
pub const CHUNK_FRAME_OVERHEAD: usize = 64;

/// Largest frame a reader accepts on a file stream whose offer announced
/// `chunk_size`.
///
/// A zstd frame of incompressible input is slightly larger than the input
/// (zstd's own bound is `n + n/256 + (n < 128 KiB ? (128 KiB - n) >> 11 : 0)`,
/// i.e. at most 64 bytes extra below 128 KiB), so the payload allowance is
/// `chunk_size + chunk_size/128 + 1024`, which covers that bound with margin
/// for any chunk size, plus [`CHUNK_FRAME_OVERHEAD`] for the fixed fields.
pub fn max_data_frame(chunk_size: u32) -> usize {
    let n = chunk_size as usize;
    n + n / 128 + 1024 + CHUNK_FRAME_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_frame_limit_covers_zstd_bound_and_fixed_fields() {
        for n in [
            0,
            1,
            MIN_CHUNK_SIZE - 1,
            MIN_CHUNK_SIZE,
            128 * 1024,
            MAX_CHUNK_SIZE,
        ] {
            let n64 = u64::from(n);
            let small = if n64 < 128 * 1024 {
                (128 * 1024 - n64) >> 11
            } else {
                0
            };
            let zstd_bound = n64 + n64 / 256 + small;
            let limit = max_data_frame(n) as u64;
            assert!(
                limit >= zstd_bound + 42,
                "chunk size {n}: {limit} < {zstd_bound} + 42"
            );
        }
        // On a 32-bit target the largest data frame still fits in usize and u32.
        assert!(max_data_frame(MAX_CHUNK_SIZE) < u32::MAX as usize);
    }
}
