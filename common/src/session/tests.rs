//! Both ends of a file session driven in memory, every message going through the codec.

use std::collections::BTreeMap;

use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::buf::AlignedBuf;
use crate::chunk::{chunk_value, hash_bytes, ChunkLayout, ChunkSet};
use crate::compress::Compressor;
use crate::protocol::{
    decode, max_data_frame, Chunk, ErrorCode, Hash, Message, Offer, MIN_CHUNK_SIZE,
};

const CS: u32 = MIN_CHUNK_SIZE;

/// The receiver's storage, in memory.
#[derive(Default)]
struct Disk {
    partials: BTreeMap<String, (Vec<u8>, PartialState)>,
    published: BTreeMap<String, (Vec<u8>, Hash)>,
}

fn wire(msg: Message, max: usize) -> Message {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf).expect("encodable");
    let out = decode(&mut buf, max)
        .expect("valid frame")
        .expect("whole frame");
    assert!(buf.is_empty());
    out
}

/// An offer of a file the agent has not hashed yet (a new file).
fn offer(path: &str, data: &[u8]) -> Offer {
    Offer {
        path: path.into(),
        size: data.len() as u64,
        mtime_ns: 1_700_000_000_000_000_000,
        file_hash: None,
        chunk_size: CS,
    }
}

/// An offer with the file hash known (from an earlier attempt).
fn offer_hashed(path: &str, data: &[u8]) -> Offer {
    Offer {
        file_hash: Some(hash_bytes(data)),
        ..offer(path, data)
    }
}

/// Runs one session. `tamper` may alter each chunk frame after the agent built it (a
/// corrupting network or a lying agent); `stop_after` cuts the stream after that many
/// chunks (a crash). Returns the agent's outcome (None when cut) and chunks sent.
fn run(
    disk: &mut Disk,
    offer: Offer,
    data: &[u8],
    tamper: &mut dyn FnMut(&mut Chunk),
    stop_after: Option<u32>,
) -> (Option<Outcome>, u32) {
    let mut send = SendSession::new(offer, 1);
    let mut recv = ReceiveSession::new(1 << 40);
    let mut compressor = Compressor::new(1);
    let mut buf = AlignedBuf::new();

    let mut deliver = |msg: Message, recv: &mut ReceiveSession, disk: &mut Disk| {
        let max = max_data_frame(CS);
        let event = recv.handle(wire(msg, max), &mut buf);
        let Ok(event) = event else { return };
        let path = recv.path().expect("offered").to_string();
        let decision = match &event {
            Event::Offered => {
                let lookup = Lookup {
                    stored: disk.published.get(&path).map(|(b, h)| StoredVersion {
                        size: b.len() as u64,
                        hash: *h,
                    }),
                    partial: disk.partials.get(&path).map(|(_, s)| s.clone()),
                    room: None,
                };
                Some(recv.handle_lookup(lookup))
            }
            Event::Decided(d) => Some(d.clone()),
            _ => None,
        };
        match event {
            Event::Offered | Event::Decided(_) => {
                let o = recv.offer().expect("offered").clone();
                if let Some(OfferDecision::Receive { discard_partial }) = decision {
                    if discard_partial || !disk.partials.contains_key(&path) {
                        let state = PartialState {
                            size: o.size,
                            mtime_ns: o.mtime_ns,
                            file_hash: o.file_hash,
                            chunk_size: o.chunk_size,
                            have: ChunkSet::new(recv.layout().count()),
                        };
                        disk.partials
                            .insert(path, (vec![0; o.size as usize], state));
                    }
                }
            }
            Event::Chunk(v) => {
                let (bytes, state) = disk.partials.get_mut(&path).expect("partial exists");
                let at = v.offset as usize;
                bytes[at..at + buf.len()].copy_from_slice(&buf);
                state.have.insert(v.index);
                recv.handle_chunk_stored(v.index);
            }
            Event::Commit => {
                let (bytes, _) = disk.partials.remove(&path).expect("partial exists");
                let hash = hash_bytes(&bytes);
                if Some(hash) == recv.committed_hash() {
                    disk.published.insert(path.clone(), (bytes, hash));
                    recv.handle_published(Ok(path));
                } else {
                    recv.handle_published(Err(reject(ErrorCode::HashMismatch, "whole file")));
                }
            }
        }
    };

    let layout = ChunkLayout::new(data.len() as u64, CS);
    loop {
        // The I/O layer's part: the file hash when the receiver asks for it, or once the
        // chunks are sent (derived from the chunk values; `hash_bytes` gives the same).
        if send.needs_hash() || send.awaits_file_hash() {
            send.handle_file_hash(hash_bytes(data));
        }
        while let Some(m) = send.poll_transmit() {
            deliver(m, &mut recv, disk);
        }
        while let Some(c) = send.next_chunk() {
            if stop_after == Some(send.chunks_sent()) {
                return (None, send.chunks_sent());
            }
            let raw = &data[c.offset as usize..(c.offset + u64::from(c.len)) as usize];
            let (codec, payload) = compressor.encode(raw.to_vec());
            let mut chunk = Chunk {
                index: c.index,
                codec,
                raw_len: c.len,
                chunk_hash: chunk_value(&layout, c.index, raw),
                payload: payload.into(),
            };
            tamper(&mut chunk);
            deliver(Message::Chunk(chunk), &mut recv, disk);
            send.handle_chunk_sent();
            // Acknowledgements, or a rejection, arrive while chunks are still being sent.
            while let Some(reply) = recv.poll_transmit() {
                send.handle(wire(reply, usize::MAX)).expect("valid reply");
            }
            if send.awaits_file_hash() {
                send.handle_file_hash(hash_bytes(data));
            }
            while let Some(m) = send.poll_transmit() {
                deliver(m, &mut recv, disk);
            }
        }
        match recv.poll_transmit() {
            Some(reply) => send.handle(wire(reply, usize::MAX)).expect("valid reply"),
            None => break,
        }
        if send.outcome().is_some() {
            break;
        }
    }
    (send.outcome().cloned(), send.chunks_sent())
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    // Half compressible, half noisy, like a FITS frame with a header.
    (0..len)
        .map(|i| {
            if i % 2 == 0 {
                (i / 512) as u8
            } else {
                (i as u8).wrapping_mul(31) ^ seed
            }
        })
        .collect()
}

#[test]
fn boundary_sizes_arrive_identical() {
    let cs = CS as usize;
    for len in [0, 1, cs - 1, cs, cs + 1, 3 * cs + 7] {
        let mut disk = Disk::default();
        let src = data(len, 1);
        let (outcome, sent) = run(&mut disk, offer("n/f.fits", &src), &src, &mut |_| {}, None);
        assert!(
            matches!(
                outcome,
                Some(Outcome::Stored {
                    already_stored: false,
                    ..
                })
            ),
            "len {len}: {outcome:?}"
        );
        assert_eq!(sent as usize, len.div_ceil(cs), "len {len}");
        assert_eq!(disk.published["n/f.fits"].0, src, "len {len}");
        assert!(disk.partials.is_empty());
    }
}

#[test]
fn reoffer_of_stored_file_is_acknowledged_without_data() {
    let mut disk = Disk::default();
    let src = data(200_000, 2);
    run(&mut disk, offer("a.fits", &src), &src, &mut |_| {}, None);
    // Without the hash (the receiver asks for it: same path and size), and with it.
    for o in [offer("a.fits", &src), offer_hashed("a.fits", &src)] {
        let (outcome, sent) = run(&mut disk, o, &src, &mut |_| {}, None);
        assert_eq!(sent, 0);
        assert!(matches!(
            outcome,
            Some(Outcome::Stored {
                already_stored: true,
                ..
            })
        ));
    }
    // Same path and size, other content: the hash differs, the file is sent.
    let other = data(200_000, 9);
    let (outcome, sent) = run(
        &mut disk,
        offer("a.fits", &other),
        &other,
        &mut |_| {},
        None,
    );
    assert_eq!(sent, 4);
    assert!(matches!(
        outcome,
        Some(Outcome::Stored {
            already_stored: false,
            ..
        })
    ));
    assert_eq!(disk.published["a.fits"].0, other);
}

/// A chunk's value binds its offset: the right bytes and value of chunk 1 sent as
/// chunk 2 (an agent or a network that mixes chunks up) are refused.
#[test]
fn a_chunk_under_another_index_is_caught() {
    let mut disk = Disk::default();
    let src = data(4 * CS as usize, 8);
    let mut swap = |c: &mut Chunk| {
        if c.index == 1 {
            c.index = 2;
        }
    };
    let (outcome, _) = run(&mut disk, offer("s", &src), &src, &mut swap, None);
    assert!(
        matches!(&outcome, Some(Outcome::Rejected(r)) if r.code == ErrorCode::ChunkMismatch && r.reason.contains("chunk 2")),
        "{outcome:?}"
    );
    assert!(disk.published.is_empty());
}

#[test]
fn corrupted_chunk_is_rejected_and_never_published() {
    let mut disk = Disk::default();
    let src = data(5 * CS as usize, 3);
    let mut flip = |c: &mut Chunk| {
        if c.index == 2 {
            let mut p = c.payload.to_vec();
            p[10] ^= 0xff;
            c.payload = p.into();
        }
    };
    let (outcome, _) = run(&mut disk, offer("bad.fits", &src), &src, &mut flip, None);
    let Some(Outcome::Rejected(r)) = outcome else {
        panic!("expected a rejection, got {outcome:?}")
    };
    assert_eq!(r.code, ErrorCode::ChunkMismatch);
    assert!(r.reason.contains("chunk 2"), "{}", r.reason);
    assert!(disk.published.is_empty());
    // Chunks 0 and 1 were verified and kept: a retry sends only 2, 3 and 4.
    let (outcome, sent) = run(&mut disk, offer("bad.fits", &src), &src, &mut |_| {}, None);
    assert!(matches!(outcome, Some(Outcome::Stored { .. })));
    assert_eq!(sent, 3);
    assert_eq!(disk.published["bad.fits"].0, src);
}

#[test]
fn a_chunk_hash_that_lies_is_caught() {
    let mut disk = Disk::default();
    let src = data(2 * CS as usize, 4);
    let mut lie = |c: &mut Chunk| c.chunk_hash = [7; 32];
    let (outcome, _) = run(&mut disk, offer("x", &src), &src, &mut lie, None);
    assert!(
        matches!(&outcome, Some(Outcome::Rejected(r)) if r.reason.contains("checksum mismatch")),
        "{outcome:?}"
    );
}

#[test]
fn wrong_whole_file_hash_is_never_published() {
    let mut disk = Disk::default();
    let src = data(2 * CS as usize + 5, 5);
    let mut o = offer("x", &src);
    o.file_hash = Some([1; 32]);
    let (outcome, _) = run(&mut disk, o, &src, &mut |_| {}, None);
    assert!(matches!(&outcome, Some(Outcome::Rejected(r)) if r.code == ErrorCode::HashMismatch));
    assert!(disk.published.is_empty());
}

#[test]
fn changed_source_discards_the_old_partial() {
    let mut disk = Disk::default();
    let old = data(4 * CS as usize, 6);
    run(&mut disk, offer("v.fits", &old), &old, &mut |_| {}, Some(2));
    let new = data(4 * CS as usize, 7);
    let newer = Offer {
        mtime_ns: offer("v.fits", &new).mtime_ns + 1,
        ..offer("v.fits", &new)
    };
    let (outcome, sent) = run(&mut disk, newer, &new, &mut |_| {}, None);
    assert!(matches!(outcome, Some(Outcome::Stored { .. })));
    assert_eq!(sent, 4, "the whole new version is sent");
    assert_eq!(disk.published["v.fits"].0, new);
}

/// Other content under the same size and mtime (no hash in the offer): the partial looks
/// reusable, but the hash derived at the commit is not the agent's, so the mixture is
/// never published; the retry sends the whole file.
#[test]
fn a_partial_of_other_content_with_the_same_mtime_is_never_published() {
    let mut disk = Disk::default();
    let old = data(4 * CS as usize, 6);
    run(&mut disk, offer("v.fits", &old), &old, &mut |_| {}, Some(2));
    let new = data(4 * CS as usize, 7);
    let (outcome, _) = run(&mut disk, offer("v.fits", &new), &new, &mut |_| {}, None);
    assert!(
        matches!(&outcome, Some(Outcome::Rejected(r)) if r.code == ErrorCode::HashMismatch),
        "{outcome:?}"
    );
    assert!(disk.published.is_empty());
    let (outcome, sent) = run(&mut disk, offer("v.fits", &new), &new, &mut |_| {}, None);
    assert!(matches!(outcome, Some(Outcome::Stored { .. })));
    assert_eq!(sent, 4);
    assert_eq!(disk.published["v.fits"].0, new);
}

#[test]
fn bad_path_is_rejected() {
    let mut disk = Disk::default();
    let src = data(10, 0);
    for bad in ["../etc/passwd", "/abs", "a/../../b"] {
        let (outcome, _) = run(&mut disk, offer(bad, &src), &src, &mut |_| {}, None);
        assert!(
            matches!(&outcome, Some(Outcome::Rejected(r)) if r.code == ErrorCode::BadPath),
            "{bad}: {outcome:?}"
        );
    }
    assert!(disk.published.is_empty() && disk.partials.is_empty());
}

#[test]
fn control_characters_in_a_path_are_a_bad_path() {
    let mut disk = Disk::default();
    let src = data(10, 0);
    for bad in [
        "x\n2099-01-01T00:00:00Z  INFO forged.fits",
        "a\x1b[2Kb.fits",
        "tab\there",
        "del\u{7f}",
        "c1\u{9b}31m",
    ] {
        let (outcome, sent) = run(&mut disk, offer(bad, &src), &src, &mut |_| {}, None);
        assert_eq!(sent, 0, "{bad:?}");
        assert!(
            matches!(&outcome, Some(Outcome::Rejected(r)) if r.code == ErrorCode::BadPath),
            "{bad:?}: {outcome:?}"
        );
    }
    assert!(disk.published.is_empty() && disk.partials.is_empty());
}

/// An offer that does not fit is refused on its own: `storage_full` is the only reply
/// (no `Resume` first), and it holds no per-chunk state.
#[test]
fn an_offer_without_room_gets_only_a_storage_full_rejection() {
    let tib = 1u64 << 40;
    let o = Offer {
        path: "huge.fits".into(),
        size: tib,
        mtime_ns: 1,
        file_hash: Some([3; 32]),
        chunk_size: MIN_CHUNK_SIZE,
    };
    let mut recv = ReceiveSession::new(tib);
    let mut buf = AlignedBuf::new();
    assert_eq!(
        recv.handle(Message::Offer(o.clone()), &mut buf),
        Ok(Event::Offered)
    );
    let lookup = Lookup {
        room: Some(tib - 1),
        ..Lookup::default()
    };
    assert_eq!(
        recv.handle_lookup(lookup),
        OfferDecision::Refused {
            discard_partial: false
        }
    );
    let replies: Vec<Message> = std::iter::from_fn(|| recv.poll_transmit()).collect();
    assert!(
        matches!(&replies[..], [Message::Reject(r)] if r.code == ErrorCode::StorageFull && r.reason.contains("needs 1099511627776 more bytes")),
        "{replies:?}"
    );
    assert!(recv.is_done());

    // A partial that already holds all but one chunk needs only that chunk's room.
    let o = Offer {
        size: 100 * u64::from(MIN_CHUNK_SIZE),
        ..o
    };
    let mut recv = ReceiveSession::new(tib);
    recv.handle(Message::Offer(o.clone()), &mut buf).unwrap();
    let count = recv.layout().count();
    let mut have = ChunkSet::new(count);
    for i in 1..count {
        have.insert(i);
    }
    let partial = PartialState {
        size: o.size,
        mtime_ns: o.mtime_ns,
        file_hash: o.file_hash,
        chunk_size: o.chunk_size,
        have,
    };
    let lookup = Lookup {
        partial: Some(partial),
        room: Some(u64::from(MIN_CHUNK_SIZE)),
        ..Lookup::default()
    };
    assert_eq!(
        recv.handle_lookup(lookup),
        OfferDecision::Receive {
            discard_partial: false
        }
    );
    assert!(matches!(
        recv.poll_transmit(),
        Some(Message::Resume(r)) if r.missing == vec![crate::protocol::ChunkRange { start: 0, end: 1 }]
    ));
}

#[test]
fn agent_rejects_nonsense_ranges() {
    let src = data(3 * CS as usize, 0);
    let mut s = SendSession::new(offer("a", &src), 1);
    s.poll_transmit();
    let bad = crate::protocol::Resume {
        missing: vec![crate::protocol::ChunkRange { start: 2, end: 9 }],
    };
    assert!(matches!(
        s.handle(Message::Resume(bad)),
        Err(SessionError::BadRange { count: 3, .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// For any size and crash point, the resumed transfer sends exactly the chunks that
    /// were not verified before the crash, and the result is byte-identical.
    #[test]
    fn resume_after_any_crash_point(len in 0usize..(6 * CS as usize), crash in 0u32..8) {
        let mut disk = Disk::default();
        let src = data(len, 9);
        let count = len.div_ceil(CS as usize) as u32;
        let (first, sent1) = run(&mut disk, offer("r", &src), &src, &mut |_| {}, Some(crash));
        let (outcome, sent2) = run(&mut disk, offer("r", &src), &src, &mut |_| {}, None);
        if first.is_none() {
            prop_assert_eq!(sent1 + sent2, count, "no chunk sent twice");
        } else {
            prop_assert_eq!(sent2, 0);
        }
        prop_assert!(
            matches!(outcome, Some(Outcome::Stored { .. })),
            "outcome {:?}", outcome
        );
        prop_assert_eq!(&disk.published["r"].0, &src);
    }
}

#[test]
fn the_window_holds_back_chunks_until_they_are_acknowledged() {
    let src = data(3 * CS as usize, 0);
    let mut s = SendSession::new(offer("w", &src), 1);
    s.poll_transmit();
    s.handle(Message::Resume(crate::protocol::Resume {
        missing: vec![crate::protocol::ChunkRange { start: 0, end: 3 }],
    }))
    .unwrap();
    assert_eq!(s.next_chunk().map(|c| c.index), Some(0));
    s.handle_chunk_sent();
    assert_eq!(s.next_chunk(), None, "window of 1 is full");
    let ack = |index| Message::ChunkAck(crate::protocol::ChunkAck { index });
    assert!(matches!(
        s.handle(ack(1)),
        Err(SessionError::UnexpectedAck { index: 1 })
    ));
    s.handle(ack(0)).unwrap();
    assert_eq!(s.next_chunk().map(|c| c.index), Some(1));
}

/// Chunks sent on stripe streams share the file's window, and the commit waits until
/// the stripes acknowledged theirs: the receiver holds a chunk only once it said so, and
/// a commit that overtook a stripe's chunk would be rejected as incomplete.
#[test]
fn the_commit_waits_for_the_chunks_sent_on_stripes() {
    let src = data(3 * CS as usize, 0);
    let mut s = SendSession::new(offer_hashed("s", &src), 2);
    s.poll_transmit();
    s.handle(Message::Resume(crate::protocol::Resume {
        missing: vec![crate::protocol::ChunkRange { start: 0, end: 3 }],
    }))
    .unwrap();
    s.handle_chunk_sent_elsewhere();
    s.handle_chunk_sent();
    assert_eq!(
        s.next_chunk(),
        None,
        "one chunk here and one on a stripe fill a window of 2"
    );
    s.handle_ack_elsewhere().unwrap();
    s.handle_chunk_sent_elsewhere();
    assert_eq!(s.chunks_to_send(), 0);
    s.handle(Message::ChunkAck(crate::protocol::ChunkAck { index: 1 }))
        .unwrap();
    assert_eq!(
        s.poll_transmit(),
        None,
        "chunk 2 is not acknowledged on its stripe yet"
    );
    s.handle_ack_elsewhere().unwrap();
    assert!(matches!(s.poll_transmit(), Some(Message::Commit(c)) if c.chunks_sent == 3));
    assert!(
        s.handle_ack_elsewhere().is_err(),
        "an acknowledgement of a stripe with nothing in flight is a protocol error"
    );
}

/// A session ends with one verdict. Whatever arrives or completes after it (a frame from
/// an agent that keeps talking, a publish that finishes after a protocol error, a second
/// failure reported by the I/O layer) is refused without sending anything: an agent must
/// never read `Ack` after `Reject`, or a second verdict. Found by the `receive_session`
/// fuzz target.
#[test]
fn a_finished_session_sends_nothing_after_its_verdict() {
    let src = data(2 * CS as usize + 5, 1);
    let o = offer_hashed("v/one.fits", &src);
    let drain = |r: &mut ReceiveSession| -> Vec<Message> {
        std::iter::from_fn(|| r.poll_transmit()).collect()
    };
    let stray = || {
        Message::Chunk(Chunk {
            index: 0,
            codec: crate::protocol::Codec::Raw,
            raw_len: CS,
            chunk_hash: [0; 32],
            payload: vec![0; CS as usize].into(),
        })
    };
    let mut buf = AlignedBuf::new();

    // Already stored: the ack is the verdict; a later frame and a later failure add nothing.
    let mut recv = ReceiveSession::new(1 << 40);
    assert_eq!(
        recv.handle(Message::Offer(o.clone()), &mut buf),
        Ok(Event::Offered)
    );
    let lookup = Lookup {
        stored: o.file_hash.map(|hash| StoredVersion { size: o.size, hash }),
        ..Lookup::default()
    };
    assert_eq!(recv.handle_lookup(lookup), OfferDecision::AlreadyStored);
    assert!(recv.handle(stray(), &mut buf).is_err());
    recv.fail(reject(ErrorCode::Busy, "late"));
    recv.fail_instead(reject(ErrorCode::StorageError, "late"));
    let out = drain(&mut recv);
    assert!(
        matches!(&out[..], [Message::Ack(a)] if a.already_stored),
        "{out:?}"
    );
    assert!(recv.is_done());

    // A frame while the file is being published ends the session with a protocol error;
    // the publish that completes afterwards must not add an ack behind it.
    let small = data(10, 2);
    let o = offer("v/two.fits", &small);
    let mut recv = ReceiveSession::new(1 << 40);
    recv.handle(Message::Offer(o.clone()), &mut buf).unwrap();
    recv.handle_lookup(Lookup::default());
    assert!(matches!(drain(&mut recv)[..], [Message::Resume(_)]));
    let chunk = Message::Chunk(Chunk {
        index: 0,
        codec: crate::protocol::Codec::Raw,
        raw_len: 10,
        chunk_hash: hash_bytes(&small),
        payload: small.clone().into(),
    });
    let Ok(Event::Chunk(v)) = recv.handle(chunk, &mut buf) else {
        panic!("a valid chunk")
    };
    recv.handle_chunk_stored(v.index);
    assert!(matches!(drain(&mut recv)[..], [Message::ChunkAck(_)]));
    let commit = Message::Commit(crate::protocol::Commit {
        chunks_sent: 1,
        file_hash: hash_bytes(&small),
    });
    assert_eq!(recv.handle(commit, &mut buf), Ok(Event::Commit));
    assert!(recv.handle(stray(), &mut buf).is_err());
    recv.handle_published(Ok("agent/v/two.fits".into()));
    recv.handle_chunk_stored(0);
    let out = drain(&mut recv);
    assert!(
        matches!(&out[..], [Message::Reject(r)] if r.code == ErrorCode::Protocol),
        "{out:?}"
    );
    assert!(recv.is_done());
}
