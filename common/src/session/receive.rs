//! The receiver's side of a file session.

use std::collections::VecDeque;

use crate::buf::AlignedBuf;
use crate::chunk::{ChunkLayout, ChunkSet};
use crate::compress;
use crate::protocol::{
    short_hex, Ack, Chunk, ChunkAck, ChunkRange, Commit, ErrorCode, Hash, Message, Offer, Reject,
    Resume, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
use crate::relpath::RelPath;

use super::reject;

/// What the receiver durably knows about a partially received file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialState {
    pub size: u64,
    pub mtime_ns: i64,
    /// The file hash of the offer the partial was started for, if it carried one.
    pub file_hash: Option<Hash>,
    pub chunk_size: u32,
    pub have: ChunkSet,
}

impl PartialState {
    /// Whether this partial belongs to the version being offered. A different size,
    /// mtime, chunk size or (when both are known) hash means the source changed: the
    /// partial is useless. Chunks of a same-size, same-mtime but different content would
    /// still be caught at the commit: the hash derived from them would not be the
    /// agent's.
    pub fn matches(&self, offer: &Offer) -> bool {
        let same_hash = match (self.file_hash, offer.file_hash) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        self.size == offer.size
            && self.mtime_ns == offer.mtime_ns
            && same_hash
            && self.chunk_size == offer.chunk_size
            && self.have.count() == ChunkLayout::new(offer.size, offer.chunk_size).count()
    }
}

/// The file published at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredVersion {
    pub size: u64,
    pub hash: Hash,
}

/// What storage found for the offered path, looked up by the I/O layer.
#[derive(Debug, Default, Clone)]
pub struct Lookup {
    /// The file currently published at the path, if any.
    pub stored: Option<StoredVersion>,
    /// The partial file for the path, if any.
    pub partial: Option<PartialState>,
    /// Bytes a new file may still use on the storage filesystem (free space minus the
    /// receiver's reserve), `None` when unknown. A file whose missing bytes exceed it is
    /// refused on its own with `storage_full`, before anything is written or sent.
    pub room: Option<u64>,
}

/// What the I/O layer must do after an offer was looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferDecision {
    /// The same content is already published: acknowledged without rewriting.
    AlreadyStored,
    /// A file of this path and size is published and the offer carried no hash: the
    /// session queued `NeedHash`; the agent's `FileHash` brings the decision.
    NeedHash,
    /// Receive into the partial; `discard_partial` when an existing partial belongs to
    /// another version and must be deleted first.
    Receive { discard_partial: bool },
    /// The file cannot fit: the session queued a `storage_full` rejection (and no
    /// `Resume`). `discard_partial` as above: a partial of another version is useless.
    Refused { discard_partial: bool },
}

/// A chunk that passed verification: its bytes are in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedChunk {
    pub index: u32,
    pub offset: u64,
    /// The chunk's BLAKE3 value, as checked: recorded with the chunk.
    pub value: Hash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitOffer,
    AwaitLookup,
    AwaitHash,
    Receiving,
    Publishing,
    Done,
}

/// The receiving end of one file stream.
#[derive(Debug)]
pub struct ReceiveSession {
    state: State,
    max_file_size: u64,
    offer: Option<(Offer, RelPath)>,
    layout: ChunkLayout,
    have: ChunkSet,
    /// Chunks received on this stream (for the resume accounting in logs/metrics).
    received: u32,
    /// The lookup kept while waiting for the agent's `FileHash`.
    lookup: Option<Lookup>,
    /// The file hash the agent committed to.
    committed: Option<Hash>,
    decoder: compress::Decoder,
    out: VecDeque<Message>,
}

impl ReceiveSession {
    pub fn new(max_file_size: u64) -> Self {
        ReceiveSession {
            state: State::AwaitOffer,
            max_file_size,
            offer: None,
            layout: ChunkLayout::new(0, MIN_CHUNK_SIZE),
            have: ChunkSet::new(0),
            received: 0,
            lookup: None,
            committed: None,
            decoder: compress::Decoder::default(),
            out: VecDeque::new(),
        }
    }

    pub fn offer(&self) -> Option<&Offer> {
        self.offer.as_ref().map(|(o, _)| o)
    }

    pub fn path(&self) -> Option<&RelPath> {
        self.offer.as_ref().map(|(_, p)| p)
    }

    pub fn have(&self) -> &ChunkSet {
        &self.have
    }

    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    pub fn chunks_received(&self) -> u32 {
        self.received
    }

    /// The whole-file BLAKE3 the agent committed to: the stored bytes must hash to it.
    pub fn committed_hash(&self) -> Option<Hash> {
        self.committed
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.out.pop_front()
    }

    /// Ends the session with a rejection (also used by the I/O layer for storage errors).
    ///
    /// A session gives one verdict: once it has ended (acknowledged or rejected) this
    /// sends nothing, so a late failure cannot put a second verdict behind the first.
    pub fn fail(&mut self, r: Reject) {
        if self.state == State::Done {
            return;
        }
        self.state = State::Done;
        self.out.push_back(Message::Reject(r));
    }

    /// Ends the session with a rejection in place of anything queued and not sent yet
    /// (the I/O layer could not open storage after the session decided to receive).
    /// Like [`fail`](ReceiveSession::fail), it leaves an ended session's verdict alone.
    pub fn fail_instead(&mut self, r: Reject) {
        if self.state == State::Done {
            return;
        }
        self.out.clear();
        self.fail(r);
    }

    fn protocol_error(&mut self, what: String) -> Reject {
        let r = reject(ErrorCode::Protocol, what);
        self.fail(r.clone());
        r
    }

    /// Any message arriving on the file stream. Returns the validated path after an
    /// offer (the caller then looks it up and calls [`handle_lookup`]), and the verified
    /// chunk after a chunk (its bytes are in `buf`; the caller writes them and calls
    /// [`handle_chunk_stored`]). A message after the session ended is refused, and
    /// nothing is sent for it.
    ///
    /// [`handle_lookup`]: ReceiveSession::handle_lookup
    /// [`handle_chunk_stored`]: ReceiveSession::handle_chunk_stored
    pub fn handle(&mut self, msg: Message, buf: &mut AlignedBuf) -> Result<Event, Reject> {
        match msg {
            Message::Offer(o) if self.state == State::AwaitOffer => {
                self.handle_offer(o).map(|()| Event::Offered)
            }
            Message::FileHash(h) if self.state == State::AwaitHash => {
                if let Some((offer, _)) = &mut self.offer {
                    offer.file_hash = Some(h);
                }
                let lookup = self.lookup.take().unwrap_or_default();
                self.state = State::AwaitLookup;
                Ok(Event::Decided(self.handle_lookup(lookup)))
            }
            Message::Chunk(c) if self.state == State::Receiving => {
                self.handle_chunk(c, buf).map(Event::Chunk)
            }
            Message::Commit(c) if self.state == State::Receiving => {
                self.handle_commit(c).map(|()| Event::Commit)
            }
            other => Err(self.protocol_error(format!(
                "unexpected {} frame on a file stream",
                other.kind()
            ))),
        }
    }

    fn handle_offer(&mut self, offer: Offer) -> Result<(), Reject> {
        let path = match RelPath::parse(&offer.path) {
            Ok(p) => p,
            Err(e) => {
                let r = reject(ErrorCode::BadPath, e.to_string());
                self.fail(r.clone());
                return Err(r);
            }
        };
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&offer.chunk_size)
            || !offer.chunk_size.is_power_of_two()
        {
            return Err(self.protocol_error(format!(
                "chunk size {} is not a power of two within {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                offer.chunk_size
            )));
        }
        if offer.size > self.max_file_size {
            let r = reject(
                ErrorCode::TooLarge,
                format!(
                    "{path}: {} bytes exceeds the receiver's limit of {} bytes",
                    offer.size, self.max_file_size
                ),
            );
            self.fail(r.clone());
            return Err(r);
        }
        let layout = ChunkLayout::new(offer.size, offer.chunk_size);
        if !layout.fits_u32() {
            return Err(self.protocol_error(format!("{path}: too many chunks")));
        }
        self.layout = layout;
        self.have = ChunkSet::new(layout.count());
        self.offer = Some((offer, path));
        self.state = State::AwaitLookup;
        Ok(())
    }

    /// Decides what to do with the offer given what storage holds.
    pub fn handle_lookup(&mut self, lookup: Lookup) -> OfferDecision {
        let Some((offer, path)) = &self.offer else {
            // Only reachable through a caller bug; answer instead of panicking.
            self.fail(reject(ErrorCode::Protocol, "lookup before offer"));
            return OfferDecision::Receive {
                discard_partial: false,
            };
        };
        if let Some(stored) = lookup.stored.filter(|s| s.size == offer.size) {
            match offer.file_hash {
                Some(h) if h == stored.hash => {
                    self.out.push_back(Message::Ack(Ack {
                        stored_path: path.to_string(),
                        already_stored: true,
                    }));
                    self.state = State::Done;
                    return OfferDecision::AlreadyStored;
                }
                Some(_) => {}
                // Only here does the agent have to hash the file before sending it: it
                // may be the very file stored (a lost acknowledgement, a replay).
                None => {
                    self.out.push_back(Message::NeedHash);
                    self.lookup = Some(lookup);
                    self.state = State::AwaitHash;
                    return OfferDecision::NeedHash;
                }
            }
        }
        let discard_partial = match lookup.partial {
            Some(p) if p.matches(offer) => {
                self.have = p.have;
                false
            }
            Some(_) => true,
            None => false,
        };
        let needed = self.have.missing_bytes(&self.layout);
        if let Some(room) = lookup.room.filter(|&room| room < needed) {
            let r = reject(
                ErrorCode::StorageFull,
                format!(
                    "storage full for this file: {path:?} needs {needed} more bytes, the receiver has room for {room}"
                ),
            );
            self.fail(r);
            return OfferDecision::Refused { discard_partial };
        }
        self.out.push_back(Message::Resume(Resume {
            missing: coalesce(self.have.missing(), MAX_RESUME_RANGES),
        }));
        self.state = State::Receiving;
        OfferDecision::Receive { discard_partial }
    }

    /// Decompresses and verifies one chunk into `buf`. Checks, in order: index in range,
    /// raw length equal to the layout's, decompression bounded by that length, the
    /// chunk's BLAKE3 value at its index ([`crate::chunk::chunk_value`]) equal to the
    /// chunk hash. The value binds the offset: bytes sent under another index fail.
    fn handle_chunk(&mut self, c: Chunk, buf: &mut AlignedBuf) -> Result<VerifiedChunk, Reject> {
        let path = self.path().map(ToString::to_string).unwrap_or_default();
        let count = self.layout.count();
        let Some(expected_len) = self.layout.len(c.index) else {
            return Err(self.protocol_error(format!(
                "{path}: chunk {} is out of range (file has {count} chunks)",
                c.index
            )));
        };
        if c.raw_len != expected_len {
            return Err(self.protocol_error(format!(
                "{path}: chunk {} claims {} bytes, the layout says {expected_len}",
                c.index, c.raw_len
            )));
        }
        if let Err(e) = self.decoder.decode(c.codec, &c.payload, c.raw_len, buf) {
            let r = reject(
                ErrorCode::ChunkMismatch,
                format!("{path}: chunk {}: {e}", c.index),
            );
            self.fail(r.clone());
            return Err(r);
        }
        let actual = crate::chunk::chunk_value(&self.layout, c.index, buf);
        if actual != c.chunk_hash {
            let r = reject(
                ErrorCode::ChunkMismatch,
                format!(
                    "{path}: chunk {}: checksum mismatch (expected {}, got {})",
                    c.index,
                    short_hex(&c.chunk_hash),
                    short_hex(&actual)
                ),
            );
            self.fail(r.clone());
            return Err(r);
        }
        self.received += 1;
        Ok(VerifiedChunk {
            index: c.index,
            offset: self.layout.offset(c.index),
            value: actual,
        })
    }

    /// The chunk's bytes are written to the partial file and recorded: acknowledge it
    /// (unless the session ended meanwhile: nothing follows its verdict).
    pub fn handle_chunk_stored(&mut self, index: u32) {
        if self.state == State::Done {
            return;
        }
        self.have.insert(index);
        self.out.push_back(Message::ChunkAck(ChunkAck { index }));
    }

    fn handle_commit(&mut self, c: Commit) -> Result<(), Reject> {
        let missing = self.layout.count() - self.have.present();
        if missing > 0 {
            let path = self.path().map(ToString::to_string).unwrap_or_default();
            return Err(self.protocol_error(format!(
                "{path}: commit with {missing} chunk(s) still missing (agent sent {})",
                c.chunks_sent
            )));
        }
        if let Some(offered) = self.offer().and_then(|o| o.file_hash) {
            if offered != c.file_hash {
                let path = self.path().map(ToString::to_string).unwrap_or_default();
                let r = reject(
                    ErrorCode::HashMismatch,
                    format!(
                        "{path}: committed file hash {} differs from the offered {}; the source changed while it was sent",
                        short_hex(&c.file_hash),
                        short_hex(&offered)
                    ),
                );
                self.fail(r.clone());
                return Err(r);
            }
        }
        self.committed = Some(c.file_hash);
        self.state = State::Publishing;
        Ok(())
    }

    /// The outcome of verifying the stored bytes and publishing them. If the session
    /// ended meanwhile (the agent broke the protocol during the publish), its verdict
    /// stands and nothing more is sent.
    pub fn handle_published(&mut self, result: Result<String, Reject>) {
        if self.state == State::Done {
            return;
        }
        match result {
            Ok(stored_path) => {
                self.state = State::Done;
                self.out.push_back(Message::Ack(Ack {
                    stored_path,
                    already_stored: false,
                }));
            }
            Err(r) => self.fail(r),
        }
    }

    /// Missing ranges, for logs.
    pub fn missing(&self) -> Vec<ChunkRange> {
        self.have.missing()
    }
}

/// Most ranges sent in one resume, so that it fits in a control-sized frame (9 bytes
/// per range in 64 KiB, with room to spare).
pub const MAX_RESUME_RANGES: usize = 4096;

/// Merges the closest neighbouring ranges until at most `max` remain. The merged gaps are
/// chunks the receiver already has; receiving them again is harmless (they are verified
/// and rewritten with the same bytes).
fn coalesce(mut ranges: Vec<ChunkRange>, max: usize) -> Vec<ChunkRange> {
    while ranges.len() > max.max(1) {
        let mut merged = Vec::with_capacity(ranges.len() / 2 + 1);
        for pair in ranges.chunks(2) {
            match pair {
                [a, b] => merged.push(ChunkRange {
                    start: a.start,
                    end: b.end,
                }),
                [a] => merged.push(*a),
                _ => {}
            }
        }
        ranges = merged;
    }
    ranges
}

/// What an incoming message meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// An offer passed validation: look up storage and call `handle_lookup`.
    Offered,
    /// The agent's `FileHash` arrived: act on this decision as on `handle_lookup`'s
    /// (never `NeedHash` again).
    Decided(OfferDecision),
    /// A chunk passed verification: write it and call `handle_chunk_stored`.
    Chunk(VerifiedChunk),
    /// All chunks are held: verify the whole file, publish, call `handle_published`.
    Commit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_bounds_the_range_count_and_covers_every_missing_chunk() {
        // Every other chunk missing: 5000 ranges.
        let ranges: Vec<ChunkRange> = (0..5000)
            .map(|i| ChunkRange {
                start: 2 * i,
                end: 2 * i + 1,
            })
            .collect();
        let merged = coalesce(ranges.clone(), MAX_RESUME_RANGES);
        assert!(merged.len() <= MAX_RESUME_RANGES);
        for r in &ranges {
            assert!(merged.iter().any(|m| m.start <= r.start && r.end <= m.end));
        }
        assert_eq!(
            coalesce(ranges[..10].to_vec(), MAX_RESUME_RANGES),
            ranges[..10].to_vec()
        );
    }
}
