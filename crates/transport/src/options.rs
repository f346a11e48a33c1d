//! What a socket is and how it behaves: plain data, no I/O.

use std::time::Duration;

use crate::keys::{Keypair, PublicKey};

/// The ZeroMQ patterns rylm uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Sends round-robin to its peers.
    Push,
    /// Receives from all its peers, fairly.
    Pull,
    /// Publishes to subscribers by topic prefix; drops what no subscriber takes.
    Pub,
    /// Subscribes to topic prefixes.
    Sub,
    /// A PUB that also receives its subscribers' subscriptions (`\x01topic`) as messages.
    XPub,
    /// Strict request then reply.
    Req,
    /// Strict reply to each request.
    Rep,
    /// Asynchronous round-robin send, fair receive.
    Dealer,
    /// Receives with the peer's identity as first frame, sends to the identity in the first frame.
    Router,
}

impl Kind {
    pub(crate) fn omq(self) -> omq_tokio::SocketType {
        use omq_tokio::SocketType as T;
        match self {
            Kind::Push => T::Push,
            Kind::Pull => T::Pull,
            Kind::Pub => T::Pub,
            Kind::Sub => T::Sub,
            Kind::XPub => T::XPub,
            Kind::Req => T::Req,
            Kind::Rep => T::Rep,
            Kind::Dealer => T::Dealer,
            Kind::Router => T::Router,
        }
    }
}

/// ZMTP heartbeats: a PING every `interval`; a connection that brings nothing (data or PONG)
/// for `timeout` is closed (and, on a connecting socket, dialled again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// How often to PING.
    pub interval: Duration,
    /// Silence after which the connection is dropped.
    pub timeout: Duration,
}

/// Who may talk to a socket, and how it proves who it is.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Security {
    /// No authentication, no encryption: what pylm peers and plain libzmq speak.
    #[default]
    Null,
    /// A CURVE server (usually the binding side): encrypts every connection; with `allowed`,
    /// only clients whose public key is in the list complete a handshake, so an unknown peer
    /// is refused before any message of it is read.
    CurveServer {
        /// The server's long-term key pair.
        keypair: Keypair,
        /// The client keys admitted; `None` admits any client that knows the server's key.
        allowed: Option<Vec<PublicKey>>,
    },
    /// A CURVE client: encrypts, proves its own key, and checks the server's.
    CurveClient {
        /// The client's long-term key pair.
        keypair: Keypair,
        /// The server's public key.
        server: PublicKey,
    },
    /// A PLAIN server (RFC 24): admits exact user name and password pairs. No encryption: for
    /// trusted networks only.
    PlainServer {
        /// The admitted `(user, password)` pairs.
        users: Vec<(String, String)>,
    },
    /// A PLAIN client.
    PlainClient {
        /// The user name.
        user: String,
        /// The password (never printed).
        password: String,
    },
}

impl Security {
    /// The mechanism's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Security::Null => "NULL",
            Security::CurveServer { .. } => "CURVE server",
            Security::CurveClient { .. } => "CURVE client",
            Security::PlainServer { .. } => "PLAIN server",
            Security::PlainClient { .. } => "PLAIN client",
        }
    }
}

/// The default largest message a socket accepts: `rylm-message`'s frame limit.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = rylm_message::DEFAULT_MAX_SIZE;

/// How a socket behaves. [`Options::default`] is safe for the open internet; every field can
/// be changed with its builder method.
#[derive(Clone, Debug)]
pub struct Options {
    /// The largest message (all frames together) accepted from a peer; a peer that declares
    /// a larger frame is dropped before any of it is buffered.
    pub max_message_size: usize,
    /// How long a new connection may take to complete its ZMTP handshake.
    pub handshake_timeout: Duration,
    /// How many inbound (and, apart, outbound) connections may be in their handshake at once.
    pub max_pending_handshakes: usize,
    /// Messages queued for sending, per peer.
    pub send_hwm: u32,
    /// Messages queued after receipt.
    pub recv_hwm: u32,
    /// How long a graceful [`crate::Socket::close`] waits to flush what was accepted.
    pub linger: Duration,
    /// ZMTP heartbeats, or `None`.
    pub heartbeat: Option<Heartbeat>,
    /// The first delay before dialling a lost peer again; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// The longest delay between two dials.
    pub reconnect_max: Duration,
    /// How long a send waits for a peer to take the message before it fails.
    pub send_timeout: Duration,
    /// The routing identity this socket announces (DEALER, REQ), or empty for a generated one.
    pub identity: bytes::Bytes,
    /// A ROUTER's send to a peer it does not know fails ([`crate::Error`]) instead of being
    /// dropped silently, and one to a peer whose queue is full waits for room (up to the send
    /// timeout).
    pub router_mandatory: bool,
    /// The security mechanism.
    pub security: Security,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 256,
            send_hwm: 1000,
            recv_hwm: 1000,
            linger: Duration::from_secs(2),
            heartbeat: Some(Heartbeat {
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(10),
            }),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            send_timeout: Duration::from_secs(10),
            identity: bytes::Bytes::new(),
            router_mandatory: false,
            security: Security::Null,
        }
    }
}

impl Options {
    /// Sets the largest message accepted.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets the handshake timeout.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets the bound on connections in their handshake.
    pub fn max_pending_handshakes(mut self, count: usize) -> Self {
        self.max_pending_handshakes = count.max(1);
        self
    }

    /// Sets both high-water marks.
    pub fn hwm(mut self, messages: u32) -> Self {
        self.send_hwm = messages.max(1);
        self.recv_hwm = messages.max(1);
        self
    }

    /// Sets the linger of a graceful close.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets (or, with `None`, turns off) ZMTP heartbeats.
    pub fn heartbeat(mut self, heartbeat: Option<Heartbeat>) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Sets the reconnect backoff.
    pub fn reconnect(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// Sets how long a send waits for a peer.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Sets the routing identity this socket announces.
    pub fn identity(mut self, identity: impl Into<bytes::Bytes>) -> Self {
        self.identity = identity.into();
        self
    }

    /// Makes a ROUTER's sends to unknown peers fail (see [`Options::router_mandatory`]).
    pub fn router_mandatory(mut self, mandatory: bool) -> Self {
        self.router_mandatory = mandatory;
        self
    }

    /// Sets the security mechanism.
    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// The implementation's options.
    pub(crate) fn omq(&self) -> Result<omq_tokio::Options, crate::Error> {
        let mut options = omq_tokio::Options::default()
            .max_message_size(self.max_message_size)
            .handshake_timeout(self.handshake_timeout)
            .max_pending_handshakes(self.max_pending_handshakes)
            .send_hwm(self.send_hwm)
            .recv_hwm(self.recv_hwm)
            .linger(self.linger)
            .reconnect(omq_tokio::ReconnectPolicy::Exponential {
                min: self.reconnect_min,
                max: self.reconnect_max,
            });
        if !self.identity.is_empty() {
            options = options.identity(self.identity.clone());
        }
        if self.router_mandatory {
            options = options.router_mandatory(true);
        }
        if let Some(heartbeat) = self.heartbeat {
            options = options
                .heartbeat_interval(heartbeat.interval)
                .heartbeat_ttl(heartbeat.timeout)
                .heartbeat_timeout(heartbeat.timeout);
        }
        Ok(match &self.security {
            Security::Null => options,
            Security::CurveServer { keypair, allowed } => {
                let mut server = omq_tokio::CurveServerOptions::default();
                if let Some(allowed) = allowed {
                    let allowed: std::collections::HashSet<[u8; 32]> =
                        allowed.iter().map(|key| key.0).collect();
                    server = server.authenticator(move |peer| allowed.contains(&peer.public_key));
                }
                options.curve_server_with_options(keypair.omq(), server)
            }
            Security::CurveClient { keypair, server } => {
                options.curve_client(keypair.omq(), server.omq())
            }
            Security::PlainServer { users } => {
                if users.is_empty() {
                    return Err(crate::Error::Options(
                        "a PLAIN server needs at least one user".into(),
                    ));
                }
                options.plain_server_credentials(users.clone())
            }
            Security::PlainClient { user, password } => {
                options.plain_client(user.clone(), password.clone())
            }
        })
    }
}
