//! ZeroMQ sockets as router components: a *service* binds, a *connection* connects.
//!
//! | pattern | side | component | blocking |
//! |---|---|---|---|
//! | PULL, SUB | inbound | [`Listen`] | no: each message is submitted and travels on |
//! | REP | inbound | [`Answer`] | yes: the feedback is the reply |
//! | ROUTER | inbound | [`RouterIn`] | yes, many at once: each feedback goes back to its peer |
//! | PUSH, PUB | outbound | [`Emit`] | no (a PUB's topic comes from the message) |
//! | REQ | outbound | [`Ask`] | yes, one at a time: the reply is the feedback |
//! | DEALER | outbound | [`DealerOut`] | yes, many at once, matched by the message's `cache` id |
//!
//! Every part is one shape: a [`PartSocket`] (a `rylm-transport` socket, its codec and its
//! address) and the loop of its pattern. Sockets come from `rylm-transport` with its safe
//! defaults and the [`Transport`] options given (security among them): connecting parts
//! reconnect by themselves when their peer comes back. Messages are read and written with the
//! part's [`Codec`]; a frame that does not decode is logged and dropped (an [`Answer`] replies
//! with an error message, as REP must reply).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rylm_core_router::{Error as RouterError, InboundLink};
use rylm_message::{Codec, Message};
use rylm_transport::{Kind, Options, Security, Socket};

use crate::Error;

mod held;
mod inbound;
mod outbound;

pub use held::HeldPublisher;
pub use inbound::{Answer, Listen, RouterIn};
pub use outbound::{ASK_DEADLINE, Ask, DealerOut, Emit, TopicFn};

/// Where a part's socket goes: bound (a service) or connected (a connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Bind this address (`tcp://127.0.0.1:0` picks a free port).
    Bind(String),
    /// Connect to this address.
    Connect(String),
}

/// The socket options of a server, worker or client: one set for the sockets it binds, one
/// for those it connects (CURVE has a server side and a client side).
#[derive(Clone, Debug, Default)]
pub struct Transport {
    /// Options of bound sockets.
    pub bound: Options,
    /// Options of connected sockets.
    pub connected: Options,
}

impl Transport {
    /// Bound sockets are CURVE servers with `keypair`, admitting the clients in `allowed`
    /// (or any client that knows the server's public key, with `None`).
    pub fn curve_server(
        mut self,
        keypair: rylm_transport::Keypair,
        allowed: Option<Vec<rylm_transport::PublicKey>>,
    ) -> Self {
        self.bound = self
            .bound
            .security(Security::CurveServer { keypair, allowed });
        self
    }

    /// Connected sockets are CURVE clients with `keypair`, of a server whose key is `server`.
    pub fn curve_client(
        mut self,
        keypair: rylm_transport::Keypair,
        server: rylm_transport::PublicKey,
    ) -> Self {
        self.connected = self
            .connected
            .security(Security::CurveClient { keypair, server });
        self
    }

    /// The options for a socket going to `endpoint`.
    pub fn options(&self, endpoint: &Endpoint) -> &Options {
        match endpoint {
            Endpoint::Bind(_) => &self.bound,
            Endpoint::Connect(_) => &self.connected,
        }
    }

    /// A socket of `kind` bound or connected as `endpoint` says, and the address it is on.
    pub async fn open(&self, kind: Kind, endpoint: &Endpoint) -> Result<(Socket, String), Error> {
        let socket = Socket::new(kind, self.options(endpoint))?;
        let address = match endpoint {
            Endpoint::Bind(address) => socket.bind(address).await?,
            Endpoint::Connect(address) => {
                socket.connect(address).await?;
                address.clone()
            }
        };
        Ok((socket, address))
    }
}

/// What every part holds: its socket, its codec and the address it is on.
#[derive(Clone)]
pub struct PartSocket {
    socket: Socket,
    codec: Arc<dyn Codec>,
    address: String,
}

impl std::fmt::Debug for PartSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartSocket")
            .field("kind", &self.socket.kind())
            .field("address", &self.address)
            .finish()
    }
}

impl PartSocket {
    /// Opens a socket of `kind` at `endpoint` with `transport`'s options.
    pub async fn open(
        kind: Kind,
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        let (socket, address) = transport.open(kind, endpoint).await?;
        Ok(PartSocket {
            socket,
            codec,
            address,
        })
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The socket itself.
    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    /// Encodes and sends `message`, after `prefix` frames (a topic, an identity).
    async fn send(&self, prefix: Option<Bytes>, message: &Message) -> Result<(), Error> {
        let mut frames = self.codec.encode_frames(message)?;
        if let Some(prefix) = prefix {
            frames.insert(0, prefix);
        }
        Ok(self.socket.send(frames).await?)
    }

    /// The next message's frames; `None` once the socket is closed. Receive errors other than
    /// a close are logged and skipped.
    async fn recv(&self) -> Option<Vec<Bytes>> {
        loop {
            match self.socket.recv().await {
                Ok(frames) => return Some(frames),
                Err(error) if error.is_closed() => return None,
                Err(error) => {
                    tracing::warn!(address = %self.address, %error, "receiving failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// The frame of an error answer: the request's envelope, no payload, the error in headers.
pub fn error_reply(request: &Message, kind: &str, message: &str) -> Message {
    let mut reply = request.reply(Bytes::new());
    reply.headers.insert(crate::ERROR_KIND.into(), kind.into());
    reply
        .headers
        .insert(crate::ERROR_MESSAGE.into(), message.into());
    reply
}

/// The frames of an answer to send: `message` encoded, or, when it does not encode or is above
/// `max_message` (the peer would drop its connection on it), an `unencodable` error reply in its
/// place, so that the peer still gets an answer and learns why. An error only when even that
/// reply does not encode.
pub(crate) fn answer_frames(
    codec: &dyn Codec,
    message: &Message,
    max_message: usize,
) -> Result<Vec<Bytes>, rylm_message::Error> {
    let encoded = codec.encode_frames(message).and_then(|frames| {
        let size: usize = frames.iter().map(Bytes::len).sum();
        if size > max_message {
            Err(rylm_message::Error::TooLarge {
                size,
                limit: max_message,
            })
        } else {
            Ok(frames)
        }
    });
    match encoded {
        Ok(frames) => Ok(frames),
        Err(error) => {
            tracing::warn!(%error, "an answer could not be sent as it is; sending an error instead");
            codec.encode_frames(&error_reply(message, "unencodable", &error.to_string()))
        }
    }
}

/// The answer to a request that arrived as `frames`: its feedback through the router, or an
/// error reply for a request that does not decode or could not be routed.
async fn answer(link: &InboundLink, codec: &dyn Codec, frames: &[Bytes]) -> Message {
    match codec.decode_frames(frames) {
        Ok(request) => match link.submit(request.clone()).await {
            Ok(Some(feedback)) => feedback,
            Ok(None) => request.reply(Bytes::new()),
            Err(error) => error_reply(&request, "failed", &error.to_string()),
        },
        Err(error) => error_reply(&Message::default(), "malformed", &error.to_string()),
    }
}

fn router_error(error: Error) -> RouterError {
    RouterError::Component {
        component: "socket".into(),
        reason: error.to_string(),
    }
}
