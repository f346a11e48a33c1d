//! The text framing of Brubeck services 0.1.4, for peers that still speak it.
//!
//! One text frame; the sender id, then fields separated by single spaces, each written as
//! `<len>:<data>` (a length prefix in bytes, no type suffix); the last three (request) or five
//! (response) fields are concatenated without separators. Socket layout: the caller binds a
//! PUSH socket for requests and a DEALER (identity = its sender id) for responses; the service
//! connects a PULL and a ROUTER, and answers `[sender_id, "", frame]`. See
//! [`REQUEST_SOCKETS`] and [`RESPONSE_SOCKETS`].
//!
//! This framing carries the shared secret in clear text (the `passphrase` field): use it only
//! where the peers cannot move to the native protocol.

use serde_json::{Map, Value};

use crate::Error;

/// Requests: the caller binds PUSH at `service_addr`, the service connects PULL.
pub const REQUEST_SOCKETS: (&str, &str) = ("PUSH (bind)", "PULL (connect)");
/// Responses: the caller binds DEALER at `service_resp_addr` with identity = its sender id;
/// the service connects ROUTER and sends `[sender_id, "", frame]`.
pub const RESPONSE_SOCKETS: (&str, &str) = ("DEALER (bind)", "ROUTER (connect)");

/// A Brubeck service request.
#[derive(Clone, Debug, PartialEq)]
pub struct BrubeckRequest {
    /// The caller's id (also its DEALER identity).
    pub sender_id: String,
    /// Correlates the response (a uuid4 hex).
    pub conn_id: String,
    /// When the request was made, ms since the epoch, as text.
    pub request_timestamp: String,
    /// The shared secret, in clear text.
    pub passphrase: String,
    /// The web request's sender.
    pub origin_sender_id: String,
    /// The web request's connection.
    pub origin_conn_id: String,
    /// Where the web response goes.
    pub origin_out_addr: String,
    /// Whether the response should be handled (`"1"`).
    pub handle_response: String,
    /// The path.
    pub path: String,
    /// The method.
    pub method: String,
    /// The arguments (a JSON object).
    pub arguments: Value,
    /// The headers (a JSON object).
    pub headers: Value,
    /// The body (a JSON object; a body that is not one is wrapped as `{"RETURN_DATA": body}`).
    pub body: Value,
}

/// A Brubeck service response.
#[derive(Clone, Debug, PartialEq)]
pub struct BrubeckResponse {
    /// The caller's id.
    pub sender_id: String,
    /// The request's `conn_id`.
    pub conn_id: String,
    /// The request's timestamp.
    pub request_timestamp: String,
    /// When the service started on it.
    pub start_timestamp: String,
    /// When it finished.
    pub end_timestamp: String,
    /// The shared secret, in clear text.
    pub passphrase: String,
    /// As in the request.
    pub origin_sender_id: String,
    /// As in the request.
    pub origin_conn_id: String,
    /// As in the request.
    pub origin_out_addr: String,
    /// As in the request.
    pub handle_response: String,
    /// The request's path.
    pub path: String,
    /// The method: `response`.
    pub method: String,
    /// The status code.
    pub status_code: Value,
    /// The status message.
    pub status_msg: Value,
    /// The arguments.
    pub arguments: Value,
    /// The headers.
    pub headers: Value,
    /// The body.
    pub body: Value,
}

fn netstring(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(field.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(field);
}

fn json(value: &Value) -> Vec<u8> {
    // Serialising a Value cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn spaced_fields(out: &mut Vec<u8>, fields: &[&str]) -> Result<(), Error> {
    for field in fields {
        if field.contains(' ') || field.is_empty() {
            return Err(Error::Malformed(format!(
                "brubeck header fields can be neither empty nor contain spaces: {field:?}"
            )));
        }
        out.push(b' ');
        netstring(out, field.as_bytes());
    }
    Ok(())
}

/// The one frame of `request`.
pub fn encode_request(request: &BrubeckRequest) -> Result<Vec<u8>, Error> {
    let mut out = request.sender_id.as_bytes().to_vec();
    spaced_fields(
        &mut out,
        &[
            &request.conn_id,
            &request.request_timestamp,
            &request.passphrase,
            &request.origin_sender_id,
            &request.origin_conn_id,
            &request.origin_out_addr,
            &request.handle_response,
            &request.path,
            &request.method,
        ],
    )?;
    out.push(b' ');
    for value in [&request.arguments, &request.headers, &request.body] {
        netstring(&mut out, &json(value));
    }
    Ok(out)
}

/// The one frame of `response`.
pub fn encode_response(response: &BrubeckResponse) -> Result<Vec<u8>, Error> {
    let mut out = response.sender_id.as_bytes().to_vec();
    spaced_fields(
        &mut out,
        &[
            &response.conn_id,
            &response.request_timestamp,
            &response.start_timestamp,
            &response.end_timestamp,
            &response.passphrase,
            &response.origin_sender_id,
            &response.origin_conn_id,
            &response.origin_out_addr,
            &response.handle_response,
            &response.path,
            &response.method,
        ],
    )?;
    out.push(b' ');
    for value in [
        &response.status_code,
        &response.status_msg,
        &response.arguments,
        &response.headers,
        &response.body,
    ] {
        netstring(&mut out, &json(value));
    }
    Ok(out)
}

/// A cursor over a frame's bytes.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn field(&mut self, name: &str) -> Result<&'a [u8], Error> {
        let colon =
            self.rest.iter().position(|b| *b == b':').ok_or_else(|| {
                Error::Malformed(format!("brubeck field {name}: no length prefix"))
            })?;
        let len_text = std::str::from_utf8(&self.rest[..colon])
            .map_err(|_| Error::Malformed(format!("brubeck field {name}: bad length")))?;
        let len: usize = len_text.parse().map_err(|_| {
            Error::Malformed(format!("brubeck field {name}: bad length {len_text:?}"))
        })?;
        let start = colon + 1;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= self.rest.len())
            .ok_or_else(|| {
                Error::Malformed(format!(
                    "brubeck field {name}: {len} bytes announced, fewer present"
                ))
            })?;
        let data = &self.rest[start..end];
        self.rest = &self.rest[end..];
        Ok(data)
    }

    fn text(&mut self, name: &str) -> Result<String, Error> {
        let data = self.field(name)?;
        String::from_utf8(data.to_vec())
            .map_err(|_| Error::Malformed(format!("brubeck field {name}: not UTF-8")))
    }

    fn space(&mut self, after: &str) -> Result<(), Error> {
        match self.rest.split_first() {
            Some((b' ', rest)) => {
                self.rest = rest;
                Ok(())
            }
            _ => Err(Error::Malformed(format!(
                "brubeck frame: expected a space after {after}"
            ))),
        }
    }

    fn spaced(&mut self, name: &str) -> Result<String, Error> {
        self.space(name)?;
        self.text(name)
    }

    fn json(&mut self, name: &str) -> Result<Value, Error> {
        let data = self.field(name)?;
        serde_json::from_slice(data)
            .map_err(|e| Error::Malformed(format!("brubeck field {name}: {e}")))
    }

    fn body(&mut self) -> Result<Value, Error> {
        let data = self.field("body")?;
        if data.first() == Some(&b'{') {
            serde_json::from_slice(data).map_err(|e| Error::Malformed(format!("brubeck body: {e}")))
        } else {
            let mut wrapped = Map::new();
            wrapped.insert(
                "RETURN_DATA".into(),
                Value::String(String::from_utf8_lossy(data).into_owned()),
            );
            Ok(Value::Object(wrapped))
        }
    }

    fn end(&self) -> Result<(), Error> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::Malformed(format!(
                "brubeck frame: {} bytes after the last field",
                self.rest.len()
            )))
        }
    }
}

fn sender(frame: &[u8]) -> Result<(String, Reader<'_>), Error> {
    let space = frame
        .iter()
        .position(|b| *b == b' ')
        .ok_or_else(|| Error::Malformed("brubeck frame: no sender id".into()))?;
    let sender = String::from_utf8(frame[..space].to_vec())
        .map_err(|_| Error::Malformed("brubeck frame: sender id is not UTF-8".into()))?;
    Ok((
        sender,
        Reader {
            rest: &frame[space + 1..],
        },
    ))
}

/// Reads a request frame.
pub fn decode_request(frame: &[u8]) -> Result<BrubeckRequest, Error> {
    let (sender_id, mut r) = sender(frame)?;
    let conn_id = r.text("conn_id")?;
    let request = BrubeckRequest {
        sender_id,
        conn_id,
        request_timestamp: r.spaced("request_timestamp")?,
        passphrase: r.spaced("passphrase")?,
        origin_sender_id: r.spaced("origin_sender_id")?,
        origin_conn_id: r.spaced("origin_conn_id")?,
        origin_out_addr: r.spaced("origin_out_addr")?,
        handle_response: r.spaced("handle_response")?,
        path: r.spaced("path")?,
        method: r.spaced("method")?,
        arguments: {
            r.space("method")?;
            r.json("arguments")?
        },
        headers: r.json("headers")?,
        body: r.body()?,
    };
    r.end()?;
    Ok(request)
}

/// Reads a response frame.
pub fn decode_response(frame: &[u8]) -> Result<BrubeckResponse, Error> {
    let (sender_id, mut r) = sender(frame)?;
    let conn_id = r.text("conn_id")?;
    let response = BrubeckResponse {
        sender_id,
        conn_id,
        request_timestamp: r.spaced("request_timestamp")?,
        start_timestamp: r.spaced("start_timestamp")?,
        end_timestamp: r.spaced("end_timestamp")?,
        passphrase: r.spaced("passphrase")?,
        origin_sender_id: r.spaced("origin_sender_id")?,
        origin_conn_id: r.spaced("origin_conn_id")?,
        origin_out_addr: r.spaced("origin_out_addr")?,
        handle_response: r.spaced("handle_response")?,
        path: r.spaced("path")?,
        method: r.spaced("method")?,
        status_code: {
            r.space("method")?;
            r.json("status_code")?
        },
        status_msg: r.json("status_msg")?,
        arguments: r.json("arguments")?,
        headers: r.json("headers")?,
        body: r.body()?,
    };
    r.end()?;
    Ok(response)
}

/// The request frame of the spec's example (`../shared/specs/brubeck-services.md`), with the two
/// ids the spec elides written out in full: a golden frame for tests of Brubeck's wire.
pub const SPEC_EXAMPLE: &str = concat!(
    "365e4b3ae1b04a4e94a2f0c3f0e313db ",
    "32:3725c0d2e7a44d2fb0c4b6a1e9f8506e ",
    "13:1358433619512 ",
    "16:my_shared_secret ",
    "36:34f9ceee-cd52-4b7f-b197-88bf2f0ec378 ",
    "1:1 ",
    "20:tcp://127.0.0.1:9998 ",
    "1:1 ",
    "13:/service/slow ",
    "7:request ",
    "37:{\"RETURN_DATA\":\"I made a round trip\"}2:{}2:{}"
);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EXAMPLE: &str = SPEC_EXAMPLE;

    #[test]
    fn reads_the_spec_example_and_writes_it_back_byte_for_byte() {
        let request = decode_request(EXAMPLE.as_bytes()).expect("the example parses");
        assert_eq!(request.sender_id, "365e4b3ae1b04a4e94a2f0c3f0e313db");
        assert_eq!(request.conn_id, "3725c0d2e7a44d2fb0c4b6a1e9f8506e");
        assert_eq!(request.request_timestamp, "1358433619512");
        assert_eq!(request.passphrase, "my_shared_secret");
        assert_eq!(request.origin_out_addr, "tcp://127.0.0.1:9998");
        assert_eq!(request.path, "/service/slow");
        assert_eq!(request.method, "request");
        assert_eq!(
            request.arguments,
            json!({"RETURN_DATA": "I made a round trip"})
        );
        assert_eq!(request.headers, json!({}));
        assert_eq!(request.body, json!({}));
        assert_eq!(
            encode_request(&request).expect("encodes"),
            EXAMPLE.as_bytes()
        );
    }

    #[test]
    fn responses_round_trip_and_bare_bodies_are_wrapped() {
        let response = BrubeckResponse {
            sender_id: "s".into(),
            conn_id: "c".into(),
            request_timestamp: "1".into(),
            start_timestamp: "2".into(),
            end_timestamp: "3".into(),
            passphrase: "p".into(),
            origin_sender_id: "o".into(),
            origin_conn_id: "oc".into(),
            origin_out_addr: "tcp://x:1".into(),
            handle_response: "1".into(),
            path: "/service/slow".into(),
            method: "response".into(),
            status_code: json!(200),
            status_msg: json!("Took a while, but I am back."),
            arguments: json!({}),
            headers: json!({"METHOD": "response"}),
            body: json!({"RETURN_DATA": "ü"}),
        };
        let frame = encode_response(&response).expect("encodes");
        assert_eq!(decode_response(&frame).expect("decodes"), response);

        let bare = EXAMPLE.replace("2:{}2:{}", "2:{}5:hello");
        assert_eq!(
            decode_request(bare.as_bytes()).expect("parses").body,
            json!({"RETURN_DATA": "hello"})
        );
    }

    #[test]
    fn broken_frames_are_errors_not_panics() {
        for broken in [
            "",
            "sender-only",
            "s 999:short",
            "s 1:a 1:b",
            "s x:y",
            &EXAMPLE.replace("13:/service/slow", "13:/service/slo"),
            &format!("{EXAMPLE}trailing"),
        ] {
            assert!(decode_request(broken.as_bytes()).is_err(), "{broken:?}");
        }
        let mut request = decode_request(EXAMPLE.as_bytes()).expect("parses");
        request.path = "has space".into();
        assert!(encode_request(&request).is_err());
    }
}
