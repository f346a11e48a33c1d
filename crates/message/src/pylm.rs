//! pylm's `PalmMessage` (protobuf), so that real pylm peers can join a rylm cluster.

use bytes::Bytes;
use prost::Message as _;

use crate::codec::check_size;
use crate::{Codec, DEFAULT_MAX_SIZE, Error, Function, Message};

const NAME: &str = "pylm";

/// pylm's proto3 message, field for field:
///
/// ```text
/// message PalmMessage { string pipeline = 1; string client = 2; int64 stage = 3;
///                       string function = 4; string cache = 5; bytes payload = 6; }
/// ```
///
/// Use [`PylmCodec`] to convert from and to [`Message`]; this type is for code that needs the
/// raw fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PalmMessage {
    /// The stream id.
    #[prost(string, tag = "1")]
    pub pipeline: String,
    /// The client id, also the PUB topic of its results.
    #[prost(string, tag = "2")]
    pub client: String,
    /// Index into `function` when it is a space-separated list.
    #[prost(int64, tag = "3")]
    pub stage: i64,
    /// `server.method`, or several separated by spaces.
    #[prost(string, tag = "4")]
    pub function: String,
    /// A cache key.
    #[prost(string, tag = "5")]
    pub cache: String,
    /// The opaque payload.
    #[prost(bytes = "bytes", tag = "6")]
    pub payload: Bytes,
}

/// pylm 0.13+'s wire format: one `PalmMessage` per frame.
///
/// The mapping to [`Message`]: a list of stages is written as pylm writes it, names joined by
/// single spaces, and a function string with whitespace in it is read back as a list of stages.
/// pylm has no headers: they are not written (a pylm peer could not keep them), and a message
/// read from pylm has none. A name that pylm would split differently (one containing
/// whitespace, or an empty stage) is refused with [`Error::Unrepresentable`] instead of being
/// sent garbled.
///
/// ```
/// use rylm_message::{Codec, Message, PylmCodec};
/// let body = PylmCodec::default().encode(&Message::call("fake.foo", "hello"))?;
/// assert_eq!(&body[..], b"\x22\x08fake.foo\x32\x05hello");
/// # Ok::<(), rylm_message::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct PylmCodec {
    max_size: usize,
}

impl Default for PylmCodec {
    fn default() -> Self {
        PylmCodec {
            max_size: DEFAULT_MAX_SIZE,
        }
    }
}

impl PylmCodec {
    /// A codec that refuses messages above `max_size` bytes.
    pub fn with_max_size(max_size: usize) -> Self {
        PylmCodec { max_size }
    }

    /// The message as pylm would see it: what this codec can carry of `message`.
    pub fn to_palm(message: &Message) -> Result<PalmMessage, Error> {
        Ok(PalmMessage {
            pipeline: message.pipeline.clone(),
            client: message.client.clone(),
            stage: i64::from(message.stage),
            function: function_to_pylm(&message.function)?,
            cache: message.cache.clone(),
            payload: message.payload.clone(),
        })
    }

    /// A [`Message`] from pylm's fields.
    pub fn from_palm(palm: PalmMessage) -> Result<Message, Error> {
        let stage = u32::try_from(palm.stage).map_err(|_| {
            Error::malformed(
                NAME,
                format!("stage {} is not a valid stage index", palm.stage),
            )
        })?;
        let function = if palm.function.split_whitespace().nth(1).is_some() {
            Function::stages(palm.function.split_whitespace())
        } else {
            Function::Single(palm.function)
        };
        Ok(Message {
            pipeline: palm.pipeline,
            client: palm.client,
            stage,
            function,
            cache: palm.cache,
            headers: Default::default(),
            payload: palm.payload,
        })
    }
}

fn function_to_pylm(function: &Function) -> Result<String, Error> {
    let refuse = |reason: String| Error::Unrepresentable {
        codec: NAME,
        reason,
    };
    match function {
        Function::Single(name) if name.contains(char::is_whitespace) => Err(refuse(format!(
            "function name {name:?} contains whitespace, which pylm reads as a list of stages"
        ))),
        Function::Single(name) => Ok(name.clone()),
        Function::Stages(names) => {
            if let Some(bad) = names
                .iter()
                .find(|n| n.is_empty() || n.contains(char::is_whitespace))
            {
                return Err(refuse(format!(
                    "stage name {bad:?} is empty or contains whitespace, which pylm cannot keep apart"
                )));
            }
            Ok(names.join(" "))
        }
    }
}

impl Codec for PylmCodec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn max_size(&self) -> usize {
        self.max_size
    }

    fn encode(&self, message: &Message) -> Result<Bytes, Error> {
        let palm = Self::to_palm(message)?;
        check_size(palm.encoded_len(), self.max_size)?;
        Ok(Bytes::from(palm.encode_to_vec()))
    }

    fn decode(&self, body: Bytes) -> Result<Message, Error> {
        check_size(body.len(), self.max_size)?;
        let palm = PalmMessage::decode(body).map_err(|e| Error::malformed(NAME, e))?;
        Self::from_palm(palm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request a real pylm client pushed to a server (from the spec's capture).
    #[test]
    fn decodes_the_captured_client_request() {
        let pipeline = "7b0c7f4f-3b5e-4f5e-9a43-0c5b7d0e6a11";
        let client = "5a2d1c3e-8f47-4b1a-b0c2-9d8e7f6a5b4c";
        let mut wire = vec![0x0a, 0x24];
        wire.extend_from_slice(pipeline.as_bytes());
        wire.extend_from_slice(&[0x12, 0x24]);
        wire.extend_from_slice(client.as_bytes());
        wire.extend_from_slice(b"\x22\x08fake.foo\x32\x05hello");
        let codec = PylmCodec::default();
        let msg = codec.decode(Bytes::from(wire.clone())).expect("decodes");
        assert_eq!(msg.pipeline, pipeline);
        assert_eq!(msg.client, client);
        assert_eq!(msg.stage, 0);
        assert_eq!(msg.function, Function::from("fake.foo"));
        assert_eq!(msg.cache, "");
        assert_eq!(&msg.payload[..], b"hello");
        assert_eq!(&codec.encode(&msg).expect("encodes")[..], &wire[..]);
    }

    /// The reply a real pylm server published (topic frame, then the message).
    #[test]
    fn encodes_the_captured_server_reply() {
        let wire = b"\x0a\x06pipe-1\x12\x0bclient-1234\x22\x0dmy_server.foo\x32\x0fyou sent me raw";
        let reply = Message::call("my_server.foo", "you sent me raw")
            .with_pipeline("pipe-1")
            .with_client("client-1234");
        let codec = PylmCodec::default();
        assert_eq!(&codec.encode(&reply).expect("encodes")[..], &wire[..]);
        assert_eq!(
            codec.decode(Bytes::from_static(wire)).expect("decodes"),
            reply
        );
    }

    #[test]
    fn stages_travel_space_separated() {
        let msg = Message::call(Function::stages(["a.one", "b.two"]), "x").with_stage(1);
        let codec = PylmCodec::default();
        let body = codec.encode(&msg).expect("encodes");
        assert!(body.windows(11).any(|w| w == b"a.one b.two"));
        assert_eq!(codec.decode(body).expect("decodes"), msg);
    }

    #[test]
    fn refuses_what_pylm_would_garble_or_cannot_hold() {
        let codec = PylmCodec::default();
        assert!(codec.encode(&Message::call("a b", "")).is_err());
        assert!(
            codec
                .encode(&Message::call(Function::stages(["a", ""]), ""))
                .is_err()
        );
        let negative = PalmMessage {
            stage: -1,
            ..Default::default()
        };
        let err = codec
            .decode(Bytes::from(negative.encode_to_vec()))
            .expect_err("negative stage");
        assert!(err.to_string().contains("stage -1"), "{err}");
        let bad_utf8 = Bytes::from_static(b"\x0a\x02\xff\xfe");
        assert!(codec.decode(bad_utf8).is_err());
    }
}
