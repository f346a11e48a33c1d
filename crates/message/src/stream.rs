//! Native messages on byte streams: a length prefix, the marker, the body.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::native::MARKER;
use crate::{Codec, DEFAULT_MAX_SIZE, Error, Message, NativeCodec};

/// Bytes of the length prefix.
const PREFIX: usize = 4;

/// A `tokio_util` codec for native messages on a byte stream (TCP, a Unix socket, a pipe).
///
/// Each frame is a 4-byte big-endian length, then that many bytes: the 5-byte
/// [`MARKER`] and a native body. A length above the limit is refused as soon as the prefix
/// arrives, before any buffer is grown for it; the stream cannot be resynchronised after that,
/// so the error ends it.
///
/// ```
/// use bytes::BytesMut;
/// use rylm_message::{Message, StreamCodec};
/// use tokio_util::codec::{Decoder, Encoder};
///
/// let mut codec = StreamCodec::default();
/// let mut buf = BytesMut::new();
/// codec.encode(Message::call("f", "x"), &mut buf)?;
/// assert_eq!(codec.decode(&mut buf)?, Some(Message::call("f", "x")));
/// assert!(buf.is_empty());
/// # Ok::<(), rylm_message::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct StreamCodec {
    body: NativeCodec,
}

impl Default for StreamCodec {
    fn default() -> Self {
        StreamCodec::with_max_size(DEFAULT_MAX_SIZE)
    }
}

impl StreamCodec {
    /// A codec that refuses frames whose body is above `max_size` bytes.
    pub fn with_max_size(max_size: usize) -> Self {
        StreamCodec {
            body: NativeCodec::with_max_size(max_size),
        }
    }
}

impl Decoder for StreamCodec {
    type Item = Message;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        let Some(prefix) = src.get(..PREFIX) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; PREFIX];
        len_bytes.copy_from_slice(prefix);
        let announced = u32::from_be_bytes(len_bytes) as usize;
        let limit = self.body.max_size().saturating_add(MARKER.len());
        if announced > limit {
            return Err(Error::TooLarge {
                size: announced,
                limit,
            });
        }
        if announced < MARKER.len() {
            // Consume the bad frame so that a caller who goes on does not loop on it.
            let take = (PREFIX + announced).min(src.len());
            src.advance(take);
            return Err(Error::malformed(
                "stream",
                format!("a frame of {announced} bytes cannot hold the marker"),
            ));
        }
        if src.len() < PREFIX + announced {
            src.reserve(PREFIX + announced - src.len());
            return Ok(None);
        }
        src.advance(PREFIX);
        let frame: Bytes = src.split_to(announced).freeze();
        NativeCodec::check_marker(&frame[..MARKER.len()])?;
        self.body.decode(frame.slice(MARKER.len()..)).map(Some)
    }
}

impl Encoder<&Message> for StreamCodec {
    type Error = Error;

    fn encode(&mut self, message: &Message, dst: &mut BytesMut) -> Result<(), Error> {
        let body = self.body.encode(message)?;
        let len = u32::try_from(MARKER.len() + body.len()).map_err(|_| Error::TooLarge {
            size: MARKER.len() + body.len(),
            limit: u32::MAX as usize,
        })?;
        dst.reserve(PREFIX + len as usize);
        dst.put_u32(len);
        dst.put_slice(&MARKER);
        dst.put_slice(&body);
        Ok(())
    }
}

impl Encoder<Message> for StreamCodec {
    type Error = Error;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), Error> {
        self.encode(&message, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_input_waits_and_oversize_prefix_is_refused_at_once() {
        let mut codec = StreamCodec::with_max_size(10);
        let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
        assert!(codec.decode(&mut buf).expect("waits").is_none());
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        let err = codec.decode(&mut buf).expect_err("refused");
        assert!(matches!(
            err,
            Error::TooLarge {
                size: 0xffff_ffff,
                limit: 15
            }
        ));
        assert!(
            buf.capacity() < 1024,
            "nothing was allocated for the announced frame"
        );
    }

    #[test]
    fn frames_arrive_byte_by_byte() {
        let mut codec = StreamCodec::default();
        let mut wire = BytesMut::new();
        let sent = Message::call("f", "payload").with_client("c");
        codec.encode(&sent, &mut wire).expect("encodes");
        codec.encode(&sent, &mut wire).expect("encodes");
        let mut buf = BytesMut::new();
        let mut received = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            if let Some(msg) = codec.decode(&mut buf).expect("valid") {
                received.push(msg);
            }
        }
        assert_eq!(received, vec![sent.clone(), sent]);
    }

    #[test]
    fn a_wrong_marker_is_reported() {
        let mut codec = StreamCodec::default();
        let mut buf = BytesMut::from(&b"\x00\x00\x00\x06RYLM\x09\x80"[..]);
        let err = codec.decode(&mut buf).expect_err("version 9");
        assert!(matches!(err, Error::UnsupportedVersion { found: 9, .. }));
    }
}
