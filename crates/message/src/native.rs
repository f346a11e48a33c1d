//! rylm's own wire format: MessagePack with named fields, behind a marker frame.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Serialize;

use crate::codec::check_size;
use crate::msgpack::{self, MsgpackKind};
use crate::view::NativeView;
use crate::{Codec, DEFAULT_MAX_SIZE, Error, Function, Message};

/// The version of the native wire format this build writes and reads.
pub const WIRE_VERSION: u8 = 1;

/// The first frame of every native ZeroMQ message: `RYLM` and the wire version.
pub const MARKER: [u8; 5] = [b'R', b'Y', b'L', b'M', WIRE_VERSION];

pub(crate) const NAME: &str = "native";

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

/// A cursor over a native body.
pub(crate) struct Reader<'a> {
    pub(crate) body: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(body: &'a [u8]) -> Reader<'a> {
        Reader { body, pos: 0 }
    }

    /// The next item's kind and content (of a string, byte string or extension).
    pub(crate) fn item(&mut self) -> Result<(MsgpackKind, &'a [u8]), Error> {
        let item = msgpack::read_item(self.body, self.pos, 0)?;
        self.pos = item.offset + item.head.len() + item.data.len();
        Ok((item.kind, item.data))
    }

    pub(crate) fn wrong(&self, what: &str, expected: &str, found: MsgpackKind) -> Error {
        Error::malformed(
            NAME,
            format!(
                "{what} should be {expected}, found {found:?} before byte {}",
                self.pos
            ),
        )
    }

    pub(crate) fn str(&mut self, what: &str) -> Result<&'a str, Error> {
        let bytes = self.str_bytes(what)?;
        std::str::from_utf8(bytes)
            .map_err(|_| Error::malformed(NAME, format!("{what} is not UTF-8")))
    }

    /// The next item's bytes, which must be a string's (not yet checked as UTF-8).
    pub(crate) fn str_bytes(&mut self, what: &str) -> Result<&'a [u8], Error> {
        // The common case without the general reader: a string under 256 bytes, whose head is
        // one byte (under 32) or two.
        let at = self.pos;
        let head = match self.body.get(at) {
            Some(&marker @ 0xa0..=0xbf) => Some((1, usize::from(marker & 0x1f))),
            Some(0xd9) => self.body.get(at + 1).map(|&len| (2, usize::from(len))),
            _ => None,
        };
        if let Some((head, len)) = head
            && let Some(data) = self.body.get(at + head..at + head + len)
        {
            self.pos = at + head + len;
            return Ok(data);
        }
        match self.item()? {
            (MsgpackKind::Str, data) => Ok(data),
            (kind, _) => Err(self.wrong(what, "a string", kind)),
        }
    }

    /// Skips one value of any shape (nesting is bounded by the walker).
    pub(crate) fn skip(&mut self) -> Result<(), Error> {
        let rest = self.body.get(self.pos..).unwrap_or_default();
        self.pos += msgpack::walk_msgpack(rest, |_| ())?;
        Ok(())
    }

    pub(crate) fn stage(&mut self) -> Result<u32, Error> {
        let value = match self.item()? {
            (MsgpackKind::Uint(n), _) => Some(n),
            (MsgpackKind::Int(n), _) => u64::try_from(n).ok(),
            (kind, _) => return Err(self.wrong("`stage`", "an integer", kind)),
        };
        value
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::malformed(NAME, "`stage` is out of range"))
    }
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

    /// `codec` as the native codec, with its size limit, when it is one: for a part that reads
    /// native frames in place ([`NativeCodec::view`]) and decodes those of any other codec.
    pub fn when_native(codec: &dyn Codec) -> Option<NativeCodec> {
        (codec.name() == NAME).then(|| NativeCodec::with_max_size(codec.max_size()))
    }

    /// Reads the frames of a native message in place (see [`NativeView`]): what
    /// [`Codec::decode_frames`] accepts, without building the owned message. For a router that
    /// reads a header or two and passes the frames on as they came.
    pub fn view<'a>(&self, frames: &'a [Bytes]) -> Result<NativeView<'a>, Error> {
        match frames {
            [marker, body] => self.view_parts(marker, body),
            _ => Err(self
                .decode_frames(frames)
                .err()
                .unwrap_or(Error::FrameCount {
                    expected: 2,
                    found: frames.len(),
                })),
        }
    }

    /// [`NativeCodec::view`] of a message's two frames, borrowed from wherever they are (a
    /// received message read in place).
    pub fn view_parts<'a>(&self, marker: &[u8], body: &'a [u8]) -> Result<NativeView<'a>, Error> {
        Self::check_marker(marker)?;
        check_size(body.len(), self.max_size)?;
        NativeView::read(body)
    }

    /// Decodes a message from its two frames, the marker borrowed (a received message read in
    /// place): [`Codec::decode_frames`] without a vector of frames.
    pub fn decode_parts(&self, marker: &[u8], body: Bytes) -> Result<Message, Error> {
        Self::check_marker(marker)?;
        self.decode(body)
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

/// About how many bytes the native body of `message` takes: its strings and payload, and room
/// for the field names and MessagePack heads.
fn encoded_size_hint(message: &Message) -> usize {
    body_size_hint(
        [&message.pipeline, &message.client, &message.cache],
        &message.function,
        message
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
        message.payload.len(),
    )
}

/// About how many bytes a native body of these fields takes (`strings`: its pipeline, client
/// and cache), with room for the field names and MessagePack heads: the capacity both encoders
/// start from.
pub(crate) fn body_size_hint<'h>(
    strings: [&str; 3],
    function: &Function,
    headers: impl Iterator<Item = (&'h str, &'h str)>,
    payload: usize,
) -> usize {
    const FIELDS: usize = 96;
    const PER_ITEM: usize = 5;
    let function = match function {
        Function::Single(name) => name.len() + PER_ITEM,
        Function::Stages(names) => {
            names.iter().map(|n| n.len() + PER_ITEM).sum::<usize>() + PER_ITEM
        }
    };
    let headers: usize = headers
        .map(|(name, value)| name.len() + value.len() + 2 * PER_ITEM)
        .sum();
    FIELDS + strings.iter().map(|s| s.len()).sum::<usize>() + function + headers + payload
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
        // Sized up front: growing from empty would reallocate five or six times per message.
        let mut body = Vec::with_capacity(encoded_size_hint(message));
        rmp_serde::encode::write_named(&mut body, &wire).map_err(|e| Error::Unrepresentable {
            codec: NAME,
            reason: e.to_string(),
        })?;
        check_size(body.len(), self.max_size)?;
        Ok(Bytes::from(body))
    }

    fn decode(&self, body: Bytes) -> Result<Message, Error> {
        check_size(body.len(), self.max_size)?;
        let view = NativeView::read(&body)?;
        let payload = if view.payload().is_empty() {
            Bytes::new()
        } else {
            body.slice_ref(view.payload())
        };
        Ok(Message {
            pipeline: view.pipeline().to_owned(),
            client: view.client().to_owned(),
            stage: view.stage(),
            function: view.function(),
            cache: view.cache().to_owned(),
            headers: view
                .headers()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
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

    /// A map of `fields` (each a name and the bytes of its value).
    fn body_of(fields: &[(&str, &[u8])]) -> Bytes {
        let mut body = vec![0x80 | fields.len() as u8];
        for (name, value) in fields {
            body.push(0xa0 | name.len() as u8);
            body.extend_from_slice(name.as_bytes());
            body.extend_from_slice(value);
        }
        Bytes::from(body)
    }

    #[test]
    fn every_field_reads_back_in_one_pass() {
        let message = Message::call(
            Function::Stages(vec!["a.b".into(), "c.d".into()]),
            vec![7u8; 300],
        )
        .with_pipeline("p")
        .with_client("c")
        .with_cache("k")
        .with_stage(1)
        .with_header("x", "y");
        let codec = NativeCodec::default();
        let body = codec.encode(&message).expect("encodes");
        assert_eq!(codec.decode(body).expect("decodes"), message);
        // A stage written as a signed integer and a payload written as a string still read.
        let body = body_of(&[("stage", &[0xd0, 0x02]), ("payload", &[0xa1, b'z'])]);
        let decoded = codec.decode(body).expect("decodes");
        assert_eq!((decoded.stage, &decoded.payload[..]), (2, &b"z"[..]));
    }

    #[test]
    fn wrong_shapes_are_refused_with_the_field_named() {
        let codec = NativeCodec::default();
        let refused = |fields: &[(&str, &[u8])]| {
            codec
                .decode(body_of(fields))
                .expect_err("refused")
                .to_string()
        };
        assert!(refused(&[("stage", &[0xff])]).contains("out of range"));
        assert!(refused(&[("stage", &[0xcf, 1, 0, 0, 0, 0, 0, 0, 0])]).contains("out of range"));
        assert!(refused(&[("client", &[0x01])]).contains("`client`"));
        assert!(refused(&[("headers", &[0x81, 0xa1, b'a', 0x01])]).contains("header value"));
        assert!(refused(&[("function", &[0xc0])]).contains("`function`"));
        assert!(refused(&[("payload", &[0x91, 0x01])]).contains("`payload`"));
        assert!(refused(&[("cache", &[0xa1, 0xff])]).contains("UTF-8"));
        assert!(
            refused(&[("client", &[0xa1, b'a']), ("client", &[0xa1, b'b'])])
                .contains("duplicate field `client`")
        );
        // A top-level array, a map cut short, and an unknown field nested past the walker's
        // limit: errors, never a panic or a deep recursion.
        assert!(codec.decode(Bytes::from_static(&[0x91, 0x01])).is_err());
        assert!(
            codec
                .decode(Bytes::from_static(&[0x82, 0xa1, b'a']))
                .is_err()
        );
        let deep = vec![0x91; 10_000];
        assert!(codec.decode(body_of(&[("future", &deep)])).is_err());
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
