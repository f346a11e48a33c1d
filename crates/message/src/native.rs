//! rylm's own wire format: MessagePack with named fields, behind a marker frame.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::check_size;
use crate::{Codec, DEFAULT_MAX_SIZE, Error, Function, Message, msgpack};

/// The version of the native wire format this build writes and reads.
pub const WIRE_VERSION: u8 = 1;

/// The first frame of every native ZeroMQ message: `RYLM` and the wire version.
pub const MARKER: [u8; 5] = [b'R', b'Y', b'L', b'M', WIRE_VERSION];

const NAME: &str = "native";

/// What goes on the wire, borrowed from a [`Message`]. Field order is the wire order.
#[derive(Serialize)]
struct WireOut<'a> {
    pipeline: &'a str,
    client: &'a str,
    stage: u32,
    function: &'a Function,
    cache: &'a str,
    headers: &'a BTreeMap<String, String>,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

/// What comes off the wire; the payload is borrowed from the input so that it can be sliced out
/// of the frame instead of copied. Missing fields take their empty values and unknown fields are
/// skipped, so that later versions can add fields.
#[derive(Deserialize)]
struct WireIn<'a> {
    #[serde(default)]
    pipeline: String,
    #[serde(default)]
    client: String,
    #[serde(default)]
    stage: u32,
    #[serde(default)]
    function: Function,
    #[serde(default)]
    cache: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default, borrow, with = "serde_bytes")]
    payload: &'a [u8],
}

/// rylm's native codec: the envelope as a MessagePack map with named fields and the payload
/// as binary.
///
/// As ZeroMQ frames a message is `[MARKER, body]`; [`StreamCodec`](crate::StreamCodec) carries
/// the same body on byte streams. See `docs/wire-format.md` for the bytes.
#[derive(Clone, Copy, Debug)]
pub struct NativeCodec {
    max_size: usize,
}

impl Default for NativeCodec {
    fn default() -> Self {
        NativeCodec {
            max_size: DEFAULT_MAX_SIZE,
        }
    }
}

impl NativeCodec {
    /// A codec that refuses bodies above `max_size` bytes.
    pub fn with_max_size(max_size: usize) -> Self {
        NativeCodec { max_size }
    }

    /// Checks the marker frame of a native message.
    pub fn check_marker(frame: &[u8]) -> Result<(), Error> {
        match frame {
            [b'R', b'Y', b'L', b'M', version] if *version == WIRE_VERSION => Ok(()),
            [b'R', b'Y', b'L', b'M', version] => Err(Error::UnsupportedVersion {
                found: *version,
                supported: WIRE_VERSION,
            }),
            _ => Err(Error::NotRylm {
                found: Error::preview(frame),
            }),
        }
    }
}

impl Codec for NativeCodec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn max_size(&self) -> usize {
        self.max_size
    }

    fn encode(&self, message: &Message) -> Result<Bytes, Error> {
        let wire = WireOut {
            pipeline: &message.pipeline,
            client: &message.client,
            stage: message.stage,
            function: &message.function,
            cache: &message.cache,
            headers: &message.headers,
            payload: &message.payload,
        };
        let body = rmp_serde::to_vec_named(&wire).map_err(|e| Error::Unrepresentable {
            codec: NAME,
            reason: e.to_string(),
        })?;
        check_size(body.len(), self.max_size)?;
        Ok(Bytes::from(body))
    }

    fn decode(&self, body: Bytes) -> Result<Message, Error> {
        check_size(body.len(), self.max_size)?;
        let end = msgpack::walk_msgpack(&body, |_| ())?;
        if end != body.len() {
            return Err(Error::malformed(
                NAME,
                format!("{} bytes follow the message", body.len() - end),
            ));
        }
        let wire: WireIn<'_> =
            rmp_serde::from_slice(&body).map_err(|e| Error::malformed(NAME, e))?;
        let payload = if wire.payload.is_empty() {
            Bytes::new()
        } else {
            body.slice_ref(wire.payload)
        };
        Ok(Message {
            pipeline: wire.pipeline,
            client: wire.client,
            stage: wire.stage,
            function: wire.function,
            cache: wire.cache,
            headers: wire.headers,
            payload,
        })
    }

    fn encode_frames(&self, message: &Message) -> Result<Vec<Bytes>, Error> {
        Ok(vec![Bytes::from_static(&MARKER), self.encode(message)?])
    }

    fn decode_frames(&self, frames: &[Bytes]) -> Result<Message, Error> {
        match frames {
            [marker, body] => {
                Self::check_marker(marker)?;
                self.decode(body.clone())
            }
            [only] => {
                // Say "another protocol" rather than "wrong count" when a lone frame is not ours.
                Self::check_marker(only)?;
                Err(Error::FrameCount {
                    expected: 2,
                    found: 1,
                })
            }
            [marker, ..] => {
                Self::check_marker(marker)?;
                Err(Error::FrameCount {
                    expected: 2,
                    found: frames.len(),
                })
            }
            [] => Err(Error::FrameCount {
                expected: 2,
                found: 0,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_binary_and_sliced_not_copied() {
        let codec = NativeCodec::default();
        let body = codec
            .encode(&Message::call("s.f", vec![1u8, 2, 3]))
            .expect("encodes");
        // bin8 of length 3, not an array of integers
        assert!(body.windows(5).any(|w| w == [0xc4, 3, 1, 2, 3]));
        let decoded = codec.decode(body.clone()).expect("decodes");
        let inside = body.as_ptr_range();
        assert!(inside.contains(&decoded.payload.as_ptr()));
    }

    #[test]
    fn marker_errors_say_what_was_found() {
        let codec = NativeCodec::default();
        let body = codec.encode(&Message::call("f", "x")).expect("encodes");
        let err = codec
            .decode_frames(&[Bytes::from_static(b"RYLM\x02"), body.clone()])
            .expect_err("version 2");
        assert!(matches!(
            err,
            Error::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ));
        let err = codec
            .decode_frames(&[Bytes::from_static(b"\x0a\x03abc")])
            .expect_err("a protobuf frame");
        assert!(err.to_string().contains("0a03616263"), "{err}");
        let err = codec.decode_frames(&[]).expect_err("nothing");
        assert!(matches!(
            err,
            Error::FrameCount {
                expected: 2,
                found: 0
            }
        ));
    }

    #[test]
    fn trailing_bytes_and_limits_are_refused() {
        let codec = NativeCodec::with_max_size(64);
        let mut body = codec
            .encode(&Message::call("f", "x"))
            .expect("encodes")
            .to_vec();
        body.push(0);
        assert!(codec.decode(body.into()).is_err());
        let big = Message::call("f", vec![0u8; 100]);
        assert!(matches!(
            codec.encode(&big),
            Err(Error::TooLarge { limit: 64, .. })
        ));
        assert!(matches!(
            codec.decode(Bytes::from(vec![0u8; 65])),
            Err(Error::TooLarge { size: 65, .. })
        ));
    }

    #[test]
    fn missing_fields_are_empty_and_unknown_fields_skipped() {
        // {"function": "f", "future": [1]}
        let body = [
            0x82, 0xa8, b'f', b'u', b'n', b'c', b't', b'i', b'o', b'n', 0xa1, b'f', 0xa6, b'f',
            b'u', b't', b'u', b'r', b'e', 0x91, 0x01,
        ];
        let msg = NativeCodec::default()
            .decode(Bytes::copy_from_slice(&body))
            .expect("decodes");
        assert_eq!(msg, Message::call("f", ""));
    }
}
