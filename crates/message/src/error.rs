//! The one error type of this crate.

/// Everything that can go wrong when a message is encoded or decoded.
///
/// Decoders return these for any input they cannot accept; they never panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An input or an encoded message is larger than the codec's limit. Decoders check the
    /// size before they allocate anything for the message.
    #[error("message of {size} bytes is above the limit of {limit} bytes")]
    TooLarge {
        /// The size of the input (or of the announced frame on a stream).
        size: usize,
        /// The codec's configured limit.
        limit: usize,
    },

    /// The first ZeroMQ frame is not rylm's marker: the peer speaks another protocol.
    #[error(
        "not a rylm message: the first frame should be the marker `RYLM` and a version byte, \
         found {found} (is the peer speaking another protocol, such as pylm?)"
    )]
    NotRylm {
        /// The start of the frame that was found, in hex.
        found: String,
    },

    /// The peer speaks another version of rylm's native protocol.
    #[error("the peer speaks rylm wire version {found}; this build speaks version {supported}")]
    UnsupportedVersion {
        /// The version byte that was found.
        found: u8,
        /// The version this build speaks.
        supported: u8,
    },

    /// A multipart message has the wrong number of frames for the codec.
    #[error("expected {expected} frame(s) per message, found {found}")]
    FrameCount {
        /// How many frames the codec expects.
        expected: usize,
        /// How many frames arrived.
        found: usize,
    },

    /// The bytes are not a valid message for the codec.
    #[error("malformed {codec} message: {reason}")]
    Malformed {
        /// The codec that refused the input.
        codec: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The message cannot be written in the codec's format.
    #[error("the {codec} format cannot carry this message: {reason}")]
    Unrepresentable {
        /// The codec that refused the message.
        codec: &'static str,
        /// Which part of the message it cannot carry.
        reason: String,
    },

    /// The byte stream under a [`StreamCodec`](crate::StreamCodec) failed.
    #[error("stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn malformed(codec: &'static str, reason: impl std::fmt::Display) -> Self {
        Error::Malformed {
            codec,
            reason: reason.to_string(),
        }
    }

    /// The start of `bytes` in hex, for error messages about unexpected input.
    pub(crate) fn preview(bytes: &[u8]) -> String {
        const SHOWN: usize = 16;
        let mut hex: String = bytes
            .iter()
            .take(SHOWN)
            .map(|b| format!("{b:02x}"))
            .collect();
        if bytes.is_empty() {
            hex.push_str("an empty frame");
        } else if bytes.len() > SHOWN {
            hex.push_str(&format!("... ({} bytes)", bytes.len()));
        }
        hex
    }
}
