//! The agent's side of a file session.

use std::collections::VecDeque;

use crate::chunk::ChunkLayout;
use crate::protocol::{ChunkRange, Commit, Hash, Message, Offer, Reject};

/// How the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver has the file durably stored and catalogued.
    Stored {
        stored_path: String,
        already_stored: bool,
        chunks_sent: u32,
    },
    /// The receiver refused the file; `code.is_retryable()` tells whether to try again.
    Rejected(Reject),
}

/// The peer broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("receiver sent an unexpected {got} frame while the agent was {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error("receiver asked for chunks {start}..{end}, but the file has {count} chunks")]
    BadRange { start: u32, end: u32, count: u32 },
    #[error("receiver's missing ranges are not ascending and disjoint")]
    UnorderedRanges,
    #[error("receiver acknowledged chunk {index}, which was not the oldest unacknowledged one")]
    UnexpectedAck { index: u32 },
}

/// A chunk the I/O layer must read from the source, encode and send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRead {
    pub index: u32,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitResume,
    /// The receiver asked for the file hash; the I/O layer is computing it.
    Hashing,
    Sending,
    AwaitAck,
    Done,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitResume => "waiting for resume",
            State::Hashing => "hashing the file",
            State::Sending => "sending chunks",
            State::AwaitAck => "waiting for the acknowledgement",
            State::Done => "done",
        }
    }
}

/// The sending end of one file stream.
#[derive(Debug)]
pub struct SendSession {
    state: State,
    layout: ChunkLayout,
    todo: VecDeque<ChunkRange>,
    /// Chunks sent on this stream and not yet acknowledged, oldest first.
    unacked: VecDeque<u32>,
    /// Chunks sent on stripe streams (other lanes) and not yet acknowledged there; the
    /// I/O layer checks their order per stream. With `unacked`, at most `window`.
    elsewhere: usize,
    window: usize,
    chunks_sent: u32,
    /// The whole file's BLAKE3, once known (from the offer, or derived by the I/O layer
    /// from the chunk values); the commit waits for it.
    file_hash: Option<Hash>,
    out: VecDeque<Message>,
    outcome: Option<Outcome>,
}

impl SendSession {
    /// Starts a session; the offer is the first message to transmit. At most `window`
    /// chunks (at least 1) are in flight unacknowledged: an interruption costs at most
    /// that many chunks sent twice.
    pub fn new(offer: Offer, window: u32) -> Self {
        let layout = ChunkLayout::new(offer.size, offer.chunk_size);
        let file_hash = offer.file_hash;
        SendSession {
            state: State::AwaitResume,
            layout,
            todo: VecDeque::new(),
            unacked: VecDeque::new(),
            elsewhere: 0,
            window: window.max(1) as usize,
            chunks_sent: 0,
            file_hash,
            out: VecDeque::from([Message::Offer(offer)]),
            outcome: None,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.out.pop_front()
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn chunks_sent(&self) -> u32 {
        self.chunks_sent
    }

    /// Chunks the receiver asked for and that were not sent yet.
    pub fn chunks_to_send(&self) -> u32 {
        self.todo.iter().map(ChunkRange::len).sum()
    }

    /// The whole file's BLAKE3, once known.
    pub fn file_hash(&self) -> Option<Hash> {
        self.file_hash
    }

    /// Whether the receiver asked for the whole-file hash: the I/O layer computes it
    /// and calls [`SendSession::handle_file_hash`].
    pub fn needs_hash(&self) -> bool {
        self.state == State::Hashing
    }

    /// The whole file's BLAKE3, computed by the I/O layer: answers a
    /// [`Message::NeedHash`], or (derived from the chunk values while sending) completes
    /// the commit. A hash that differs from the one offered means the source changed;
    /// the caller checks that before calling this.
    pub fn handle_file_hash(&mut self, hash: Hash) {
        self.file_hash = Some(hash);
        if self.state == State::Hashing {
            self.out.push_back(Message::FileHash(hash));
            self.state = State::AwaitResume;
        }
        self.maybe_commit();
    }

    /// A message from the receiver.
    pub fn handle(&mut self, msg: Message) -> Result<(), SessionError> {
        match (self.state, msg) {
            (State::AwaitResume, Message::NeedHash) if self.file_hash.is_none() => {
                self.state = State::Hashing;
                Ok(())
            }
            (State::AwaitResume, Message::Resume(r)) => {
                let count = self.layout.count();
                let mut prev_end = 0;
                for (i, range) in r.missing.iter().enumerate() {
                    if range.start >= range.end || range.end > count {
                        return Err(SessionError::BadRange {
                            start: range.start,
                            end: range.end,
                            count,
                        });
                    }
                    if i > 0 && range.start < prev_end {
                        return Err(SessionError::UnorderedRanges);
                    }
                    prev_end = range.end;
                }
                self.todo = r.missing.into();
                self.state = State::Sending;
                self.maybe_commit();
                Ok(())
            }
            (State::AwaitResume | State::AwaitAck, Message::Ack(a)) => {
                self.state = State::Done;
                self.outcome = Some(Outcome::Stored {
                    stored_path: a.stored_path,
                    already_stored: a.already_stored,
                    chunks_sent: self.chunks_sent,
                });
                Ok(())
            }
            (State::Sending | State::AwaitAck, Message::ChunkAck(a)) => {
                if self.unacked.front() != Some(&a.index) {
                    return Err(SessionError::UnexpectedAck { index: a.index });
                }
                self.unacked.pop_front();
                Ok(())
            }
            // A rejection may come at any point, e.g. a bad chunk mid-file.
            (
                State::AwaitResume | State::Hashing | State::Sending | State::AwaitAck,
                Message::Reject(r),
            ) => {
                self.state = State::Done;
                self.todo.clear();
                self.outcome = Some(Outcome::Rejected(r));
                Ok(())
            }
            (state, other) => Err(SessionError::Unexpected {
                got: other.kind(),
                state: state.name(),
            }),
        }
    }

    /// Whether the window allows sending another chunk now.
    pub fn can_send(&self) -> bool {
        self.state == State::Sending && self.in_flight() < self.window
    }

    /// Chunks sent and not yet acknowledged, on this stream and on stripes.
    pub fn in_flight(&self) -> usize {
        self.unacked.len() + self.elsewhere
    }

    /// Chunks sent and not yet acknowledged on this stream.
    pub fn in_flight_here(&self) -> usize {
        self.unacked.len()
    }

    /// Chunks sent on stripe streams and not yet acknowledged there: the commit waits
    /// for them, as the receiver holds a chunk only once it acknowledged it.
    pub fn in_flight_elsewhere(&self) -> usize {
        self.elsewhere
    }

    /// The next chunk to read and send, in ascending order, once the window allows it.
    pub fn next_chunk(&self) -> Option<ChunkRead> {
        if !self.can_send() {
            return None;
        }
        let index = self.todo.front()?.start;
        Some(ChunkRead {
            index,
            offset: self.layout.offset(index),
            // `todo` ranges were checked against the layout in `handle`.
            len: self.layout.len(index).unwrap_or(0),
        })
    }

    /// All chunks still to send, in the order [`next_chunk`](SendSession::next_chunk)
    /// returns them: lets the I/O layer read ahead.
    pub fn plan(&self) -> Vec<ChunkRead> {
        if self.state != State::Sending {
            return Vec::new();
        }
        self.todo
            .iter()
            .flat_map(|r| r.start..r.end)
            .map(|index| ChunkRead {
                index,
                offset: self.layout.offset(index),
                len: self.layout.len(index).unwrap_or(0),
            })
            .collect()
    }

    /// The chunk returned by [`next_chunk`](SendSession::next_chunk) was sent on this
    /// stream.
    pub fn handle_chunk_sent(&mut self) {
        self.sent(true);
    }

    /// The chunk returned by [`next_chunk`](SendSession::next_chunk) was sent on a
    /// stripe stream; [`handle_ack_elsewhere`](SendSession::handle_ack_elsewhere) takes
    /// its acknowledgement.
    pub fn handle_chunk_sent_elsewhere(&mut self) {
        self.sent(false);
    }

    /// A stripe stream acknowledged one of its chunks (the I/O layer checked which).
    pub fn handle_ack_elsewhere(&mut self) -> Result<(), SessionError> {
        if self.elsewhere == 0 || !matches!(self.state, State::Sending | State::AwaitAck) {
            return Err(SessionError::Unexpected {
                got: "chunk_ack",
                state: self.state.name(),
            });
        }
        self.elsewhere -= 1;
        self.maybe_commit();
        Ok(())
    }

    fn sent(&mut self, here: bool) {
        if let Some(front) = self.todo.front_mut() {
            if here {
                self.unacked.push_back(front.start);
            } else {
                self.elsewhere += 1;
            }
            front.start += 1;
            if front.start == front.end {
                self.todo.pop_front();
            }
            self.chunks_sent += 1;
        }
        self.maybe_commit();
    }

    /// Whether every requested chunk was sent and only the file hash is missing for the
    /// commit (the I/O layer is still hashing chunks the receiver already holds).
    pub fn awaits_file_hash(&self) -> bool {
        self.state == State::Sending && self.todo.is_empty() && self.file_hash.is_none()
    }

    fn maybe_commit(&mut self) {
        if self.state != State::Sending || !self.todo.is_empty() || self.elsewhere > 0 {
            return;
        }
        if let Some(file_hash) = self.file_hash {
            self.out.push_back(Message::Commit(Commit {
                chunks_sent: self.chunks_sent,
                file_hash,
            }));
            self.state = State::AwaitAck;
        }
    }
}
