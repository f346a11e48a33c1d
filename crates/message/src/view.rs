//! A native message read in place: every field checked in one pass and borrowed from the
//! body, nothing allocated. [`NativeCodec::decode`](crate::NativeCodec) builds its owned
//! [`Message`](crate::Message) from this view; a router that only reads a header or two and
//! passes the message on as it came uses the view alone.

use bytes::Bytes;

use crate::msgpack::{self, MsgpackKind};
use crate::native::{NAME, Reader};
use crate::{Error, Function};

/// A native body, checked and borrowed: what [`NativeCodec::view`](crate::NativeCodec::view)
/// gives. It accepts exactly what decoding accepts, so a body that viewed well decodes.
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeView<'a> {
    pipeline: &'a str,
    client: &'a str,
    stage: u32,
    function: FunctionView<'a>,
    cache: &'a str,
    /// Name and value strings, one after the other.
    headers: Strings<'a>,
    payload: &'a [u8],
    /// The body has a payload field (it may be empty).
    has_payload: bool,
    /// Where in the body the headers' map, the function's value and the cache's value are (head
    /// included).
    headers_at: Option<(usize, usize)>,
    function_at: Option<(usize, usize)>,
    cache_at: Option<(usize, usize)>,
}

#[derive(Clone, Copy, Debug)]
enum FunctionView<'a> {
    Single(&'a str),
    Stages(Strings<'a>),
}

impl Default for FunctionView<'_> {
    fn default() -> Self {
        FunctionView::Single("")
    }
}

/// `count` MessagePack strings back to back, each checked once; read again on demand.
#[derive(Clone, Copy, Debug, Default)]
struct Strings<'a> {
    bytes: &'a [u8],
    count: usize,
}

impl<'a> Strings<'a> {
    /// Reads `count` strings from `reader`, checking each; an error names the string by
    /// `what`, taken in turn (a header's name, then its value).
    fn read(reader: &mut Reader<'a>, count: usize, what: &[&str]) -> Result<Strings<'a>, Error> {
        let start = reader.pos;
        for (_, what) in (0..count).zip(what.iter().cycle()) {
            reader.str(what)?;
        }
        Ok(Strings {
            bytes: reader.body.get(start..reader.pos).unwrap_or_default(),
            count,
        })
    }

    fn iter(self) -> impl Iterator<Item = &'a str> {
        self.raw()
            .map_while(|bytes| std::str::from_utf8(bytes).ok())
    }

    /// The strings' bytes: every one was checked as UTF-8 when the view was made.
    fn raw(self) -> impl Iterator<Item = &'a [u8]> {
        let mut reader = Reader::new(self.bytes);
        (0..self.count).map_while(move |_| reader.str_bytes("").ok())
    }
}

impl<'a> NativeView<'a> {
    /// Reads a body in one pass over its bytes: the map of fields, then nothing after it.
    /// Missing fields take their empty values and unknown fields are skipped, so that later
    /// versions can add fields; a field may come once.
    pub(crate) fn read(body: &'a [u8]) -> Result<NativeView<'a>, Error> {
        let mut reader = Reader::new(body);
        let fields = match reader.item()? {
            (MsgpackKind::Map(fields), _) => fields,
            (kind, _) => return Err(reader.wrong("the body", "a map", kind)),
        };
        let mut view = NativeView::default();
        // The fields read so far, one bit each.
        let mut seen = 0u8;
        for _ in 0..fields {
            // Matched as bytes: a known name needs no UTF-8 check.
            let name = reader.str_bytes("a field name")?;
            let mut first = |bit: u8| {
                if seen & bit != 0 {
                    let name = String::from_utf8_lossy(name);
                    return Err(Error::malformed(NAME, format!("duplicate field `{name}`")));
                }
                seen |= bit;
                Ok(())
            };
            match name {
                b"pipeline" => {
                    first(1)?;
                    view.pipeline = reader.str("`pipeline`")?;
                }
                b"client" => {
                    first(2)?;
                    view.client = reader.str("`client`")?;
                }
                b"stage" => {
                    first(4)?;
                    view.stage = reader.stage()?;
                }
                b"function" => {
                    first(8)?;
                    let start = reader.pos;
                    view.function = match reader.item()? {
                        (MsgpackKind::Str, data) => FunctionView::Single(
                            std::str::from_utf8(data)
                                .map_err(|_| Error::malformed(NAME, "`function` is not UTF-8"))?,
                        ),
                        (MsgpackKind::Array(len), _) => FunctionView::Stages(Strings::read(
                            &mut reader,
                            len as usize,
                            &["a stage of `function`"],
                        )?),
                        (kind, _) => {
                            return Err(reader.wrong("`function`", "a string or an array", kind));
                        }
                    };
                    view.function_at = Some((start, reader.pos));
                }
                b"cache" => {
                    first(16)?;
                    let start = reader.pos;
                    view.cache = reader.str("`cache`")?;
                    view.cache_at = Some((start, reader.pos));
                }
                b"headers" => {
                    first(32)?;
                    let start = reader.pos;
                    let pairs = match reader.item()? {
                        (MsgpackKind::Map(len), _) => len as usize,
                        (kind, _) => return Err(reader.wrong("`headers`", "a map", kind)),
                    };
                    view.headers = Strings::read(
                        &mut reader,
                        pairs * 2,
                        &["a header name", "a header value"],
                    )?;
                    view.headers_at = Some((start, reader.pos));
                }
                b"payload" => {
                    first(64)?;
                    view.payload = match reader.item()? {
                        (MsgpackKind::Bin | MsgpackKind::Str, data) => data,
                        (kind, _) => return Err(reader.wrong("`payload`", "binary", kind)),
                    };
                    view.has_payload = true;
                }
                _ => {
                    if std::str::from_utf8(name).is_err() {
                        return Err(Error::malformed(NAME, "a field name is not UTF-8"));
                    }
                    reader.skip()?;
                }
            }
        }
        if reader.pos != body.len() {
            return Err(Error::malformed(
                NAME,
                format!("{} bytes follow the message", body.len() - reader.pos),
            ));
        }
        Ok(view)
    }

    /// The stream id.
    pub fn pipeline(&self) -> &'a str {
        self.pipeline
    }

    /// The client id.
    pub fn client(&self) -> &'a str {
        self.client
    }

    /// The current stage.
    pub fn stage(&self) -> u32 {
        self.stage
    }

    /// The cache key (a call's number, for a client's calls).
    pub fn cache(&self) -> &'a str {
        self.cache
    }

    /// The payload, borrowed.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The full name of the function to call at the current stage, as
    /// [`Message::function_name`](crate::Message::function_name) gives it.
    pub fn function_name(&self) -> Option<&'a str> {
        match self.function {
            FunctionView::Single(name) => Some(name),
            FunctionView::Stages(stages) => stages.iter().nth(self.stage as usize),
        }
    }

    /// The value of header `name` (the last, should a peer send it twice: decoding keeps the
    /// last too).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        let mut strings = self.headers.raw();
        let mut found = None;
        while let (Some(key), Some(value)) = (strings.next(), strings.next()) {
            if key == name.as_bytes() {
                found = Some(value);
            }
        }
        found.and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The values of the headers named in `names`, found in one pass over the headers (the
    /// last of each, as [`NativeView::header`] gives it).
    pub fn headers_named<const N: usize>(&self, names: [&str; N]) -> [Option<&'a str>; N] {
        let mut found = [None; N];
        let mut strings = self.headers.raw();
        while let (Some(key), Some(value)) = (strings.next(), strings.next()) {
            if let Some(at) = names.iter().position(|name| name.as_bytes() == key) {
                found[at] = std::str::from_utf8(value).ok();
            }
        }
        found
    }

    /// Every header, in the order they came.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        let mut strings = self.headers.iter();
        std::iter::from_fn(move || Some((strings.next()?, strings.next()?)))
    }

    /// True when the function is one name (not a list of stages).
    pub fn is_single_function(&self) -> bool {
        matches!(self.function, FunctionView::Single(_))
    }

    /// How to write an answer to this message from its body without decoding it again (see
    /// [`Answering`]); `None` when the body has no payload field (no call a client writes: such
    /// a message is answered the decoding way).
    pub fn answering(&self) -> Option<Answering> {
        self.has_payload.then_some(Answering {
            headers_at: self.headers_at,
            function_at: self.function_at,
            cache_at: self.cache_at,
        })
    }

    /// The message as a [`Forward`] of `body`, the bytes this view reads; `None` when it has
    /// no headers field (a header could not be set in place).
    pub fn forward(&self, body: &Bytes) -> Option<Forward> {
        Some(Forward {
            body: body.clone(),
            headers_at: self.headers_at?,
        })
    }

    /// The function, owned.
    pub(crate) fn function(&self) -> Function {
        match self.function {
            FunctionView::Single(name) => Function::Single(name.to_owned()),
            FunctionView::Stages(stages) => {
                Function::Stages(stages.iter().map(str::to_owned).collect())
            }
        }
    }
}

/// Where a native body keeps its function, cache and headers, taken from its [`NativeView`]:
/// what a worker needs to write its answer straight from the request's bytes, without decoding
/// them into a message and encoding that again.
#[derive(Clone, Copy, Debug)]
pub struct Answering {
    headers_at: Option<(usize, usize)>,
    function_at: Option<(usize, usize)>,
    cache_at: Option<(usize, usize)>,
}

impl Answering {
    /// The body of a short answer, for a caller that reads of an answer only what answers its
    /// call: the request's `function` and `cache` (the call's number) as they came in `body`,
    /// its headers without those named in `drop`, and `payload`. The envelope's other fields
    /// (`pipeline`, `client`, `stage`) are left out: a message without them decodes with them
    /// empty, and the caller knows its own. A plain answer crosses two hops on its way back, so
    /// every byte left out is saved twice.
    pub fn short_answer(&self, body: &[u8], payload: &[u8], drop: &[&str]) -> Result<Bytes, Error> {
        let region = |at: Option<(usize, usize)>| match at {
            None => Ok(None),
            Some((start, end)) => body
                .get(start..end)
                .map(Some)
                .ok_or_else(|| Error::malformed(NAME, "the body is not the one viewed")),
        };
        let (function, cache, headers) = (
            region(self.function_at)?,
            region(self.cache_at)?,
            region(self.headers_at)?,
        );
        let fields = 1 + [function, cache, headers].iter().flatten().count();
        let mut out = Vec::with_capacity(
            16 + function.map_or(0, <[u8]>::len)
                + cache.map_or(0, <[u8]>::len)
                + headers.map_or(0, <[u8]>::len)
                + payload.len(),
        );
        msgpack::write_map_head(&mut out, fields);
        for (name, value) in [("function", function), ("cache", cache)] {
            if let Some(value) = value {
                msgpack::write_str(&mut out, name);
                out.extend_from_slice(value);
            }
        }
        if let Some(headers) = headers {
            msgpack::write_str(&mut out, "headers");
            let keep = |name: &[u8]| !drop.iter().any(|d| d.as_bytes() == name);
            write_headers(&mut out, headers, &keep, &[])?;
        }
        msgpack::write_str(&mut out, "payload");
        msgpack::write_bin(&mut out, payload);
        Ok(Bytes::from(out))
    }
}

/// A native message kept as it came, for a part that passes it on with a header or two set and
/// reads little else of it (a master between its callers and its workers): its body and where
/// its headers are. Made by [`NativeView::forward`].
#[derive(Clone, Debug)]
pub struct Forward {
    body: Bytes,
    headers_at: (usize, usize),
}

impl Forward {
    /// The body as it came.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The message, decoded (it was read once already, within the size limit).
    pub fn decode(&self) -> Result<crate::Message, Error> {
        crate::Codec::decode(
            &crate::NativeCodec::with_max_size(usize::MAX),
            self.body.clone(),
        )
    }

    /// The value of header `name` (the last, should it come twice), read from the body.
    pub fn header(&self, name: &str) -> Option<&str> {
        let (start, end) = self.headers_at;
        let mut reader = Reader::new(self.body.get(start..end)?);
        let pairs = match reader.item().ok()? {
            (MsgpackKind::Map(len), _) => len,
            _ => return None,
        };
        let mut found = None;
        for _ in 0..pairs {
            let key = reader.str_bytes("").ok()?;
            let value = reader.str_bytes("").ok()?;
            if key == name.as_bytes() {
                found = Some(value);
            }
        }
        // Every string was checked as UTF-8 when the message was viewed.
        found.and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The body with the headers in `set` set: those of the same names that came are left out
    /// and `set` follows what stays; every other byte as it came.
    pub fn with_headers(&self, set: &[(&str, &str)]) -> Result<Bytes, Error> {
        let (start, end) = self.headers_at;
        let (Some(before), Some(region), Some(after)) = (
            self.body.get(..start),
            self.body.get(start..end),
            self.body.get(end..),
        ) else {
            return Err(Error::malformed(
                NAME,
                "the headers are not where they were",
            ));
        };
        let added: usize = set.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
        let mut out = Vec::with_capacity(self.body.len() + added);
        out.extend_from_slice(before);
        let keep = |name: &[u8]| !set.iter().any(|(k, _)| k.as_bytes() == name);
        write_headers(&mut out, region, &keep, set)?;
        out.extend_from_slice(after);
        Ok(Bytes::from(out))
    }
}

/// Writes the headers' map `region` (as it came) with only the pairs whose name `keep` keeps,
/// then the pairs of `add`: one pass counts what stays, the next copies it.
fn write_headers(
    out: &mut Vec<u8>,
    region: &[u8],
    keep: &dyn Fn(&[u8]) -> bool,
    add: &[(&str, &str)],
) -> Result<(), Error> {
    // Each pair that stays, as (start, end) of its bytes in `region`.
    let kept = |out: &mut dyn FnMut(usize, usize)| -> Result<(), Error> {
        let mut reader = Reader::new(region);
        let pairs = match reader.item()? {
            (MsgpackKind::Map(len), _) => len,
            (kind, _) => return Err(reader.wrong("`headers`", "a map", kind)),
        };
        for _ in 0..pairs {
            let start = reader.pos;
            let name = reader.str_bytes("a header name")?;
            reader.str_bytes("a header value")?;
            if keep(name) {
                out(start, reader.pos);
            }
        }
        Ok(())
    };
    let mut count = 0;
    kept(&mut |_, _| count += 1)?;
    msgpack::write_map_head(out, count + add.len());
    kept(&mut |start, end| out.extend_from_slice(region.get(start..end).unwrap_or_default()))?;
    for (name, value) in add {
        msgpack::write_str(out, name);
        msgpack::write_str(out, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::{Codec, Message, NativeCodec};

    #[test]
    fn a_view_reads_what_decoding_reads_without_allocating_a_field() {
        let codec = NativeCodec::default();
        let message = Message::call(vec!["a.one".to_owned(), "b.two".to_owned()], "data")
            .with_pipeline("p")
            .with_client("c")
            .with_cache("17")
            .with_stage(1)
            .with_header("x", "1")
            .with_header("rylm-dispatch", "2a.0123");
        let frames = codec.encode_frames(&message).expect("encodes");
        let view = codec.view(&frames).expect("views");
        assert_eq!(
            (view.pipeline(), view.client(), view.cache(), view.stage()),
            ("p", "c", "17", 1)
        );
        assert_eq!(view.function_name(), message.function_name());
        assert_eq!(view.header("rylm-dispatch"), Some("2a.0123"));
        assert_eq!(view.header("missing"), None);
        assert_eq!(
            view.headers_named(["missing", "rylm-dispatch", "x"]),
            [None, Some("2a.0123"), Some("1")]
        );
        assert_eq!(view.payload(), b"data");
        // The payload is the frame's own bytes.
        let body = frames[1].as_ptr_range();
        assert!(body.contains(&view.payload().as_ptr()));
        assert_eq!(codec.decode_frames(&frames).expect("decodes"), message);
    }

    #[test]
    fn a_view_refuses_what_decoding_refuses() {
        let codec = NativeCodec::default();
        let body = codec.encode(&Message::call("f", "x")).expect("encodes");
        let marker = Bytes::from_static(&crate::MARKER);
        let mut trailing = body.to_vec();
        trailing.push(0);
        let cases = [
            vec![marker.clone(), Bytes::from(trailing)],
            vec![Bytes::from_static(b"RYLM\x07"), body.clone()],
            vec![marker.clone()],
            vec![marker.clone(), body.clone(), body.clone()],
            // An unknown field whose name is not UTF-8.
            vec![marker.clone(), Bytes::from_static(b"\x81\xa1\xff\x01")],
            // {"headers": {"a": 1}}: a header value that is not a string.
            vec![
                marker.clone(),
                Bytes::from_static(b"\x81\xa7headers\x81\xa1a\x01"),
            ],
        ];
        for frames in cases {
            let viewed = codec.view(&frames).map(|_| ()).map_err(|e| e.to_string());
            let decoded = codec
                .decode_frames(&frames)
                .map(|_| ())
                .map_err(|e| e.to_string());
            assert!(viewed.is_err(), "{frames:?}");
            assert_eq!(viewed, decoded);
        }
        let small = NativeCodec::with_max_size(4);
        assert!(small.view(&[marker, body]).is_err());
    }

    /// What an answer written from the request's bytes must decode to.
    fn replied(request: &Message, payload: &[u8], drop: &[&str]) -> Message {
        let mut expected = request.reply(Bytes::copy_from_slice(payload));
        for name in drop {
            expected.headers.remove(*name);
        }
        expected
    }

    /// `reply` as a short answer has it: without the caller's own fields.
    fn short(mut reply: Message) -> Message {
        reply.pipeline.clear();
        reply.client.clear();
        reply.stage = 0;
        reply
    }

    #[test]
    fn a_short_answer_decodes_as_the_reply_without_the_callers_own_fields() {
        let codec = NativeCodec::default();
        let mut many = Message::call("s.f", "in").with_cache("7");
        for i in 0..20 {
            many = many.with_header(format!("h{i:02}"), "v");
        }
        let requests = [
            Message::call("s.f", "in")
                .with_client("c")
                .with_cache("12")
                .with_header("rylm-dispatch", "1.00")
                .with_header("traceparent", "00-x")
                .with_header("rylm-pipelined", "true"),
            Message::call("f", Bytes::new()),
            Message::call(
                crate::Function::Stages(vec!["a.f".into(), "b.g".into()]),
                "in",
            )
            .with_cache("3"),
            many,
        ];
        let payloads: [&[u8]; 4] = [b"", b"out", &[7; 300], &[9; 70_000]];
        let drops: [&[&str]; 3] = [&[], &["traceparent", "rylm-pipelined"], &["h03", "h19"]];
        for mut request in requests {
            request.pipeline = "session".into();
            let frames = codec.encode_frames(&request).expect("encodes");
            let answering = codec
                .view(&frames)
                .expect("views")
                .answering()
                .expect("has a payload");
            for payload in payloads {
                for drop in drops {
                    let body = answering
                        .short_answer(&frames[1], payload, drop)
                        .expect("answers");
                    let full = codec
                        .encode(&replied(&request, payload, drop))
                        .expect("encodes");
                    assert!(body.len() < full.len(), "{request:?}");
                    let decoded = codec.decode(body).expect("decodes");
                    assert_eq!(decoded, short(replied(&request, payload, drop)));
                }
            }
        }
    }

    #[test]
    fn an_answer_is_written_whatever_order_the_fields_came_in() {
        // {"payload": b"in", "headers": {"a": "1", "b": "2"}, "function": "f"}
        let body = Bytes::from_static(
            b"\x83\xa7payload\xc4\x02in\xa7headers\x82\xa1a\xa11\xa1b\xa12\xa8function\xa1f",
        );
        let frames = [Bytes::from_static(&crate::MARKER), body.clone()];
        let codec = NativeCodec::default();
        let request = codec.decode_frames(&frames).expect("decodes");
        let answering = codec
            .view(&frames)
            .expect("views")
            .answering()
            .expect("has a payload");
        let answer = answering
            .short_answer(&body, b"out!", &["a"])
            .expect("answers");
        assert_eq!(
            codec.decode(answer).expect("decodes"),
            short(replied(&request, b"out!", &["a"]))
        );
        // No payload field: nothing to replace in place.
        let bare = [
            Bytes::from_static(&crate::MARKER),
            Bytes::from_static(b"\x81\xa8function\xa1f"),
        ];
        assert!(codec.view(&bare).expect("views").answering().is_none());
    }

    #[test]
    fn a_forwarded_message_decodes_with_the_headers_it_was_given() {
        let codec = NativeCodec::default();
        let mut many = Message::call("s.f", vec![3; 300]).with_cache("9");
        for i in 0..20 {
            many = many.with_header(format!("h{i:02}"), "v");
        }
        let requests = [
            Message::call("s.f", "in")
                .with_client("c")
                .with_pipeline("p")
                .with_header("rylm-deadline", "30000")
                .with_header("traceparent", "00-x"),
            Message::call("f", Bytes::new()).with_header("x", "1"),
            many,
        ];
        let long = "d".repeat(40);
        let sets: [&[(&str, &str)]; 3] = [
            &[],
            &[("rylm-dispatch", "1.00"), ("rylm-deadline", "29998")],
            &[("h05", "w"), ("new", long.as_str())],
        ];
        for request in &requests {
            let frames = codec.encode_frames(request).expect("encodes");
            let forward = codec
                .view(&frames)
                .expect("views")
                .forward(&frames[1])
                .expect("has headers");
            assert_eq!(forward.body(), &frames[1]);
            for (name, value) in &request.headers {
                assert_eq!(forward.header(name), Some(value.as_str()));
            }
            assert_eq!(forward.header("missing"), None);
            assert_eq!(&forward.decode().expect("decodes"), request);
            for set in sets {
                let body = forward.with_headers(set).expect("writes");
                let mut expected = request.clone();
                for (name, value) in set {
                    expected
                        .headers
                        .insert((*name).to_owned(), (*value).to_owned());
                }
                assert_eq!(codec.decode(body).expect("decodes"), expected);
            }
        }
        // No headers field: nothing to set in place.
        let bare = [
            Bytes::from_static(&crate::MARKER),
            Bytes::from_static(b"\x81\xa8function\xa1f"),
        ];
        assert!(
            codec
                .view(&bare)
                .expect("views")
                .forward(&bare[1])
                .is_none()
        );
    }

    #[test]
    fn a_header_sent_twice_reads_as_its_last_value_as_decoding_does() {
        // {"headers": {"a": "1", "a": "2"}}
        let body = Bytes::from_static(b"\x81\xa7headers\x82\xa1a\xa11\xa1a\xa12");
        let frames = [Bytes::from_static(&crate::MARKER), body];
        let codec = NativeCodec::default();
        assert_eq!(codec.view(&frames).expect("views").header("a"), Some("2"));
        let decoded = codec.decode_frames(&frames).expect("decodes");
        assert_eq!(decoded.header("a"), Some("2"));
    }
}
