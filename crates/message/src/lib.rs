//! The one message that travels through every rylm part, and the ways it is put on the wire.
//!
//! Every rylm server, router and component passes the same envelope, [`Message`]: a stream id
//! (`pipeline`), the id of the client that started the stream (also the topic its results are
//! published on), a `stage`, the [`Function`] to call (one name, or a list of stages that run as
//! a pipeline of functions), a `cache` key, free-form string `headers`, and an opaque `payload`.
//! The payload is a [`bytes::Bytes`], so passing a message along, cloning it or replying to it
//! never copies the payload; decoding a native frame slices the payload out of the frame instead
//! of copying it.
//!
//! # Codecs
//!
//! A [`Codec`] turns a message into bytes and back. Three are provided:
//!
//! - [`NativeCodec`]: MessagePack with named fields and the payload as binary, rylm's own wire
//!   format. On ZeroMQ a message is two frames, a marker frame (`RYLM` and a version byte) and
//!   the body, so that a peer that speaks another protocol or another version gets a clear error
//!   instead of garbage. [`StreamCodec`] carries the same bodies over byte streams with a
//!   length prefix (a `tokio_util` codec). `docs/wire-format.md` documents both byte by byte.
//! - [`JsonCodec`]: the same envelope as a JSON object (payload in base64), for the peers that
//!   speak JSON.
//! - `PylmCodec` (feature `pylm`): pylm's `PalmMessage` protobuf, field for field, so that
//!   real pylm clients and workers can join a rylm cluster.
//!
//! Decoding is total: any input yields a message or an [`Error`], never a panic, and an input
//! above the codec's size limit is refused before anything is allocated for it.
//!
//! A part that only routes a native message need not decode it: [`NativeCodec::view`] checks
//! the frames exactly as decoding does and gives a [`NativeView`] that borrows every field from
//! the body (a header looked up in place, nothing allocated), so the frames can go on as they
//! came.
//!
//! # What this crate is not
//!
//! It does no I/O and knows no sockets: the ZeroMQ, HTTP, Redis and AMQP layers live in the
//! crates above it and hand this one frames and bytes.
//!
//! # Example
//!
//! ```
//! use rylm_message::{Codec, Message, NativeCodec};
//!
//! let request = Message::call("server.echo", "hello").with_client("client-1");
//! let codec = NativeCodec::default();
//! let frames = codec.encode_frames(&request)?;
//! let received = codec.decode_frames(&frames)?;
//! assert_eq!(received, request);
//!
//! let reply = received.reply("HELLO");
//! assert_eq!(reply.client, "client-1");
//! assert_eq!(&reply.payload[..], b"HELLO");
//! # Ok::<(), rylm_message::Error>(())
//! ```
#![warn(missing_docs)]

mod codec;
mod envelope;
mod error;
mod json;
pub mod msgpack;
mod native;
#[cfg(feature = "pylm")]
mod pylm;
pub mod samples;
mod stamp;
pub mod stats;
mod stream;
pub mod trace;
mod view;

pub use codec::{Codec, DEFAULT_MAX_SIZE};
pub use envelope::{Function, Message, new_id};
pub use error::Error;
pub use json::JsonCodec;
pub use native::{MARKER, NativeCodec, WIRE_VERSION};
#[cfg(feature = "pylm")]
pub use pylm::{PalmMessage, PylmCodec};
pub use stamp::Stamp;
pub use stream::StreamCodec;
pub use view::{Answering, Forward, NativeView};
