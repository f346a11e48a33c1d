//! The outbound parts: [`Emit`] (PUSH, PUB), [`Ask`] (REQ) and [`DealerOut`] (DEALER), each
//! taking messages from the router out through its socket.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rylm_core_router::{Error as RouterError, OutboundQueue};
use rylm_message::{Codec, Message};
use rylm_transport::{Kind, Socket};

use super::{Endpoint, PartSocket, Transport, router_error};
use crate::Error;

/// PUSH or PUB: sends every message it is given; a PUB prefixes the topic `topic(message)`.
pub struct Emit {
    part: PartSocket,
    topic: Option<TopicFn>,
}

impl std::fmt::Debug for Emit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emit").field("part", &self.part).finish()
    }
}

/// The topics a PUB part publishes a message under (usually one).
pub type TopicFn = Arc<dyn Fn(&Message) -> Vec<String> + Send + Sync>;

impl Emit {
    /// A PUSH service or connection. A message waits (up to the transport's send timeout)
    /// for a peer: a worker that joins late still gets what was sent before it came.
    pub async fn push(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(Emit {
            part: PartSocket::open(Kind::Push, endpoint, transport, codec).await?,
            topic: None,
        })
    }

    /// The socket, to watch its peers.
    pub fn socket(&self) -> &Socket {
        self.part.socket()
    }

    /// A PUB service or connection publishing each message under each of `topic(message)`.
    pub async fn publish(
        endpoint: &Endpoint,
        topic: TopicFn,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(Emit {
            part: PartSocket::open(Kind::Pub, endpoint, transport, codec).await?,
            topic: Some(topic),
        })
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        self.part.address()
    }

    /// The router component.
    pub async fn run(self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        while let Some(delivery) = queue.recv().await {
            let (message, responder) = delivery.into_parts();
            let sent = match &self.topic {
                None => self.part.send(None, &message).await,
                Some(topics) => {
                    let mut sent = Ok(());
                    for topic in topics(&message) {
                        sent = sent.and(self.part.send(Some(Bytes::from(topic)), &message).await);
                    }
                    sent
                }
            };
            responder.send(sent.map(|()| None).map_err(router_error));
        }
        self.part.socket.close().await;
        Ok(())
    }
}

/// How long an [`Ask`] waits for its reply by default.
pub const ASK_DEADLINE: Duration = Duration::from_secs(10);

/// REQ: sends each message and hands back the reply as feedback, one at a time. A request
/// without a reply within its deadline fails, and the socket is opened afresh (REQ cannot send
/// again before it has a reply).
#[derive(Debug)]
pub struct Ask {
    part: PartSocket,
    endpoint: Endpoint,
    transport: Transport,
    raw_replies: bool,
    deadline: Duration,
}

impl Ask {
    /// A REQ service or connection.
    pub async fn req(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(Ask {
            part: PartSocket::open(Kind::Req, endpoint, transport, codec).await?,
            endpoint: endpoint.clone(),
            transport: transport.clone(),
            raw_replies: false,
            deadline: ASK_DEADLINE,
        })
    }

    /// Takes replies as raw bytes, as pylm's cache sends them: the reply becomes the request's
    /// envelope with those bytes as payload, marked [`crate::MISSING`] when empty.
    pub fn with_raw_replies(mut self) -> Self {
        self.raw_replies = true;
        self
    }

    /// Waits at most `deadline` for each reply (default [`ASK_DEADLINE`]).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// One request and its reply.
    pub async fn ask(&mut self, message: &Message) -> Result<Message, Error> {
        let exchange = async {
            self.part.send(None, message).await?;
            self.part.recv().await.ok_or(Error::Closed)
        };
        let reply = match tokio::time::timeout(self.deadline, exchange).await {
            Ok(Ok(reply)) => reply,
            failed => {
                // The REQ is stuck waiting for a reply that may never come: start afresh.
                let fresh = PartSocket::open(
                    Kind::Req,
                    &self.endpoint,
                    &self.transport,
                    self.part.codec.clone(),
                )
                .await?;
                std::mem::replace(&mut self.part, fresh)
                    .socket
                    .close()
                    .await;
                return Err(match failed {
                    Ok(Err(error)) => error,
                    _ => Error::Timeout {
                        what: format!("a reply from {}", self.endpoint_address()),
                        waited: self.deadline,
                    },
                });
            }
        };
        if self.raw_replies {
            let payload: Bytes = reply.concat().into();
            let reply = message.reply(payload.clone());
            return Ok(if payload.is_empty() {
                reply.with_header(crate::MISSING, "true")
            } else {
                reply
            });
        }
        Ok(self.part.codec.decode_frames(&reply)?)
    }

    fn endpoint_address(&self) -> &str {
        match &self.endpoint {
            Endpoint::Bind(address) | Endpoint::Connect(address) => address,
        }
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        self.part.address()
    }

    /// The router component (register it blocking).
    pub async fn run(mut self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        while let Some(delivery) = queue.recv().await {
            let (message, responder) = delivery.into_parts();
            responder.send(self.ask(&message).await.map(Some).map_err(router_error));
        }
        Ok(())
    }
}

/// DEALER: sends each message and hands back the answer carrying the same `cache` id as
/// feedback; many at once.
#[derive(Debug)]
pub struct DealerOut {
    part: PartSocket,
}

type Pending = Arc<std::sync::Mutex<HashMap<String, rylm_core_router::Responder>>>;

impl DealerOut {
    /// A DEALER service or connection.
    pub async fn dealer(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<Self, Error> {
        Ok(DealerOut {
            part: PartSocket::open(Kind::Dealer, endpoint, transport, codec).await?,
        })
    }

    /// The address the socket is on.
    pub fn address(&self) -> &str {
        self.part.address()
    }

    /// The router component (register it blocking). A message without a `cache` id gets one.
    pub async fn run(self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        let pending: Pending = Arc::default();
        let answers = tokio::spawn(Self::answers(self.part.clone(), pending.clone()));
        while let Some(delivery) = queue.recv().await {
            let (mut message, responder) = delivery.into_parts();
            if message.cache.is_empty() {
                message.cache = rylm_message::new_id();
            }
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(message.cache.clone(), responder);
            if let Err(error) = self.part.send(None, &message).await {
                let responder = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&message.cache);
                if let Some(responder) = responder {
                    responder.send(Err(router_error(error)));
                }
            }
        }
        answers.abort();
        Ok(())
    }

    async fn answers(part: PartSocket, pending: Pending) {
        while let Some(received) = part.recv().await {
            let answer = match part.codec.decode_frames(&received) {
                Ok(answer) => answer,
                Err(error) => {
                    tracing::warn!(address = %part.address, %error, "dropped an answer that does not decode");
                    continue;
                }
            };
            let responder = pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&answer.cache);
            match responder {
                Some(responder) => responder.send(Ok(Some(answer))),
                None => {
                    tracing::debug!(address = %part.address, cache = %answer.cache, "an answer nobody waits for")
                }
            }
        }
    }
}
