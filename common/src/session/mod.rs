//! Per-file transfer sessions as pure state machines, one for each end of a file stream.
//!
//! They follow quinn-proto's shape: the I/O layer feeds what arrived (`handle_*`), asks
//! what to send next (`poll_transmit`), and performs the reads and writes the session
//! asks for. No sockets, no clocks, no file handles: the tests drive both ends in memory.
//!
//! ```text
//! agent (SendSession)                      receiver (ReceiveSession)
//!   Offer{path,size,mtime,hash,chunk} ──►  validate; look up stored file / partial
//!                                     ◄──  Ack{already_stored}   (same hash stored)
//!                                     ◄──  Resume{missing ranges}
//!   Chunk{i, codec, raw_len, hash}*   ──►  decompress, verify BLAKE3, write, record
//!   Commit{chunks_sent}               ──►  all chunks? fsync, verify whole file, publish
//!                                     ◄──  Ack{stored_path} | Reject{code, reason}
//! ```

mod receive;
mod send;

pub use receive::{
    Event, Lookup, OfferDecision, PartialState, ReceiveSession, StoredVersion, VerifiedChunk,
};
pub use send::{ChunkRead, Outcome, SendSession, SessionError};

use crate::protocol::{ErrorCode, Reject};

/// Shorthand for building a [`Reject`].
pub fn reject(code: ErrorCode, reason: impl Into<String>) -> Reject {
    Reject {
        code,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests;
