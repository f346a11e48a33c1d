//! A native message read in place: every field checked in one pass and borrowed from the
//! body, nothing allocated. [`NativeCodec::decode`](crate::NativeCodec) builds its owned
//! [`Message`](crate::Message) from this view; a router that only reads a header or two and
//! passes the message on as it came uses the view alone.

use crate::msgpack::MsgpackKind;
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
                }
                b"cache" => {
                    first(16)?;
                    view.cache = reader.str("`cache`")?;
                }
                b"headers" => {
                    first(32)?;
                    let pairs = match reader.item()? {
                        (MsgpackKind::Map(len), _) => len as usize,
                        (kind, _) => return Err(reader.wrong("`headers`", "a map", kind)),
                    };
                    view.headers = Strings::read(
                        &mut reader,
                        pairs * 2,
                        &["a header name", "a header value"],
                    )?;
                }
                b"payload" => {
                    first(64)?;
                    view.payload = match reader.item()? {
                        (MsgpackKind::Bin | MsgpackKind::Str, data) => data,
                        (kind, _) => return Err(reader.wrong("`payload`", "binary", kind)),
                    };
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

    /// Every header, in the order they came.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        let mut strings = self.headers.iter();
        std::iter::from_fn(move || Some((strings.next()?, strings.next()?)))
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
