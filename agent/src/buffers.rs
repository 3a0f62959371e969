//! Chunk read buffers, reused once QUIC lets go of them.
//!
//! A chunk is read into a buffer that becomes the frame's payload and is handed to QUIC
//! without a copy; QUIC drops its reference when the receiver has acknowledged the
//! packets. The pool keeps a reference to each payload it handed out and takes the
//! memory back when it is the last holder, so that steady sending neither zero-fills nor
//! faults in fresh pages for every chunk.

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

pub struct ChunkBuffers {
    held: Mutex<Vec<Bytes>>,
    /// Payloads kept at most: what stays allocated when the agent goes idle.
    max_held: usize,
}

impl ChunkBuffers {
    pub fn new(max_held: usize) -> ChunkBuffers {
        ChunkBuffers {
            held: Mutex::new(Vec::new()),
            max_held,
        }
    }

    /// A buffer of `len` bytes, to be overwritten by the caller: a payload nobody else
    /// holds any more, or a new one.
    pub fn take(&self, len: usize) -> BytesMut {
        let reused = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.iter()
                .position(Bytes::is_unique)
                .map(|i| held.swap_remove(i))
        };
        match reused.map(Bytes::try_into_mut) {
            Some(Ok(mut buf)) => {
                if buf.len() >= len {
                    buf.truncate(len);
                } else {
                    buf.resize(len, 0);
                }
                buf
            }
            _ => BytesMut::zeroed(len),
        }
    }

    /// Keeps a reference to a payload handed to QUIC, to take its memory back later.
    pub fn keep(&self, payload: &Bytes) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() < self.max_held {
            held.push(payload.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_reused_only_once_nobody_else_holds_it() {
        let pool = ChunkBuffers::new(4);
        let mut first = pool.take(1000);
        first[0] = 7;
        let address = first.as_ptr();
        let sent = first.freeze();
        pool.keep(&sent);
        // QUIC still holds the payload: a new buffer.
        let other = pool.take(1000);
        assert_ne!(other.as_ptr(), address);
        drop(sent);
        // Acknowledged and dropped: its memory comes back, cut to the asked length.
        let again = pool.take(600);
        assert_eq!(again.as_ptr(), address);
        assert_eq!(again.len(), 600);
        assert!(pool.take(2000).len() == 2000);
    }
}
