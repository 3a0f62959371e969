//! Builders for protocol values: the only place in the fuzz crate that writes a
//! message's, a partial's or a lookup's fields by name. When the protocol changes (the
//! offer's file hash becomes optional, the commit carries a hash, a message gains a
//! field), adapt these functions and the targets keep compiling and checking the same
//! properties.

use bytes::Bytes;
use skyferry_common::chunk::ChunkSet;
use skyferry_common::protocol::{
    Ack, Chunk, ChunkAck, ChunkRange, Codec, Commit, ErrorCode, Hash, Message, Offer, Reject,
    Resume,
};
use skyferry_common::session::{Lookup, PartialState};

/// An offer of `size` bytes in chunks of `chunk_size`, whose content hash is `hash`.
pub fn offer(path: String, size: u64, mtime_ns: i64, hash: Hash, chunk_size: u32) -> Offer {
    Offer {
        path,
        size,
        mtime_ns,
        file_hash: hash,
        chunk_size,
    }
}

/// The hash the receiver must have published under the offer's path for the offer to
/// count as already stored.
pub fn stored_hash_of(offer: &Offer) -> Hash {
    offer.file_hash
}

/// A published hash that is not the offered one (the file changed at the source).
pub fn other_hash_than(offer: &Offer) -> Hash {
    let mut h = stored_hash_of(offer);
    h[0] ^= 1;
    h
}

/// The partial file the receiver would hold for exactly this offer.
pub fn partial_of(offer: &Offer, have: ChunkSet) -> PartialState {
    PartialState {
        size: offer.size,
        mtime_ns: offer.mtime_ns,
        file_hash: offer.file_hash,
        chunk_size: offer.chunk_size,
        have,
    }
}

/// A partial of another version of the file: `which` picks what differs.
pub fn partial_of_other_version(offer: &Offer, have: ChunkSet, which: u8) -> PartialState {
    let mut p = partial_of(offer, have);
    match which % 5 {
        0 => p.size ^= 1,
        1 => p.mtime_ns = p.mtime_ns.wrapping_add(1),
        2 => p.file_hash[31] ^= 0x80,
        3 => p.chunk_size ^= 1,
        // A bitmap made for another layout.
        _ => p.have = ChunkSet::new(p.have.count().wrapping_add(1)),
    }
    p
}

/// What storage found for an offered path.
// The update is a no-op today; it keeps this compiling when `Lookup` gains a field.
#[allow(clippy::needless_update)]
pub fn lookup(stored: Option<Hash>, partial: Option<PartialState>, room: Option<u64>) -> Lookup {
    Lookup {
        stored,
        partial,
        room,
        ..Lookup::default()
    }
}

pub fn chunk(
    index: u32,
    codec: Codec,
    raw_len: u32,
    chunk_hash: Hash,
    payload: Vec<u8>,
) -> Message {
    Message::Chunk(Chunk {
        index,
        codec,
        raw_len,
        chunk_hash,
        payload: Bytes::from(payload),
    })
}

pub fn resume(missing: Vec<ChunkRange>) -> Message {
    Message::Resume(Resume { missing })
}

pub fn chunk_ack(index: u32) -> Message {
    Message::ChunkAck(ChunkAck { index })
}

pub fn commit(chunks_sent: u32) -> Message {
    Message::Commit(Commit { chunks_sent })
}

pub fn ack(stored_path: String, already_stored: bool) -> Message {
    Message::Ack(Ack {
        stored_path,
        already_stored,
    })
}

pub fn reject(code: u16, reason: String) -> Message {
    Message::Reject(Reject {
        code: ErrorCode::from_u16(code),
        reason,
    })
}
