//! The Server: runs user functions itself (PULL from clients, PUB results, REP cache).

use std::sync::Arc;

use rylm_core_router::{Mode, Router};
use rylm_message::{Codec, Message, NativeCodec};
use tokio::sync::watch;

use crate::cache::CacheStore;
use crate::parts::{Emit, Endpoint, Listen, TopicFn, Transport};
use crate::{Error, Functions, SYNC_FUNCTION};

/// Builds a [`Server`]. Every address defaults to a free loopback tcp port.
pub struct ServerBuilder {
    name: String,
    pull: Option<Endpoint>,
    subscriptions: Vec<(Endpoint, Vec<String>)>,
    publish: Endpoint,
    cache: Endpoint,
    functions: Functions,
    codec: Arc<dyn Codec>,
    handle_stream: Arc<dyn Fn(&Message) -> String + Send + Sync>,
    pylm: bool,
    transport: Transport,
    cache_limits: crate::CacheLimits,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("name", &self.name)
            .finish()
    }
}

fn loopback() -> Endpoint {
    Endpoint::Bind("tcp://127.0.0.1:0".into())
}

impl ServerBuilder {
    /// Where clients push requests (PULL, bound).
    pub fn pull_address(mut self, address: &str) -> Self {
        self.pull = Some(Endpoint::Bind(address.to_owned()));
        self
    }

    /// Takes no requests from clients directly (a Pipeline stage or a Sink).
    pub fn without_pull(mut self) -> Self {
        self.pull = None;
        self
    }

    /// Also takes the messages a previous server publishes under `topics` (usually its name):
    /// a SUB connected to its PUB. Call it once per previous server (a Sink has several).
    pub fn subscribe_to(mut self, pub_address: &str, topics: &[&str]) -> Self {
        let topics = topics.iter().map(|t| (*t).to_owned()).collect();
        self.subscriptions
            .push((Endpoint::Connect(pub_address.to_owned()), topics));
        self
    }

    /// Where results are published (PUB, bound).
    pub fn pub_address(mut self, address: &str) -> Self {
        self.publish = Endpoint::Bind(address.to_owned());
        self
    }

    /// Where the cache answers (REP, bound).
    pub fn db_address(mut self, address: &str) -> Self {
        self.cache = Endpoint::Bind(address.to_owned());
        self
    }

    /// The functions the server runs.
    pub fn functions(mut self, functions: Functions) -> Self {
        self.functions = functions;
        self
    }

    #[cfg(feature = "pylm")]
    /// Speaks pylm's wire format, so that real pylm clients use this server: PalmMessage frames,
    /// a cache that answers raw bytes, and `b"0"` as the result of a failed function.
    pub fn pylm_wire(mut self) -> Self {
        self.codec = Arc::new(rylm_message::PylmCodec::default());
        self.pylm = true;
        self
    }

    /// The wire format (default: rylm's native codec).
    pub fn codec(mut self, codec: Arc<dyn Codec>) -> Self {
        self.codec = codec;
        self
    }

    /// The bounds of what peers store in the cache (default [`crate::CacheLimits::default`]).
    pub fn cache_limits(mut self, limits: crate::CacheLimits) -> Self {
        self.cache_limits = limits;
        self
    }

    /// Socket options, security among them (default: `rylm-transport`'s safe defaults, NULL
    /// security).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// pylm's `handle_stream` hook: the topic a result is published under. The default is the
    /// client's id, which is what its client subscribes to, or this server's name when the
    /// message goes on to another server's stage.
    pub fn handle_stream(
        mut self,
        topic: impl Fn(&Message) -> String + Send + Sync + 'static,
    ) -> Self {
        self.handle_stream = Arc::new(topic);
        self
    }

    /// Binds every socket, presets the cache, and starts serving.
    pub async fn start(self) -> Result<Server, Error> {
        let (stop, stopped) = watch::channel(false);
        // A client's handshake (see `Client`) travels down a pipeline: each stage publishes it to
        // the client and under its own name, for the next stage.
        let (hook, name) = (self.handle_stream, self.name.clone());
        let topics: TopicFn = Arc::new(move |message: &Message| {
            let topic = hook(message);
            if message.function_name() == Some(SYNC_FUNCTION) && topic != name {
                vec![topic, name.clone()]
            } else {
                vec![topic]
            }
        });
        // pylm clients subscribe just before they send: hold their results until the
        // subscription arrives. Native clients make sure of theirs with a handshake.
        // When every client reaches this server directly, a subscription stays good until a
        // new client connection arrives (see `HeldPublisher`).
        let connections = (self.pylm && self.pull.is_some() && self.subscriptions.is_empty())
            .then(|| Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let (pub_address, mut builder) = if self.pylm {
            let grace = std::time::Duration::from_millis(50);
            let mut publish = crate::parts::HeldPublisher::xpub(
                &self.publish,
                topics,
                &self.transport,
                self.codec.clone(),
                grace,
            )
            .await?;
            if let Some(counter) = &connections {
                publish = publish.cleared_until_new_connection(counter.clone());
            }
            let address = publish.address().to_owned();
            let builder = Router::builder().outbound(
                "publish",
                move |queue| publish.run(queue),
                None,
                Mode::NonBlocking,
            );
            (address, builder)
        } else {
            let publish =
                Emit::publish(&self.publish, topics, &self.transport, self.codec.clone()).await?;
            let address = publish.address().to_owned();
            let builder = Router::builder().outbound(
                "publish",
                move |queue| publish.run(queue),
                None,
                Mode::NonBlocking,
            );
            (address, builder)
        };
        let mut pull_address = String::new();
        if let Some(endpoint) = &self.pull {
            let mut pull = Listen::pull(endpoint, &self.transport, self.codec.clone()).await?;
            if let Some(counter) = &connections {
                pull = pull.count_connections(counter.clone());
            }
            pull_address = pull.address().to_owned();
            builder = builder.inbound(
                "clients",
                move |link| pull.run(link),
                "functions",
                Mode::NonBlocking,
            );
        }
        for (i, (endpoint, topics)) in self.subscriptions.iter().enumerate() {
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            let sub = Listen::sub(endpoint, &topics, &self.transport, self.codec.clone()).await?;
            builder = builder.inbound(
                &format!("previous-{i}"),
                move |link| sub.run(link),
                "functions",
                Mode::NonBlocking,
            );
        }
        let store = CacheStore::default().with_limits(self.cache_limits.clone());
        let store = if self.pylm {
            store.with_raw_replies()
        } else {
            store
        };
        let (db_address, cache_task) = store
            .clone()
            .serve(&self.cache, &self.transport, self.codec.clone(), stopped)
            .await?;
        store.preset("name", self.name.clone());
        store.preset("pull_address", pull_address.clone());
        store.preset("pub_address", pub_address.clone());
        store.preset("db_address", db_address.clone());

        let functions = if self.pylm {
            self.functions.failure_payload("0")
        } else {
            self.functions
        };
        let name = self.name.clone();
        let router = builder
            .outbound(
                "functions",
                move |queue| functions.run(name, queue),
                Some("publish"),
                Mode::Blocking,
            )
            .start()?;
        tracing::info!(name = %self.name, %pull_address, %pub_address, %db_address, "server started");
        Ok(Server {
            name: self.name,
            pull_address,
            pub_address,
            db_address,
            router,
            stop,
            cache_task,
            store,
        })
    }
}

/// A running Server: clients push to its PULL, get results from its PUB, and find both through
/// its cache, whose address alone is enough for a [`crate::Client`].
#[derive(Debug)]
pub struct Server {
    name: String,
    pull_address: String,
    pub_address: String,
    db_address: String,
    router: Router,
    stop: watch::Sender<bool>,
    cache_task: tokio::task::JoinHandle<()>,
    store: CacheStore,
}

impl Server {
    /// A builder for a server named `name`.
    pub fn builder(name: &str) -> ServerBuilder {
        ServerBuilder {
            name: name.to_owned(),
            pull: Some(loopback()),
            subscriptions: Vec::new(),
            publish: loopback(),
            cache: loopback(),
            functions: Functions::new(),
            pylm: false,
            transport: Transport::default(),
            cache_limits: crate::CacheLimits::default(),
            codec: Arc::new(NativeCodec::default()),
            handle_stream: {
                let name = name.to_owned();
                Arc::new(move |message: &Message| crate::default_topic(&name, message))
            },
        }
    }

    /// A builder for a Pipeline stage named `name`: it takes what the server at
    /// `previous_pub_address` publishes under `previous_name`, runs its functions, and publishes
    /// under its own name (for a next stage) or to the client (at the last stage).
    pub fn pipeline(name: &str, previous_pub_address: &str, previous_name: &str) -> ServerBuilder {
        Server::builder(name)
            .without_pull()
            .subscribe_to(previous_pub_address, &[previous_name])
    }

    /// A builder for a Sink named `name`: add each previous server with
    /// [`ServerBuilder::subscribe_to`].
    pub fn sink(name: &str) -> ServerBuilder {
        Server::builder(name).without_pull()
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where clients push.
    pub fn pull_address(&self) -> &str {
        &self.pull_address
    }

    /// Where results are published.
    pub fn pub_address(&self) -> &str {
        &self.pub_address
    }

    /// Where the cache answers.
    pub fn db_address(&self) -> &str {
        &self.db_address
    }

    /// The cache's store, to preset or read keys.
    pub fn cache(&self) -> &CacheStore {
        &self.store
    }

    /// Resolves when a part of the server stops while it runs (a socket closed under it, a
    /// panic), with what happened: the server can no longer serve, and its process should end
    /// or restart it. Never resolves while every part runs.
    pub async fn died(&self) -> String {
        self.router.died().await
    }

    /// Stops taking requests, finishes and publishes the ones taken, then closes.
    pub async fn shutdown(self) -> Result<(), Error> {
        let outcome = self.router.shutdown().await;
        let _ = self.stop.send(true);
        let _ = self.cache_task.await;
        Ok(outcome?)
    }

    /// [`Server::shutdown`] within `limit`: what is still running then is dropped, and the
    /// result is a router error that says so.
    pub async fn shutdown_within(self, limit: std::time::Duration) -> Result<(), Error> {
        let outcome = self.router.shutdown_within(limit).await;
        let _ = self.stop.send(true);
        let abort = self.cache_task.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(1), self.cache_task)
            .await
            .is_err()
        {
            abort.abort();
        }
        Ok(outcome?)
    }
}
