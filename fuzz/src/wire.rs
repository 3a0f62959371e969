//! Messages through the real codec, as a peer's frames reach a session.

use bytes::BytesMut;
use skyferry_common::protocol::{decode, FrameError, Message};

/// Encodes `msg` as a peer would and decodes it as a reader with limit `max` does.
///
/// `None` when the peer cannot encode it at all (e.g. a path over the string limit),
/// `Some(Err)` when the reader refuses the frame, `Some(Ok)` with the message as it
/// arrives, which must be the message sent.
pub fn transmit(msg: &Message, max: usize) -> Option<Result<Message, FrameError>> {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf).ok()?;
    let len = buf.len();
    Some(match decode(&mut buf, max) {
        Ok(Some(got)) => {
            assert!(
                buf.is_empty(),
                "one frame of {len} bytes left {} bytes",
                buf.len()
            );
            assert_eq!(&got, msg, "a message changed on the wire");
            Ok(got)
        }
        Ok(None) => panic!(
            "a whole {} frame of {len} bytes decoded as incomplete",
            msg.kind()
        ),
        Err(e) => Err(e),
    })
}
