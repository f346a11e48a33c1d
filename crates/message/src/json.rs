//! The envelope as a JSON object, for peers that speak JSON.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::check_size;
use crate::{Codec, DEFAULT_MAX_SIZE, Error, Function, Message};

const NAME: &str = "json";

#[derive(Serialize)]
struct JsonOut<'a> {
    pipeline: &'a str,
    client: &'a str,
    stage: u32,
    function: &'a Function,
    cache: &'a str,
    headers: &'a BTreeMap<String, String>,
    payload: String,
}

#[derive(Deserialize)]
struct JsonIn {
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
    #[serde(default)]
    payload: String,
}

/// The envelope as one JSON object with the same field names as the native format; the payload
/// is a base64 string (standard alphabet, padded), as Go's `encoding/json` writes byte slices.
///
/// ```
/// use rylm_message::{Codec, JsonCodec, Message};
/// let body = JsonCodec::default().encode(&Message::call("echo", "hi"))?;
/// assert!(std::str::from_utf8(&body).unwrap().contains(r#""payload":"aGk=""#));
/// # Ok::<(), rylm_message::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct JsonCodec {
    max_size: usize,
}

impl Default for JsonCodec {
    fn default() -> Self {
        JsonCodec {
            max_size: DEFAULT_MAX_SIZE,
        }
    }
}

impl JsonCodec {
    /// A codec that refuses bodies above `max_size` bytes.
    pub fn with_max_size(max_size: usize) -> Self {
        JsonCodec { max_size }
    }
}

impl Codec for JsonCodec {
    fn name(&self) -> &'static str {
        NAME
    }

    fn max_size(&self) -> usize {
        self.max_size
    }

    fn encode(&self, message: &Message) -> Result<Bytes, Error> {
        let wire = JsonOut {
            pipeline: &message.pipeline,
            client: &message.client,
            stage: message.stage,
            function: &message.function,
            cache: &message.cache,
            headers: &message.headers,
            payload: BASE64.encode(&message.payload),
        };
        let body = serde_json::to_vec(&wire).map_err(|e| Error::Unrepresentable {
            codec: NAME,
            reason: e.to_string(),
        })?;
        check_size(body.len(), self.max_size)?;
        Ok(Bytes::from(body))
    }

    fn decode(&self, body: Bytes) -> Result<Message, Error> {
        check_size(body.len(), self.max_size)?;
        let wire: JsonIn = serde_json::from_slice(&body).map_err(|e| Error::malformed(NAME, e))?;
        let payload = BASE64
            .decode(wire.payload.as_bytes())
            .map_err(|e| Error::malformed(NAME, format!("payload is not base64: {e}")))?;
        Ok(Message {
            pipeline: wire.pipeline,
            client: wire.client,
            stage: wire.stage,
            function: wire.function,
            cache: wire.cache,
            headers: wire.headers,
            payload: Bytes::from(payload),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_a_json_array() {
        let msg = Message::call(Function::stages(["a.x", "b.y"]), "").with_stage(1);
        let body = JsonCodec::default().encode(&msg).expect("encodes");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["function"], serde_json::json!(["a.x", "b.y"]));
        assert_eq!(value["stage"], 1);
    }

    #[test]
    fn bad_payload_and_bad_types_are_errors() {
        let codec = JsonCodec::default();
        for input in [
            &br#"{"payload":"***"}"#[..],
            br#"{"stage":-1}"#,
            br#"{"function":7}"#,
            br#"[1,2]"#,
            br#"{"payload":"aGk="} trailing"#,
        ] {
            let err = codec
                .decode(Bytes::from_static(input))
                .expect_err("refused");
            assert!(
                matches!(err, Error::Malformed { codec: "json", .. }),
                "{err}"
            );
        }
    }
}
