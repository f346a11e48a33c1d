//! The [`Codec`] trait that every wire format implements.

use bytes::Bytes;

use crate::{Error, Message};

/// The default limit on the size of one encoded message: 16 MiB.
pub const DEFAULT_MAX_SIZE: usize = 16 * 1024 * 1024;

/// A wire format for [`Message`]s.
///
/// `encode` and `decode` work on one contiguous body. `encode_frames` and `decode_frames` give
/// the ZeroMQ multipart form; by default it is the body alone, one frame. Routing frames (a PUB
/// topic, a ROUTER identity) belong to the socket layer and are never seen here.
///
/// Implementations are total: `decode` and `decode_frames` return an [`Error`] for any input
/// they cannot accept, and check the input's size against their limit before allocating.
pub trait Codec: Send + Sync + 'static {
    /// A short name for logs and errors: `native`, `json`, `pylm`.
    fn name(&self) -> &'static str;

    /// The largest encoded message the codec writes or reads, in bytes.
    fn max_size(&self) -> usize;

    /// Writes one message as one body.
    fn encode(&self, message: &Message) -> Result<Bytes, Error>;

    /// Reads one message from one body.
    fn decode(&self, body: Bytes) -> Result<Message, Error>;

    /// Writes one message as the frames of a ZeroMQ multipart message.
    fn encode_frames(&self, message: &Message) -> Result<Vec<Bytes>, Error> {
        Ok(vec![self.encode(message)?])
    }

    /// Reads one message from the frames of a ZeroMQ multipart message.
    fn decode_frames(&self, frames: &[Bytes]) -> Result<Message, Error> {
        match frames {
            [body] => self.decode(body.clone()),
            _ => Err(Error::FrameCount {
                expected: 1,
                found: frames.len(),
            }),
        }
    }
}

/// Refuses an input above `limit` before anything is done with it.
pub(crate) fn check_size(size: usize, limit: usize) -> Result<(), Error> {
    if size > limit {
        Err(Error::TooLarge { size, limit })
    } else {
        Ok(())
    }
}
