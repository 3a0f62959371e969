//! Fuzz target: the agent's file session (`SendSession`) against a hostile receiver.
//!
//! The fuzz input picks an offer the agent could make (a chunk size its configuration
//! accepts, a file size near chunk boundaries or anything up to `u64::MAX`, with or
//! without the file hash) and a window, then a script: the receiver's side is free
//! (`NeedHash`; resumes valid, empty, random, overlapping, descending, out of the file,
//! with thousands of ranges; chunk acknowledgements of the right chunk or another; acks,
//! rejections, stray messages, raw frame bodies through the decoder), in any order and
//! also after the session ended; the agent's side sends a chunk whenever the script
//! says so and the window allows, and hands the session the file hash (answering
//! `NeedHash`, or derived while sending) when the script says so, the way
//! `agent/src/upload.rs` does. Every message crosses the real codec with the agent's
//! reply limit.
//!
//! Checked after every step, against a small model:
//! - no panic; `handle` accepts exactly what the protocol allows in the current state
//!   (`NeedHash` before the resume when the hash is not known yet; a resume with
//!   ascending, disjoint, non-empty ranges within the file; the acknowledgement of the
//!   oldest unacknowledged chunk; an ack; a rejection) and refuses everything else;
//! - the offer is sent first and alone; `FileHash` is sent exactly once per `NeedHash`,
//!   with the hash the I/O layer gave; `needs_hash()`, `awaits_file_hash()` and
//!   `file_hash()` follow the model; chunks are handed out in ascending order, each
//!   requested, within the file, with the layout's offset and length, never more than
//!   the window unacknowledged, never after the outcome; `plan()` lists exactly the
//!   chunks `next_chunk()` will hand out;
//! - one commit, once every requested chunk was sent and the file hash is known,
//!   counting the chunks and carrying that hash; nothing else is sent; the outcome is
//!   the receiver's verdict, and it does not change afterwards.
#![no_main]

use std::collections::VecDeque;

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use skyferry_common::chunk::ChunkLayout;
use skyferry_common::protocol::{
    decode_body, ChunkRange, Codec, Hash, Message, Offer, MAX_CONTROL_FRAME,
};
use skyferry_common::session::{ChunkRead, Outcome, SendSession};
use skyferry_fuzz::{build, shape, wire};

/// Most steps per input, to bound the time of one run.
const MAX_OPS: usize = 256;

/// `plan()` is compared with the model only while this few chunks remain (it
/// allocates one entry per chunk).
const PLAN_CHECK_LIMIT: u32 = 512;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    // Running out of input ends the script; that is not a failure.
    let _ = run(&mut u);
});

fn run(u: &mut Unstructured) -> Result<()> {
    let chunk_size = shape::agent_chunk_size(u)?;
    let size = shape::file_size(u, chunk_size)?;
    // A new file is offered without a hash; a version the journal knows, with it.
    let hash: Option<Hash> = if u.arbitrary()? {
        None
    } else {
        Some(u.arbitrary()?)
    };
    let offer = build::offer(shape::path(u)?, size, u.arbitrary()?, hash, chunk_size);
    let window: u32 = match u.int_in_range(0u8..=3)? {
        0 => 0,
        1 => 1,
        2 => u.int_in_range(2..=8)?,
        _ => u.arbitrary()?,
    };
    let mut h = Harness::new(offer, window);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let msg = match u.int_in_range(0u8..=12)? {
            0 => {
                let body: &[u8] = u.arbitrary()?;
                match decode_body(Bytes::copy_from_slice(body)) {
                    Ok(m) => m,
                    Err(_) => return Ok(()), // The agent's reader closes the stream.
                }
            }
            1 | 2 => h.resume(u)?,
            3..=5 => {
                h.send_chunk();
                continue;
            }
            6 | 7 => h.chunk_ack(u)?,
            8 => build::ack(shape::path(u)?, u.arbitrary()?),
            9 => build::reject(u.arbitrary()?, u.arbitrary()?),
            10 => build::need_hash(),
            11 => {
                h.hash_ready(u)?;
                continue;
            }
            _ => stray(u, &h.offer)?,
        };
        if !h.deliver(msg) {
            return Ok(());
        }
    }
    Ok(())
}

/// Messages a receiver never sends on a file stream.
fn stray(u: &mut Unstructured, offer: &Offer) -> Result<Message> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => Message::Offer(offer.clone()),
        1 => build::commit(u.arbitrary()?, u.arbitrary()?),
        3 => build::file_hash(u.arbitrary()?),
        _ => build::chunk(u.arbitrary()?, Codec::Raw, 1, [0; 32], vec![0]),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitResume,
    /// `NeedHash` came; the I/O layer is hashing the file.
    Hashing,
    Sending,
    AwaitAck,
    Done,
}

/// The session as the protocol describes it.
struct Model {
    state: State,
    layout: ChunkLayout,
    window: usize,
    todo: VecDeque<ChunkRange>,
    unacked: VecDeque<u32>,
    sent: u32,
    last_sent: Option<u32>,
    /// The whole file's hash, once known: offered, or given by the I/O layer.
    file_hash: Option<Hash>,
    /// Messages the session must send next.
    due: VecDeque<Message>,
    outcome: Option<Outcome>,
}

impl Model {
    fn remaining(&self) -> u32 {
        self.todo.iter().map(ChunkRange::len).sum()
    }

    /// The window allows another chunk (there may be none left: once every chunk was
    /// sent the session stays `Sending` until the file hash is known).
    fn window_open(&self) -> bool {
        self.state == State::Sending && self.unacked.len() < self.window
    }

    fn next(&self) -> Option<u32> {
        if self.window_open() {
            self.todo.front().map(|r| r.start)
        } else {
            None
        }
    }

    fn maybe_commit(&mut self) {
        if self.state == State::Sending && self.todo.is_empty() {
            if let Some(h) = self.file_hash {
                self.state = State::AwaitAck;
                self.due.push_back(build::commit(self.sent, h));
            }
        }
    }

    /// Every requested chunk was sent and only the hash is missing for the commit.
    fn awaits_hash(&self) -> bool {
        self.state == State::Sending && self.todo.is_empty() && self.file_hash.is_none()
    }

    /// The I/O layer computed the file hash.
    fn handle_file_hash(&mut self, h: Hash) {
        self.file_hash = Some(h);
        if self.state == State::Hashing {
            self.due.push_back(build::file_hash(h));
            self.state = State::AwaitResume;
        }
        self.maybe_commit();
    }

    /// Applies `msg`; `None` for a kind this model does not know.
    fn handle(&mut self, msg: &Message) -> Option<bool> {
        let count = self.layout.count();
        let ok = match (self.state, msg) {
            (State::AwaitResume, Message::NeedHash) if self.file_hash.is_none() => {
                self.state = State::Hashing;
                true
            }
            (State::AwaitResume, Message::Resume(r)) => {
                let mut prev_end = 0;
                let valid = r.missing.iter().all(|range| {
                    let ok =
                        range.start < range.end && range.end <= count && range.start >= prev_end;
                    prev_end = range.end;
                    ok
                });
                if valid {
                    self.todo = r.missing.iter().copied().collect();
                    self.state = State::Sending;
                    self.maybe_commit();
                }
                valid
            }
            (State::AwaitResume | State::AwaitAck, Message::Ack(a)) => {
                self.state = State::Done;
                self.outcome = Some(Outcome::Stored {
                    stored_path: a.stored_path.clone(),
                    already_stored: a.already_stored,
                    chunks_sent: self.sent,
                });
                true
            }
            (State::Sending | State::AwaitAck, Message::ChunkAck(a)) => {
                let ok = self.unacked.front() == Some(&a.index);
                if ok {
                    self.unacked.pop_front();
                }
                ok
            }
            (
                State::AwaitResume | State::Hashing | State::Sending | State::AwaitAck,
                Message::Reject(r),
            ) => {
                self.state = State::Done;
                self.todo.clear();
                self.outcome = Some(Outcome::Rejected(r.clone()));
                true
            }
            (
                _,
                Message::Hello(_)
                | Message::Welcome(_)
                | Message::Refuse(_)
                | Message::AgentHeartbeat(_)
                | Message::ReceiverHeartbeat(_)
                | Message::Offer(_)
                | Message::Resume(_)
                | Message::Chunk(_)
                | Message::ChunkAck(_)
                | Message::Commit(_)
                | Message::Ack(_)
                | Message::Reject(_)
                | Message::NeedHash
                | Message::FileHash(_),
            ) => false,
            #[allow(unreachable_patterns)] // Message kinds added after this model.
            _ => return None,
        };
        Some(ok)
    }
}

struct Harness {
    session: SendSession,
    offer: Offer,
    model: Model,
}

impl Harness {
    fn new(offer: Offer, window: u32) -> Self {
        let mut session = SendSession::new(offer.clone(), window);
        let first: Vec<Message> = std::iter::from_fn(|| session.poll_transmit()).collect();
        assert_eq!(
            first,
            [Message::Offer(offer.clone())],
            "the offer goes first, alone"
        );
        let model = Model {
            state: State::AwaitResume,
            layout: ChunkLayout::new(offer.size, offer.chunk_size),
            window: window.max(1) as usize,
            todo: VecDeque::new(),
            unacked: VecDeque::new(),
            sent: 0,
            last_sent: None,
            file_hash: build::offered_hash(&offer),
            due: VecDeque::new(),
            outcome: None,
        };
        let h = Harness {
            session,
            offer,
            model,
        };
        h.check_state();
        h
    }

    /// A resume: the whole file, nothing, random valid ranges, many ranges, or ranges
    /// with one flaw.
    fn resume(&self, u: &mut Unstructured) -> Result<Message> {
        let count = self.model.layout.count();
        let r = |start, end| ChunkRange { start, end };
        let ranges = match u.int_in_range(0u8..=6)? {
            0 => self.model.layout.all(),
            1 => Vec::new(),
            2 | 3 => {
                let mut cuts: Vec<u32> = Vec::new();
                for _ in 0..u.int_in_range(0u8..=8)? * 2 {
                    cuts.push(u.int_in_range(0..=count)?);
                }
                cuts.sort_unstable();
                cuts.dedup();
                cuts.chunks_exact(2).map(|p| r(p[0], p[1])).collect()
            }
            4 if count <= 10_000 => (0..count).step_by(2).map(|i| r(i, i + 1)).collect(),
            5 => {
                let a = u.int_in_range(0..=count)?;
                let b = u.int_in_range(a..=count)?;
                match u.int_in_range(0u8..=4)? {
                    0 => vec![r(a, b.saturating_add(1)), r(a, b.saturating_add(1))],
                    1 => vec![r(b, b.saturating_add(2)), r(a, a.saturating_add(1))],
                    2 => vec![r(a, b), r(b, b.saturating_add(1))],
                    3 => vec![r(count, count.saturating_add(1))],
                    _ => vec![r(a, count.saturating_add(1))],
                }
            }
            _ => {
                let n = u.int_in_range(0u8..=16)?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(r(u.arbitrary()?, u.arbitrary()?));
                }
                v
            }
        };
        Ok(build::resume(ranges))
    }

    fn chunk_ack(&self, u: &mut Unstructured) -> Result<Message> {
        let unacked = &self.model.unacked;
        let index = match u.int_in_range(0u8..=4)? {
            0 | 1 => unacked.front().copied().unwrap_or(0),
            2 => unacked.get(1).copied().unwrap_or(1),
            3 => self.model.last_sent.map_or(0, |i| i.wrapping_add(1)),
            _ => u.arbitrary()?,
        };
        Ok(build::chunk_ack(index))
    }

    /// The I/O layer hands the session the file hash: after `NeedHash`, or derived from
    /// the chunk values while sending (`agent/src/upload.rs` does so once every chunk
    /// was read; here at any time). Only while it is unknown: once known (offered, or
    /// given), the agent never computes it again for this session.
    fn hash_ready(&mut self, u: &mut Unstructured) -> Result<()> {
        if self.model.file_hash.is_some() {
            return Ok(());
        }
        let h: Hash = u.arbitrary()?;
        self.session.handle_file_hash(h);
        self.model.handle_file_hash(h);
        self.check_output();
        self.check_state();
        Ok(())
    }

    /// The agent sends the next chunk if the window allows it.
    fn send_chunk(&mut self) {
        let expected = self.model.next();
        assert_eq!(
            self.session.can_send(),
            self.model.window_open(),
            "can_send()"
        );
        let Some(read) = self.session.next_chunk() else {
            assert_eq!(
                expected, None,
                "no chunk handed out though the window is open"
            );
            self.check_state();
            return;
        };
        let index = expected.unwrap_or_else(|| panic!("chunk {read:?} handed out, none due"));
        let layout = self.model.layout;
        let want = ChunkRead {
            index,
            offset: layout.offset(index),
            len: layout.len(index).unwrap_or(0),
        };
        assert_eq!(read, want, "chunk handed out");
        assert!(read.len > 0, "an empty chunk handed out");
        if let Some(last) = self.model.last_sent {
            assert!(index > last, "chunk {index} handed out after chunk {last}");
        }
        self.session.handle_chunk_sent();

        let m = &mut self.model;
        if let Some(front) = m.todo.front_mut() {
            front.start += 1;
            if front.start == front.end {
                m.todo.pop_front();
            }
        }
        m.unacked.push_back(index);
        m.sent += 1;
        m.last_sent = Some(index);
        m.maybe_commit();
        self.check_output();
        self.check_state();
    }

    /// Delivers a receiver's message; false when the agent would close the stream.
    fn deliver(&mut self, msg: Message) -> bool {
        let msg = match wire::transmit(&msg, MAX_CONTROL_FRAME) {
            None => return true, // The receiver could not have sent it.
            Some(Err(_)) => return false,
            Some(Ok(m)) => m,
        };
        let before = self.model.state;
        let expected = self.model.handle(&msg);
        let result = self.session.handle(msg.clone());
        match expected {
            Some(ok) => assert_eq!(
                result.is_ok(),
                ok,
                "{msg:?} while {before:?}: the session answered {result:?}"
            ),
            // A kind this model does not know: it can no longer follow the session.
            None => return false,
        }
        self.check_output();
        self.check_state();
        true
    }

    fn check_output(&mut self) {
        let out: Vec<Message> = std::iter::from_fn(|| self.session.poll_transmit()).collect();
        let m = &mut self.model;
        let due: Vec<Message> = m.due.drain(..).collect();
        assert_eq!(out, due, "what the agent sent while {:?}", m.state);
    }

    fn check_state(&self) {
        let s = &self.session;
        let m = &self.model;
        assert!(
            m.unacked.len() <= m.window,
            "more chunks in flight than the window"
        );
        assert_eq!(
            s.can_send(),
            m.window_open(),
            "can_send() while {:?}",
            m.state
        );
        assert_eq!(s.next_chunk().map(|c| c.index), m.next(), "next_chunk()");
        assert_eq!(s.chunks_to_send(), m.remaining(), "chunks_to_send()");
        assert_eq!(s.chunks_sent(), m.sent, "chunks_sent()");
        assert_eq!(s.outcome(), m.outcome.as_ref(), "outcome()");
        assert_eq!(s.needs_hash(), m.state == State::Hashing, "needs_hash()");
        assert_eq!(s.awaits_file_hash(), m.awaits_hash(), "awaits_file_hash()");
        assert_eq!(s.file_hash(), m.file_hash, "file_hash()");
        if m.remaining() <= PLAN_CHECK_LIMIT {
            let plan: Vec<u32> = s.plan().iter().map(|c| c.index).collect();
            let want: Vec<u32> = if m.state == State::Sending {
                m.todo.iter().flat_map(|r| r.start..r.end).collect()
            } else {
                Vec::new()
            };
            assert_eq!(plan, want, "plan() while {:?}", m.state);
        }
    }
}
