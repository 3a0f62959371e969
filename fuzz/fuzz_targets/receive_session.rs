//! Fuzz target: the receiver's file session (`ReceiveSession`) against a hostile agent.
//!
//! The fuzz input is a script. The agent's side is free: offers (good, bad, at the size
//! and path limits, with or without a file hash), `FileHash` answers (the stored hash,
//! another, any), chunks (valid, or with one flaw: wrong value, the value of another
//! index, a protocol-1 plain hash, a lying length, a truncated or bit-flipped payload, a
//! zstd frame that inflates past `raw_len`, two zstd frames), commits (with the derived,
//! the offered or any file hash), stray messages, and raw frame bodies through the
//! decoder, in any order and also after the session has ended. Every message crosses
//! the real codec with the limit the receiver's reader applies at that point. The I/O
//! layer is played the way `receiver/src/session.rs` does it (look up after an offer,
//! read the agent's `FileHash` after a `NeedHash`, store after a verified chunk,
//! publish after a commit, the publish deriving the file hash from the recorded chunk
//! values), with fuzz-chosen outcomes: what storage holds (a published file of this or
//! another size and hash, a partial of this or another version, room), a busy path,
//! failing writes, a failing publish.
//!
//! Checked after every step, against a small model:
//! - no panic, and `handle` accepts exactly what it must (a valid offer first, a
//!   `FileHash` only after `NeedHash`, chunks whose bytes give their value at their
//!   index, a commit once every chunk is held whose hash is the offered one if there
//!   was one) and refuses the rest with a fitting code;
//! - an accepted path is relative and has no `.`/`..`/empty component, NUL, backslash
//!   or control character;
//! - the lookup's decision: `AlreadyStored` exactly for a published file of the same
//!   size and hash, `NeedHash` (and one `NeedHash` sent) for one of the same size when
//!   the offer had no hash, and after `FileHash` the decision the offer would have got
//!   with that hash, never `NeedHash` again;
//! - a verified chunk's bytes have its length and value; a value binds the index (the
//!   same bytes under another index of a multi-chunk file are refused); the values of
//!   a small file's chunks merge into the BLAKE3 of its bytes; a chunk is acknowledged
//!   only after it was stored, with its own index, which is in range;
//! - `committed_hash()` is the accepted commit's hash, and nothing before;
//! - `Resume` is sent at most once, only after a lookup that found no stored copy and
//!   enough room; its ranges are ascending, disjoint, within the file, cover every
//!   missing chunk, name only missing chunks unless there are too many ranges to send
//!   (then they are coalesced), and fit in a control frame;
//! - exactly one verdict (`Ack` or `Reject`) ends a session, and nothing follows it.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::{Result, Unstructured};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use skyferry_common::buf::AlignedBuf;
use skyferry_common::chunk::{chunk_value, hash_bytes, ChunkLayout, ChunkSet, TreeHasher};
use skyferry_common::protocol::{
    decode_body, max_data_frame, ChunkRange, Codec, ErrorCode, Hash, Message, Offer,
    MAX_CHUNK_SIZE, MAX_CONTROL_FRAME, MAX_PATH_LEN, MIN_CHUNK_SIZE,
};
use skyferry_common::relpath::RelPath;
use skyferry_common::session::{
    reject, Event, OfferDecision, PartialState, ReceiveSession, VerifiedChunk,
};
use skyferry_fuzz::{build, shape, wire};

/// Most agent messages per input, to bound the time of one run.
const MAX_OPS: usize = 64;

/// Up to this many missing ranges a resume must name exactly the missing chunks; above
/// it the receiver may coalesce ranges to fit a frame.
const EXACT_RESUME_RANGES: usize = 1000;

/// Files up to this size keep their chunks' bytes in the model, so that the merged chunk
/// values can be compared with the BLAKE3 of the whole file.
const SMALL_FILE: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    // Running out of input ends the script; that is not a failure.
    let _ = run(&mut u);
});

fn run(u: &mut Unstructured) -> Result<()> {
    let mut h = Harness::new(shape::max_file_size(u)?);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let (msg, built) = match u.int_in_range(0u8..=8)? {
            0 => {
                let body: &[u8] = u.arbitrary()?;
                match decode_body(Bytes::copy_from_slice(body)) {
                    Ok(m) => (m, Built::Unknown),
                    Err(e) => {
                        h.reader_error(&e.to_string());
                        continue;
                    }
                }
            }
            1 | 2 => (Message::Offer(offer(u)?), Built::Unknown),
            3..=5 => h.chunk(u)?,
            6 => (
                build::commit(u.arbitrary()?, h.commit_hash(u)?),
                Built::Unknown,
            ),
            7 => (build::file_hash(h.answer_hash(u)?), Built::Unknown),
            _ => (stray(u)?, Built::Unknown),
        };
        h.deliver(msg, built, u)?;
    }
    Ok(())
}

fn offer(u: &mut Unstructured) -> Result<Offer> {
    let path = shape::path(u)?;
    let chunk_size = shape::offered_chunk_size(u)?;
    let size = shape::file_size(u, chunk_size)?;
    // Most new files are offered without a hash (protocol 2, §12).
    let hash = if u.arbitrary()? {
        None
    } else {
        Some(u.arbitrary()?)
    };
    Ok(build::offer(path, size, u.arbitrary()?, hash, chunk_size))
}

/// Messages only a receiver sends.
fn stray(u: &mut Unstructured) -> Result<Message> {
    Ok(match u.int_in_range(0u8..=4)? {
        0 => build::ack(shape::path(u)?, u.arbitrary()?),
        4 => build::need_hash(),
        1 => {
            let start: u32 = u.arbitrary()?;
            let end = start.saturating_add(1);
            build::resume(vec![ChunkRange { start, end }])
        }
        2 => build::chunk_ack(u.arbitrary()?),
        _ => build::reject(u.arbitrary()?, u.arbitrary()?),
    })
}

/// An independent statement of what a safe relative path is (the receiver's parser
/// may be stricter, never looser).
fn path_is_safe(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_PATH_LEN
        && !p.starts_with('/')
        && !p.contains(['\0', '\\'])
        && !p.chars().any(char::is_control)
        && p.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= 255)
}

/// A partial's version matches the offer's (protocol §8): same size, mtime, chunk size,
/// a chunk set for this layout, and the same file hash when both know one.
fn partial_matches(p: &PartialState, o: &Offer) -> bool {
    let same_hash = match (p.file_hash, o.file_hash) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    p.size == o.size
        && p.mtime_ns == o.mtime_ns
        && p.chunk_size == o.chunk_size
        && same_hash
        && p.have.count() == ChunkLayout::new(o.size, o.chunk_size).count()
}

/// The file hash merged from chunk values, given for every chunk in index order.
fn merged(layout: &ChunkLayout, values: &BTreeMap<u32, Hash>) -> Option<Hash> {
    if values.len() as u64 != u64::from(layout.count()) {
        return None;
    }
    let mut tree = TreeHasher::new(layout);
    values.values().for_each(|v| tree.push(*v));
    tree.finalize()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitOffer,
    /// `NeedHash` was sent; the agent's `FileHash` decides.
    AwaitHash,
    Receiving,
    /// The commit was accepted and the I/O layer is publishing the file.
    Publishing,
    Done,
}

/// What the harness knows about a chunk it built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Built {
    /// Anything else (also chunks with a flaw whose fate the predictor works out).
    Unknown,
    /// Correct bytes, length and value for the accepted offer.
    Valid,
    /// Correct bytes and length, but the value of another index or the plain BLAKE3 of
    /// the bytes (protocol 1), in a file of more than one chunk: must be refused.
    WrongValue,
}

/// What storage found for the offered path, kept while the agent hashes its source.
#[derive(Debug, Clone)]
struct Found {
    /// Size and hash of the published file.
    stored: Option<(u64, Hash)>,
    /// The partial, with the chunks the model says it holds.
    partial: Option<(PartialState, BTreeSet<u32>)>,
    room: Option<u64>,
}

/// What `handle` must do with a message.
#[derive(Debug)]
enum Expect {
    Accept,
    /// Refuse it with one of these codes.
    Refuse(Vec<ErrorCode>),
    /// Either is allowed (e.g. a hand-made zstd payload whose fate depends on the
    /// decoder's frame rules); a refusal uses one of these codes.
    Either(Vec<ErrorCode>),
}

struct Harness {
    session: ReceiveSession,
    max_file_size: u64,
    buf: AlignedBuf,
    /// The reader's frame limit: control-sized until the session receives chunks.
    reader_max: usize,
    phase: Phase,
    /// The accepted offer and its layout.
    offer: Option<(Offer, ChunkLayout)>,
    /// Chunks the receiver holds for the offer: the partial's, then those stored.
    have: BTreeSet<u32>,
    /// The values of the chunks stored on this stream, and (small files) their bytes.
    values: BTreeMap<u32, Hash>,
    bytes: BTreeMap<u32, Vec<u8>>,
    verified: u32,
    /// The lookup, while waiting for `FileHash`.
    found: Option<Found>,
    /// The hash of the accepted commit.
    committed: Option<Hash>,
}

impl Harness {
    fn new(max_file_size: u64) -> Self {
        Harness {
            session: ReceiveSession::new(max_file_size),
            max_file_size,
            buf: AlignedBuf::new(),
            reader_max: MAX_CONTROL_FRAME,
            phase: Phase::AwaitOffer,
            offer: None,
            have: BTreeSet::new(),
            values: BTreeMap::new(),
            bytes: BTreeMap::new(),
            verified: 0,
            found: None,
            committed: None,
        }
    }

    /// A `FileHash` as the agent may send it: the published file's hash (same content),
    /// another, or any.
    fn answer_hash(&self, u: &mut Unstructured) -> Result<Hash> {
        let stored = self.found.as_ref().and_then(|f| f.stored).map(|(_, h)| h);
        Ok(match (u.int_in_range(0u8..=3)?, stored) {
            (0 | 1, Some(h)) => h,
            (2, Some(h)) => build::other_hash_than(h),
            _ => u.arbitrary()?,
        })
    }

    /// A commit's file hash: the one merged from the values stored (what an honest agent
    /// derives when every chunk went over this stream), the offered one, or any.
    fn commit_hash(&self, u: &mut Unstructured) -> Result<Hash> {
        let derived = self
            .offer
            .as_ref()
            .and_then(|(_, l)| merged(l, &self.values));
        let offered = self
            .offer
            .as_ref()
            .and_then(|(o, _)| build::offered_hash(o));
        Ok(match (u.int_in_range(0u8..=4)?, derived, offered) {
            (0 | 1, Some(h), _) => h,
            (2, _, Some(h)) => h,
            (3, Some(h), _) => build::other_hash_than(h),
            _ => u.arbitrary()?,
        })
    }

    fn count(&self) -> u32 {
        self.offer.as_ref().map_or(0, |(_, l)| l.count())
    }

    /// Everything the session queued, checked against the one-verdict rule.
    fn drain(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(m) = self.session.poll_transmit() {
            out.push(m);
        }
        out
    }

    /// The session's output must be exactly one rejection with one of `codes`.
    fn expect_rejection(&mut self, codes: &[ErrorCode], why: &str) {
        let out = self.drain();
        match out.as_slice() {
            [Message::Reject(r)] => assert!(
                codes.is_empty() || codes.contains(&r.code),
                "{why}: rejected with {} ({:?}), expected one of {codes:?}",
                r.code,
                r.reason
            ),
            other => panic!("{why}: expected one rejection, the session sent {other:?}"),
        }
        self.phase = Phase::Done;
        self.check_state();
    }

    fn expect_nothing(&mut self, why: &str) {
        let out = self.drain();
        assert!(out.is_empty(), "{why}: the session sent {out:?}");
        self.check_state();
    }

    fn check_state(&self) {
        assert_eq!(
            self.session.is_done(),
            self.phase == Phase::Done,
            "is_done() disagrees with the verdicts sent (phase {:?})",
            self.phase
        );
        if self.phase == Phase::Receiving {
            let have = self.session.have();
            assert_eq!(
                have.count(),
                self.count(),
                "chunk set sized for another layout"
            );
            assert_eq!(
                have.present() as usize,
                self.have.len(),
                "chunk set holds other chunks than were stored"
            );
            assert_eq!(self.session.chunks_received(), self.verified);
        }
        assert_eq!(
            self.session.committed_hash(),
            self.committed,
            "committed_hash() in phase {:?}",
            self.phase
        );
    }

    /// The reader refused a frame: the receiver rejects the file as a protocol error.
    /// (Once the session ended the receiver reads nothing more.)
    fn reader_error(&mut self, e: &str) {
        if self.phase == Phase::Done {
            return;
        }
        self.session.fail(reject(ErrorCode::Protocol, e));
        self.expect_rejection(&[ErrorCode::Protocol], "after a bad frame");
    }

    /// A chunk for the accepted offer (or for a guess at one), valid or with one flaw,
    /// and what is known about it.
    fn chunk(&self, u: &mut Unstructured) -> Result<(Message, Built)> {
        let layout = match &self.offer {
            Some((_, l)) => *l,
            None => ChunkLayout::new(u.int_in_range(0u64..=1 << 20)?, MIN_CHUNK_SIZE),
        };
        let count = layout.count();
        let index = match u.int_in_range(0u8..=5)? {
            0..=2 => (0..count).find(|i| !self.have.contains(i)).unwrap_or(0),
            3 => u.int_in_range(0..=count.saturating_sub(1))?,
            4 => count,
            _ => u.arbitrary()?,
        };
        let in_range = layout.len(index);
        let len = match in_range {
            Some(n) => n as usize,
            None => u.int_in_range(0usize..=64)?,
        };
        let raw = shape::content(len, u.arbitrary()?);
        // `chunk_value` is defined for a chunk's bytes only, never empty in a file of
        // several chunks; a made-up empty chunk out of range gets the plain hash.
        let value = |at: u32, data: &[u8]| {
            if data.is_empty() {
                hash_bytes(data)
            } else {
                chunk_value(&layout, at, data)
            }
        };
        let mut hash = value(index, &raw);
        let mut raw_len = len as u32;
        let zstd: bool = u.arbitrary()?;
        let compress = |data: &[u8]| zstd::bulk::compress(data, 1).unwrap_or_default();
        let (codec, mut payload) = if zstd {
            (Codec::Zstd, compress(&raw))
        } else {
            (Codec::Raw, raw.clone())
        };
        let flaw = u.int_in_range(0u8..=17)?;
        match flaw {
            8 => hash[0] ^= 1,
            9 => raw_len = raw_len.wrapping_add(1),
            // A consistent lie: one byte short, with the hash of what was sent.
            10 if len > 0 => {
                let short = &raw[..len - 1];
                raw_len -= 1;
                hash = value(index, short);
                payload = if zstd {
                    compress(short)
                } else {
                    short.to_vec()
                };
            }
            11 => {
                payload.pop();
            }
            12 => payload.push(u.arbitrary()?),
            13 if !payload.is_empty() => {
                let at = u.choose_index(payload.len())?;
                payload[at] ^= 1 << u.int_in_range(0..=7)?;
            }
            // Inflates past raw_len.
            14 => {
                let mut more = raw.clone();
                more.extend_from_slice(&[7; 100]);
                payload = if zstd { compress(&more) } else { more };
            }
            // The right bytes, as two zstd frames.
            15 if zstd && len > 1 => {
                let cut = u.int_in_range(1..=len - 1)?;
                payload = compress(&raw[..cut]);
                payload.extend_from_slice(&compress(&raw[cut..]));
            }
            // The right bytes with the value they have under a neighbouring index.
            16 => hash = value(index ^ 1, &raw),
            // The right bytes with their plain BLAKE3, as protocol 1 sent it.
            17 => hash = hash_bytes(&raw),
            _ => {}
        }
        let built = if in_range.is_none() || self.phase != Phase::Receiving {
            Built::Unknown
        } else if flaw < 8 || (flaw >= 16 && layout.count() == 1) {
            // A one-chunk file's value is its plain BLAKE3, whatever the index.
            Built::Valid
        } else if flaw >= 16 {
            Built::WrongValue
        } else {
            Built::Unknown
        };
        Ok((build::chunk(index, codec, raw_len, hash, payload), built))
    }

    fn predict(&self, msg: &Message, built: Built) -> Expect {
        let protocol = || Expect::Refuse(vec![ErrorCode::Protocol]);
        match (self.phase, msg) {
            (Phase::Done, _) => Expect::Refuse(Vec::new()),
            (Phase::AwaitOffer, Message::Offer(o)) => {
                let mut codes = Vec::new();
                if RelPath::parse(&o.path).is_err() {
                    codes.push(ErrorCode::BadPath);
                }
                if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&o.chunk_size)
                    || o.chunk_size.count_ones() != 1
                {
                    codes.push(ErrorCode::Protocol);
                }
                if o.size > self.max_file_size {
                    codes.push(ErrorCode::TooLarge);
                }
                let chunks = o.size.div_ceil(u64::from(o.chunk_size.max(1)));
                if chunks > u64::from(u32::MAX) {
                    codes.push(ErrorCode::Protocol);
                }
                if codes.is_empty() {
                    Expect::Accept
                } else {
                    Expect::Refuse(codes)
                }
            }
            (Phase::Receiving, Message::Chunk(c)) => {
                let Some((_, layout)) = &self.offer else {
                    return protocol();
                };
                if layout.len(c.index) != Some(c.raw_len) {
                    return protocol();
                }
                let mismatch = vec![ErrorCode::ChunkMismatch];
                match (built, c.codec) {
                    (Built::Valid, _) => Expect::Accept,
                    (Built::WrongValue, _) => Expect::Refuse(mismatch),
                    (Built::Unknown, Codec::Raw) => {
                        if c.payload.len() == c.raw_len as usize
                            && chunk_value(layout, c.index, &c.payload) == c.chunk_hash
                        {
                            Expect::Accept
                        } else {
                            Expect::Refuse(mismatch)
                        }
                    }
                    (Built::Unknown, Codec::Zstd | Codec::ZstdShuffle16) => Expect::Either(mismatch),
                }
            }
            (Phase::Receiving, Message::Commit(c)) => {
                if self.have.len() as u64 != u64::from(self.count()) {
                    return protocol();
                }
                let offered = self
                    .offer
                    .as_ref()
                    .and_then(|(o, _)| build::offered_hash(o));
                match offered {
                    Some(h) if h != build::commit_parts(c).1 => {
                        Expect::Refuse(vec![ErrorCode::HashMismatch])
                    }
                    _ => Expect::Accept,
                }
            }
            (Phase::AwaitHash, Message::FileHash(_)) => Expect::Accept,
            // Anything else, including message kinds this harness does not know.
            _ => protocol(),
        }
    }

    fn deliver(&mut self, msg: Message, built: Built, u: &mut Unstructured) -> Result<()> {
        let Some(arrived) = wire::transmit(&msg, self.reader_max) else {
            return Ok(()); // The agent could not have sent it.
        };
        let msg = match arrived {
            Ok(m) => m,
            Err(e) => {
                self.reader_error(&e.to_string());
                return Ok(());
            }
        };
        let expect = self.predict(&msg, built);
        let phase = self.phase;
        let result = self.session.handle(msg.clone(), &mut self.buf);
        match (result, &expect) {
            (Err(r), Expect::Refuse(codes) | Expect::Either(codes)) => {
                assert!(
                    codes.is_empty() || codes.contains(&r.code),
                    "{} refused with {} ({:?}), expected one of {codes:?}",
                    msg.kind(),
                    r.code,
                    r.reason
                );
                if phase == Phase::Done {
                    self.expect_nothing("a message after the verdict");
                } else {
                    let out = self.drain();
                    assert_eq!(
                        out,
                        [Message::Reject(r)],
                        "the refusal returned is not the one sent"
                    );
                    self.phase = Phase::Done;
                    self.check_state();
                }
            }
            (Err(r), Expect::Accept) => panic!(
                "a valid {} in phase {phase:?} was refused: {} {:?}",
                msg.kind(),
                r.code,
                r.reason
            ),
            (Ok(event), Expect::Refuse(_)) => {
                panic!("{msg:?} in phase {phase:?} was accepted as {event:?}, expected {expect:?}")
            }
            (Ok(Event::Offered), _) => {
                let Message::Offer(o) = msg else {
                    panic!("{} accepted as an offer", msg.kind())
                };
                self.on_offered(o, u)?;
            }
            (Ok(Event::Chunk(v)), _) => {
                let Message::Chunk(c) = &msg else {
                    panic!("{} accepted as a chunk", msg.kind())
                };
                self.on_chunk(v, c.index, c.chunk_hash, u)?;
            }
            (Ok(Event::Commit), _) => {
                let Message::Commit(c) = &msg else {
                    panic!("{} accepted as a commit", msg.kind())
                };
                self.committed = Some(build::commit_parts(c).1);
                self.on_commit(u)?;
            }
            (Ok(Event::Decided(d)), _) => {
                let Message::FileHash(h) = msg else {
                    panic!("{} accepted as a file hash", msg.kind())
                };
                self.on_file_hash(h, d, u)?;
            }
        }
        Ok(())
    }

    fn on_offered(&mut self, o: Offer, u: &mut Unstructured) -> Result<()> {
        assert_eq!(self.phase, Phase::AwaitOffer);
        assert!(
            path_is_safe(&o.path),
            "accepted the unsafe path {:?}",
            o.path
        );
        assert_eq!(self.session.offer(), Some(&o));
        assert_eq!(
            self.session.path().map(ToString::to_string).as_deref(),
            Some(o.path.as_str())
        );
        let layout = ChunkLayout::new(o.size, o.chunk_size);
        assert_eq!(self.session.layout(), layout);
        self.expect_nothing("before the lookup");
        let count = layout.count();
        self.offer = Some((o.clone(), layout));

        match u.int_in_range(0u8..=9)? {
            // Another stream is receiving this path.
            0 => {
                self.session.fail(reject(ErrorCode::Busy, "busy"));
                self.expect_rejection(&[ErrorCode::Busy], "a busy path");
                return Ok(());
            }
            // Storage could not look the path up.
            1 => {
                self.session
                    .fail(reject(ErrorCode::StorageError, "lookup failed"));
                self.expect_rejection(&[ErrorCode::StorageError], "a failed lookup");
                return Ok(());
            }
            _ => {}
        }

        let oh = build::offered_hash(&o);
        let stored = match u.int_in_range(0u8..=5)? {
            0 | 1 => None,
            // The same content, if the offer says what it is.
            2 => Some((o.size, oh.unwrap_or(u.arbitrary()?))),
            3 => Some((o.size, build::other_hash_than(oh.unwrap_or(u.arbitrary()?)))),
            // A published file of another size: never the same content.
            4 => Some((o.size ^ u.int_in_range(1u64..=u64::MAX)?, u.arbitrary()?)),
            _ => Some((o.size, u.arbitrary()?)),
        };
        let mut have = BTreeSet::new();
        let hash_known = u.arbitrary()?;
        let partial = match u.int_in_range(0u8..=4)? {
            0 | 1 => None,
            2 => {
                for _ in 0..u.int_in_range(0u8..=8)? {
                    if count > 0 {
                        have.insert(u.int_in_range(0..=count - 1)?);
                    }
                }
                let mut set = ChunkSet::new(count);
                have.iter().for_each(|&i| {
                    set.insert(i);
                });
                Some(build::partial_of(&o, set, hash_known))
            }
            // Every other chunk, or every chunk, of a file of few chunks: many ranges.
            3 if count <= 20_000 => {
                let step = if u.arbitrary()? { 2 } else { 1 };
                let mut set = ChunkSet::new(count);
                for i in (0..count).step_by(step) {
                    set.insert(i);
                    have.insert(i);
                }
                Some(build::partial_of(&o, set, hash_known))
            }
            _ => {
                let set = ChunkSet::new(count);
                let which = u.arbitrary()?;
                Some(build::partial_of_other_version(&o, set, which))
            }
        };
        let held: u64 = have
            .iter()
            .filter_map(|&i| layout.len(i))
            .map(u64::from)
            .sum();
        // What a matching partial leaves to receive (with another partial: everything).
        let needed = o.size - held;
        let room = match u.int_in_range(0u8..=4)? {
            0 => None,
            1 => Some(needed),
            2 => Some(needed.saturating_sub(1)),
            3 => Some(o.size),
            _ => Some(u.arbitrary()?),
        };
        let lookup = build::lookup(
            stored.map(|(size, hash)| build::stored(size, hash)),
            partial.clone(),
            room,
        );
        let found = Found {
            stored,
            partial: partial.map(|p| (p, have)),
            room,
        };
        let decision = self.session.handle_lookup(lookup);
        self.act_on(decision, found, u)
    }

    /// The model's decision for the offer as it stands (with the agent's `FileHash` once
    /// it came), and the chunks the receiver then holds.
    fn decide(&self, found: &Found) -> (OfferDecision, BTreeSet<u32>) {
        let Some((o, layout)) = &self.offer else {
            panic!("a decision without an offer")
        };
        let oh = build::offered_hash(o);
        if let Some((size, hash)) = found.stored {
            if size == o.size {
                match oh {
                    Some(h) if h == hash => return (OfferDecision::AlreadyStored, BTreeSet::new()),
                    Some(_) => {}
                    None => return (OfferDecision::NeedHash, BTreeSet::new()),
                }
            }
        }
        let (have, discard_partial) = match &found.partial {
            Some((p, have)) if partial_matches(p, o) => (have.clone(), false),
            Some(_) => (BTreeSet::new(), true),
            None => (BTreeSet::new(), false),
        };
        let held: u64 = have
            .iter()
            .filter_map(|&i| layout.len(i))
            .map(u64::from)
            .sum();
        if found.room.is_some_and(|r| r < o.size - held) {
            (OfferDecision::Refused { discard_partial }, have)
        } else {
            (OfferDecision::Receive { discard_partial }, have)
        }
    }

    /// Checks a decision (from the lookup, or from the agent's `FileHash`) and acts on it
    /// as the receiver's I/O layer does.
    fn act_on(
        &mut self,
        decision: OfferDecision,
        found: Found,
        u: &mut Unstructured,
    ) -> Result<()> {
        let (want, have) = self.decide(&found);
        assert_eq!(decision, want, "decision for {found:?}");
        let Some((o, layout)) = self.offer.clone() else {
            panic!("a decision without an offer")
        };
        let path = o.path.clone();
        match decision {
            OfferDecision::AlreadyStored => {
                let out = self.drain();
                assert_eq!(out, [build::ack(path, true)], "answer to a stored file");
                self.phase = Phase::Done;
                self.check_state();
                return Ok(());
            }
            OfferDecision::NeedHash => {
                assert_eq!(self.phase, Phase::AwaitOffer, "NeedHash asked twice");
                let out = self.drain();
                assert_eq!(out, [build::need_hash()], "answer to a stored size");
                self.phase = Phase::AwaitHash;
                self.found = Some(found);
                self.check_state();
                return Ok(());
            }
            OfferDecision::Refused { .. } => {
                self.expect_rejection(&[ErrorCode::StorageFull], "no room");
                return Ok(());
            }
            OfferDecision::Receive { .. } => {}
        }
        // Opening the partial file failed: the rejection replaces the queued resume.
        if u.int_in_range(0u8..=7)? == 0 {
            self.session
                .fail_instead(reject(ErrorCode::StorageError, "cannot open the partial"));
            self.expect_rejection(&[ErrorCode::StorageError], "a failed open");
            return Ok(());
        }
        let out = self.drain();
        match out.as_slice() {
            [Message::Resume(r)] => check_resume(&r.missing, layout.count(), &have),
            other => panic!("expected a resume, the session sent {other:?}"),
        }
        self.have = have;
        self.phase = Phase::Receiving;
        self.reader_max = max_data_frame(o.chunk_size);
        self.check_state();
        Ok(())
    }

    /// The agent's `FileHash` was accepted and brought a decision.
    fn on_file_hash(
        &mut self,
        h: Hash,
        decision: OfferDecision,
        u: &mut Unstructured,
    ) -> Result<()> {
        assert_eq!(self.phase, Phase::AwaitHash);
        assert_ne!(decision, OfferDecision::NeedHash, "NeedHash after FileHash");
        let Some((o, _)) = &mut self.offer else {
            panic!("a file hash without an offer")
        };
        *o = build::offer(o.path.clone(), o.size, o.mtime_ns, Some(h), o.chunk_size);
        assert_eq!(
            self.session.offer(),
            Some(&*o),
            "the offer after FileHash carries its hash"
        );
        let Some(found) = self.found.take() else {
            panic!("a file hash without a lookup")
        };
        // Back to deciding: `act_on` must not see a second NeedHash.
        self.phase = Phase::AwaitOffer;
        self.act_on(decision, found, u)
    }

    fn on_chunk(
        &mut self,
        v: VerifiedChunk,
        index: u32,
        hash: [u8; 32],
        u: &mut Unstructured,
    ) -> Result<()> {
        assert_eq!(self.phase, Phase::Receiving);
        let Some((_, layout)) = &self.offer else {
            panic!("a chunk verified without an offer")
        };
        assert_eq!(v.index, index, "verified another chunk than was sent");
        assert_eq!(v.offset, layout.offset(index));
        assert_eq!(
            Some(self.buf.len() as u32),
            layout.len(index),
            "chunk {index} verified with a wrong length"
        );
        assert_eq!(v.value, hash, "chunk {index} verified with another value");
        assert_eq!(
            chunk_value(layout, index, &self.buf),
            hash,
            "chunk {index} verified with other bytes"
        );
        // The value binds the index: the same bytes elsewhere in the file differ.
        if layout.count() > 1 {
            let elsewhere = index ^ 1;
            assert_ne!(
                chunk_value(layout, elsewhere, &self.buf),
                hash,
                "chunk {index}'s value is also chunk {elsewhere}'s"
            );
        }
        let small = layout.size <= SMALL_FILE;
        self.verified += 1;
        self.expect_nothing("before the chunk is stored");
        if u.int_in_range(0u8..=15)? == 0 {
            // The write failed: the partial is discarded and the file rejected.
            self.session
                .fail(reject(ErrorCode::StorageError, "write failed"));
            self.expect_rejection(&[ErrorCode::StorageError], "a failed write");
            return Ok(());
        }
        self.session.handle_chunk_stored(v.index);
        self.have.insert(v.index);
        self.values.insert(v.index, v.value);
        if small {
            self.bytes.insert(v.index, self.buf.to_vec());
        }
        let out = self.drain();
        assert_eq!(out, [build::chunk_ack(v.index)], "answer to a stored chunk");
        self.check_state();
        Ok(())
    }

    fn on_commit(&mut self, u: &mut Unstructured) -> Result<()> {
        assert_eq!(self.phase, Phase::Receiving);
        assert_eq!(self.have.len() as u64, u64::from(self.count()));
        self.expect_nothing("while publishing");
        self.phase = Phase::Publishing;
        // The agent keeps talking while the file is published. Today's receiver does
        // not read then, but the session must still end with one verdict.
        if u.int_in_range(0u8..=7)? == 0 {
            let (msg, _) = self.chunk(u)?;
            self.deliver(msg, Built::Unknown, u)?;
        }
        let Some((o, layout)) = self.offer.clone() else {
            panic!("a commit without an offer")
        };
        let stored_path = format!("agent/{}", o.path);
        // The publish derives the file hash from the recorded chunk values and compares
        // it with the committed one. When every chunk came over this stream the model
        // knows the values; a partial's are storage's business (fuzz-chosen here).
        let derived = merged(&layout, &self.values);
        if let Some(d) = derived {
            if self.bytes.len() == self.values.len() {
                let file: Vec<u8> = self.bytes.values().flatten().copied().collect();
                assert_eq!(file.len() as u64, o.size, "the chunks' bytes make the file");
                assert_eq!(
                    d,
                    hash_bytes(&file),
                    "chunk values do not merge into the file's BLAKE3"
                );
            }
        }
        let hash_ok = match derived {
            Some(d) => Some(d) == self.committed,
            None => u.arbitrary()?,
        };
        let result = match (hash_ok, u.int_in_range(0u8..=7)?) {
            (_, 0) => Err(reject(ErrorCode::StorageError, "fsync failed")),
            (true, _) => Ok(stored_path.clone()),
            (false, _) => Err(reject(ErrorCode::HashMismatch, "whole-file hash")),
        };
        let code = result.as_ref().err().map(|r| r.code);
        self.session.handle_published(result);
        if self.phase == Phase::Done {
            self.expect_nothing("a publish after the verdict");
        } else if let Some(code) = code {
            self.expect_rejection(&[code], "a failed publish");
        } else {
            let out = self.drain();
            assert_eq!(out, [build::ack(stored_path, false)], "answer to a publish");
            self.phase = Phase::Done;
            self.check_state();
        }
        Ok(())
    }
}

/// A resume must name every missing chunk, only missing chunks unless it had to
/// coalesce, in ascending disjoint ranges within the file, in one control frame.
fn check_resume(ranges: &[ChunkRange], count: u32, have: &BTreeSet<u32>) {
    let mut frame = BytesMut::new();
    build::resume(ranges.to_vec())
        .encode(&mut frame)
        .expect("a resume the session built must encode");
    assert!(
        frame.len() - 4 <= MAX_CONTROL_FRAME,
        "resume of {} ranges is a {}-byte frame, over the control limit",
        ranges.len(),
        frame.len()
    );
    let mut prev_end = 0;
    for r in ranges {
        assert!(r.start < r.end && r.end <= count, "range {r:?} of {count}");
        assert!(r.start >= prev_end, "ranges not ascending: {ranges:?}");
        prev_end = r.end;
    }
    // The missing chunks as ranges, from the model.
    let mut missing = Vec::new();
    let mut next = 0u32;
    for &i in have {
        if next < i {
            missing.push(ChunkRange {
                start: next,
                end: i,
            });
        }
        next = i + 1;
    }
    if next < count {
        missing.push(ChunkRange {
            start: next,
            end: count,
        });
    }
    let mut j = 0;
    for m in &missing {
        let mut at = m.start;
        while at < m.end {
            while j < ranges.len() && ranges[j].end <= at {
                j += 1;
            }
            assert!(
                j < ranges.len() && ranges[j].start <= at,
                "missing chunk {at} not requested"
            );
            at = ranges[j].end.min(m.end);
        }
    }
    if missing.len() <= EXACT_RESUME_RANGES {
        assert_eq!(
            ranges,
            missing.as_slice(),
            "resume asks for chunks the receiver has"
        );
    }
}
