//! Sample messages: the source of the golden vectors and of `docs/wire-format.md`.
//!
//! `cargo xtask codegen` encodes each sample with each codec into `crates/message/vectors/`,
//! and the tests decode every vector back. Changing a sample, or a codec's output, makes
//! `cargo xtask codegen --check` fail until the vectors are written again and reviewed.

use crate::{Function, Message};

/// One named sample.
#[derive(Clone, Debug)]
pub struct Sample {
    /// A file-name-safe name.
    pub name: &'static str,
    /// What the sample shows.
    pub about: &'static str,
    /// The message.
    pub message: Message,
}

/// Every sample, in a fixed order.
pub fn all() -> Vec<Sample> {
    vec![
        Sample {
            name: "call",
            about: "a client's call: one function, a stream and a client id, a text payload",
            message: Message::call("server.echo", "hello")
                .with_pipeline("pipe-1")
                .with_client("client-1"),
        },
        Sample {
            name: "empty",
            about: "every field empty",
            message: Message::default(),
        },
        Sample {
            name: "stages",
            about: "a pipeline of functions at its second stage, with a cache key",
            message: Message::call(Function::stages(["parse.tokens", "store.save"]), "a b c")
                .with_pipeline("pipe-2")
                .with_client("client-2")
                .with_stage(1)
                .with_cache("key-42"),
        },
        Sample {
            name: "headers",
            about: "headers as an HTTP gateway sets them",
            message: Message::call("server.upper", "{\"text\":\"hi\"}")
                .with_client("client-3")
                .with_header("content-type", "application/json")
                .with_header("query.lang", "en"),
        },
        Sample {
            name: "binary",
            about: "a payload of every byte value, 0 to 255",
            message: Message::call("server.bytes", (0..=255u8).collect::<Vec<u8>>())
                .with_client("client-4"),
        },
    ]
}

/// A sample as the pylm codec carries it: pylm has no headers.
#[cfg(feature = "pylm")]
pub fn as_pylm_sees_it(message: &Message) -> Message {
    Message {
        headers: Default::default(),
        ..message.clone()
    }
}
