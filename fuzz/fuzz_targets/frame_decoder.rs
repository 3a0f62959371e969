//! Fuzz target: the frame codec (`protocol::decode`, `decode_body`, `frame_len`).
//!
//! The first bytes of the input pick a frame limit (the control limit, the data limit
//! of the smallest, the largest or any chunk size, or a tiny one) and how to cut the
//! rest into pieces; the rest is a byte stream as a peer would send it.
//!
//! Checked:
//! - no panic, and no allocation beyond the limit (libFuzzer's malloc limit catches a
//!   decoder that reserves what a length prefix claims before checking it);
//! - decoding the whole stream at once and feeding it in pieces give the same
//!   messages, the same error and the same leftover bytes;
//! - `decode` consumes nothing while a frame is incomplete, exactly one frame on
//!   success, and leaves an empty or too-large prefix in place;
//! - the limit is inclusive: a frame of exactly `max` bytes is accepted, `max - 1`
//!   refuses it;
//! - every decoded message re-encodes to exactly the bytes it came from (the encoding
//!   is canonical), `encode_header` plus the payload gives the same bytes, and
//!   decoding them again gives the same message.
#![no_main]

use arbitrary::{Result, Unstructured};
use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use skyferry_common::protocol::{
    decode, frame_len, max_data_frame, FrameError, Message, MAX_CHUNK_SIZE, MAX_CONTROL_FRAME,
    MIN_CHUNK_SIZE,
};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut Unstructured) -> Result<()> {
    let max = match u.int_in_range(0u8..=5)? {
        0 | 1 => MAX_CONTROL_FRAME,
        2 => max_data_frame(MIN_CHUNK_SIZE),
        3 => max_data_frame(MAX_CHUNK_SIZE),
        4 => max_data_frame(u.int_in_range(0..=MAX_CHUNK_SIZE)?),
        _ => usize::from(u.arbitrary::<u8>()?),
    };
    let cuts: Vec<u8> = u.arbitrary()?;
    let stream = u.bytes(u.len())?;

    let whole = decode_all(stream, max);
    let pieces = decode_in_pieces(stream, &cuts, max);
    assert_eq!(
        whole.messages, pieces.messages,
        "pieces decode to other messages"
    );
    assert_eq!(whole.error, pieces.error, "pieces end with another error");
    assert_eq!(whole.rest, pieces.rest, "pieces leave other bytes");
    Ok(())
}

/// What decoding a stream produced.
#[derive(Debug, Default)]
struct Decoded {
    messages: Vec<Message>,
    /// The error that ended the stream, as text (`FrameError` is not `PartialEq`).
    error: Option<String>,
    /// Bytes left in the buffer at the end.
    rest: Vec<u8>,
}

fn decode_all(stream: &[u8], max: usize) -> Decoded {
    let mut out = Decoded::default();
    let mut buf = BytesMut::from(stream);
    drain(&mut buf, max, &mut out);
    out.rest = buf.to_vec();
    out
}

/// Feeds the stream in pieces whose sizes come from `cuts` (0 means one byte), decoding
/// after every piece, as a reader does with what the network delivers.
fn decode_in_pieces(stream: &[u8], cuts: &[u8], max: usize) -> Decoded {
    let mut out = Decoded::default();
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut sizes = cuts.iter().cycle();
    while !rest.is_empty() && out.error.is_none() {
        let n = sizes
            .next()
            .map_or(rest.len(), |&c| usize::from(c).max(1))
            .min(rest.len());
        let (piece, tail) = rest.split_at(n);
        buf.extend_from_slice(piece);
        rest = tail;
        drain(&mut buf, max, &mut out);
    }
    // After an error the reader stops; the unread bytes count as left over.
    buf.extend_from_slice(rest);
    out.rest = buf.to_vec();
    out
}

/// Decodes frames off the front of `buf` until it needs more bytes or fails.
fn drain(buf: &mut BytesMut, max: usize, out: &mut Decoded) {
    while out.error.is_none() {
        let before = buf.clone();
        match decode(buf, max) {
            Ok(Some(msg)) => {
                let used = before.len() - buf.len();
                assert!(used >= 5, "a frame of {used} bytes");
                assert!(
                    used - 4 <= max,
                    "a {used}-byte frame passed the limit {max}"
                );
                assert_eq!(&before[used..], &buf[..], "decode consumed past its frame");
                check_frame(&before[..used], &msg, max);
                out.messages.push(msg);
            }
            Ok(None) => {
                assert_eq!(&before[..], &buf[..], "an incomplete frame was consumed");
                if let Some(header) = before.first_chunk::<4>() {
                    let len = u32::from_be_bytes(*header) as usize;
                    assert!(
                        len > 0 && len <= max,
                        "prefix {len} accepted with limit {max}"
                    );
                    assert!(before.len() < len + 4, "a whole frame reported incomplete");
                } else {
                    assert!(before.len() < 4);
                }
                return;
            }
            Err(e) => {
                let header = before.first_chunk::<4>().expect("an error needs a prefix");
                let len = u32::from_be_bytes(*header) as usize;
                match e {
                    FrameError::Empty | FrameError::FrameTooLarge { .. } => {
                        assert!(len == 0 || len > max, "{e} for prefix {len}, limit {max}");
                        assert_eq!(&before[..], &buf[..], "a refused prefix was consumed");
                        assert!(frame_len(*header, max).is_err());
                    }
                    _ => {
                        assert!(len > 0 && len <= max, "{e} for prefix {len}, limit {max}");
                        assert_eq!(
                            before.len() - buf.len(),
                            len + 4,
                            "a bad frame not consumed"
                        );
                    }
                }
                out.error = Some(e.to_string());
                return;
            }
        }
    }
}

/// A decoded message and the frame it came from.
fn check_frame(frame: &[u8], msg: &Message, max: usize) {
    let header = frame
        .first_chunk::<4>()
        .expect("a whole frame has a prefix");
    let len = frame.len() - 4;
    assert_eq!(
        frame_len(*header, len).ok(),
        Some(len),
        "limit must be inclusive"
    );
    assert!(
        frame_len(*header, len - 1).is_err(),
        "a frame over the limit passed"
    );
    assert_eq!(frame_len(*header, max).ok(), Some(len));

    let mut again = BytesMut::new();
    msg.encode(&mut again)
        .unwrap_or_else(|e| panic!("decoded {} does not re-encode: {e}", msg.kind()));
    assert_eq!(
        &again[..],
        frame,
        "{} re-encodes to other bytes",
        msg.kind()
    );

    let mut header_only = BytesMut::new();
    let payload = msg
        .encode_header(&mut header_only)
        .unwrap_or_else(|e| panic!("decoded {} has no header: {e}", msg.kind()));
    if let Some(p) = payload {
        header_only.put_slice(&p);
    }
    assert_eq!(
        &header_only[..],
        frame,
        "{}: encode_header + payload differ",
        msg.kind()
    );

    let round = decode(&mut again, max)
        .unwrap_or_else(|e| panic!("re-encoded {} does not decode: {e}", msg.kind()))
        .expect("a whole frame");
    assert!(again.is_empty());
    assert_eq!(&round, msg, "a message changed in a round trip");
}
