//! Builders for protocol values: the only place in the fuzz crate that writes a
//! message's, a partial's or a lookup's fields by name. When the protocol changes (as in
//! protocol 2: the offer's file hash became optional, the commit carries one, a lookup
//! reports the stored file's size and hash), adapt these functions and the targets keep
//! compiling and checking the same properties.

use bytes::Bytes;
use skyferry_common::chunk::ChunkSet;
use skyferry_common::protocol::{
    Ack, Chunk, ChunkAck, ChunkRange, Codec, Commit, ErrorCode, Hash, Message, Offer, Reject,
    Resume,
};
use skyferry_common::session::{Lookup, PartialState, StoredVersion};

/// An offer of `size` bytes in chunks of `chunk_size`, with the content hash `hash` when
/// the agent knows it (protocol 2: a new file is offered without one).
pub fn offer(path: String, size: u64, mtime_ns: i64, hash: Option<Hash>, chunk_size: u32) -> Offer {
    Offer {
        path,
        size,
        mtime_ns,
        file_hash: hash,
        chunk_size,
    }
}

/// The offer's file hash, if it carried one.
pub fn offered_hash(offer: &Offer) -> Option<Hash> {
    offer.file_hash
}

/// A hash that is not `h` (the file changed at the source).
pub fn other_hash_than(h: Hash) -> Hash {
    let mut h = h;
    h[0] ^= 1;
    h
}

/// The file published at a path.
pub fn stored(size: u64, hash: Hash) -> StoredVersion {
    StoredVersion { size, hash }
}

/// Size and hash of a published file, as the harness reads them back.
pub fn stored_parts(s: &StoredVersion) -> (u64, Hash) {
    (s.size, s.hash)
}

/// The partial file the receiver would hold for exactly this offer; `hash_known` says
/// whether the offer it was started for carried the file hash (a partial started
/// without one still belongs to a later offer of the same version with one).
pub fn partial_of(offer: &Offer, have: ChunkSet, hash_known: bool) -> PartialState {
    PartialState {
        size: offer.size,
        mtime_ns: offer.mtime_ns,
        file_hash: offer.file_hash.filter(|_| hash_known),
        chunk_size: offer.chunk_size,
        have,
    }
}

/// A partial of another version of the file: `which` picks what differs. (A different
/// hash tells versions apart only once the offer carries one too.)
pub fn partial_of_other_version(offer: &Offer, have: ChunkSet, which: u8) -> PartialState {
    let mut p = partial_of(offer, have, true);
    match which % 5 {
        0 => p.size ^= 1,
        1 => p.mtime_ns = p.mtime_ns.wrapping_add(1),
        2 => p.file_hash = Some(other_hash_than(offer.file_hash.unwrap_or([0x5a; 32]))),
        3 => p.chunk_size ^= 1,
        // A bitmap made for another layout.
        _ => p.have = ChunkSet::new(p.have.count().wrapping_add(1)),
    }
    p
}

/// What storage found for an offered path.
// The update is a no-op today; it keeps this compiling when `Lookup` gains a field.
#[allow(clippy::needless_update)]
pub fn lookup(
    stored: Option<StoredVersion>,
    partial: Option<PartialState>,
    room: Option<u64>,
) -> Lookup {
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

pub fn commit(chunks_sent: u32, file_hash: Hash) -> Message {
    Message::Commit(Commit {
        chunks_sent,
        file_hash,
    })
}

/// The commit's fields: chunk count and whole-file hash.
pub fn commit_parts(c: &Commit) -> (u32, Hash) {
    (c.chunks_sent, c.file_hash)
}

/// Receiver → agent: a file of this path and size is stored, send the file hash.
pub fn need_hash() -> Message {
    Message::NeedHash
}

/// Agent → receiver: the whole file's BLAKE3, answering `NeedHash`.
pub fn file_hash(hash: Hash) -> Message {
    Message::FileHash(hash)
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
