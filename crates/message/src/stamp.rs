//! A sender's stamp: the fields it writes over a message as it sends it (its own id, its
//! session, the call's number, a deadline, trace context), written straight into the message's
//! native body instead of into the message (whose strings and header map would each be
//! allocated again per call, only to be encoded once).

use bytes::Bytes;

use crate::codec::check_size;
use crate::msgpack::{write_array_head, write_bin, write_map_head, write_str, write_uint};
use crate::{Codec, Error, Function, Message, NativeCodec};

/// What a sender writes over a message's own fields as it encodes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stamp<'a> {
    /// In place of the message's `client`.
    pub client: &'a str,
    /// In place of the message's `pipeline`.
    pub pipeline: &'a str,
    /// In place of the message's `cache`.
    pub cache: &'a str,
    /// Set over the message's headers, in order of name, each name once.
    pub headers: &'a [(&'a str, &'a str)],
}

impl Stamp<'_> {
    /// Writes the stamp into `message` (what [`NativeCodec::encode_stamped`] encodes without
    /// doing it): for another codec.
    pub fn apply(&self, message: &mut Message) {
        message.client.clear();
        message.client.push_str(self.client);
        message.pipeline.clear();
        message.pipeline.push_str(self.pipeline);
        message.cache.clear();
        message.cache.push_str(self.cache);
        for (name, value) in self.headers {
            message
                .headers
                .insert((*name).to_owned(), (*value).to_owned());
        }
    }

    /// The message's headers with the stamp's set over them, in order of name.
    fn headers<'m>(&'m self, message: &'m Message) -> impl Iterator<Item = (&'m str, &'m str)> {
        debug_assert!(
            self.headers.windows(2).all(|pair| pair[0].0 < pair[1].0),
            "a stamp's headers come in order of name, each once"
        );
        let mut own = message
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .peekable();
        let mut set = self.headers.iter().copied().peekable();
        std::iter::from_fn(move || match (own.peek(), set.peek()) {
            (Some(mine), Some(stamped)) if mine.0 < stamped.0 => own.next(),
            (Some(mine), Some(stamped)) if mine.0 == stamped.0 => {
                own.next();
                set.next()
            }
            (_, Some(_)) => set.next(),
            (Some(_), None) => own.next(),
            (None, None) => None,
        })
    }
}

impl NativeCodec {
    /// The body of `message` stamped with `stamp`: the bytes [`crate::Codec::encode`] writes
    /// for the message after [`Stamp::apply`], without changing the message.
    pub fn encode_stamped(&self, message: &Message, stamp: &Stamp<'_>) -> Result<Bytes, Error> {
        let headers = stamp.headers(message).count();
        let mut body = Vec::with_capacity(crate::native::body_size_hint(
            [stamp.pipeline, stamp.client, stamp.cache],
            &message.function,
            stamp.headers(message),
            message.payload.len(),
        ));
        // The fields in the order the codec writes them (see `WireOut`).
        write_map_head(&mut body, 7);
        write_str(&mut body, "pipeline");
        write_str(&mut body, stamp.pipeline);
        write_str(&mut body, "client");
        write_str(&mut body, stamp.client);
        write_str(&mut body, "stage");
        write_uint(&mut body, u64::from(message.stage));
        write_str(&mut body, "function");
        match &message.function {
            Function::Single(name) => write_str(&mut body, name),
            Function::Stages(names) => {
                write_array_head(&mut body, names.len());
                for name in names {
                    write_str(&mut body, name);
                }
            }
        }
        write_str(&mut body, "cache");
        write_str(&mut body, stamp.cache);
        write_str(&mut body, "headers");
        write_map_head(&mut body, headers);
        for (name, value) in stamp.headers(message) {
            write_str(&mut body, name);
            write_str(&mut body, value);
        }
        write_str(&mut body, "payload");
        write_bin(&mut body, &message.payload);
        check_size(body.len(), self.max_size())?;
        Ok(Bytes::from(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages() -> Vec<Message> {
        let long = "x".repeat(300);
        let mut stages = Message::call(
            Function::Stages(vec!["a.f".into(), "b.g".into(), long.clone()]),
            vec![7u8; 70_000],
        );
        stages.stage = 1;
        // Each width of a stage number, and headers that a stamp's fall before, between and after.
        let staged = [(127, "a"), (128, "b"), (300, "s"), (70_000, "u")].map(|(stage, name)| {
            let mut staged = Message::call("server.echo", Bytes::from_static(b"hi"));
            staged.stage = stage;
            staged.headers.insert(name.into(), long.clone());
            staged
        });
        let mut all = vec![
            Message::call("server.echo", Bytes::new()),
            Message::call("server.echo", vec![1u8; 300])
                .with_header("rylm-deadline-ms", "5")
                .with_header("a-first", "1")
                .with_header("traceparent", "old")
                .with_header("zz-last", &long),
            stages,
        ];
        all.extend(staged);
        all
    }

    #[test]
    fn a_stamped_body_is_what_the_stamped_message_encodes_to() {
        let codec = NativeCodec::default();
        let stamps = [
            Stamp::default(),
            Stamp {
                client: "client-1",
                pipeline: &"p".repeat(40),
                cache: "12345",
                headers: &[
                    ("rylm-deadline-ms", "30000"),
                    ("traceparent", "00-ab-cd-01"),
                ],
            },
            Stamp {
                client: "c",
                pipeline: "",
                cache: "0",
                headers: &[("0-before-all", "x"), ("zzz-after-all", "y")],
            },
        ];
        for message in messages() {
            for stamp in &stamps {
                let mut stamped = message.clone();
                stamp.apply(&mut stamped);
                let expected = codec.encode(&stamped).expect("encodes");
                let written = codec.encode_stamped(&message, stamp).expect("writes");
                assert_eq!(written, expected, "{stamp:?} on {message:?}");
                assert_eq!(codec.decode(written).expect("decodes"), stamped);
            }
        }
        let small = NativeCodec::with_max_size(100);
        let big = Message::call("f", vec![0u8; 200]);
        assert!(small.encode_stamped(&big, &Stamp::default()).is_err());
    }
}
