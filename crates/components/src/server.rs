//! The Server: runs user functions itself.
//!
//! In rylm's layout callers connect a DEALER to its ROUTER and get each answer back on that
//! connection ([`crate::callers`]); results that go on to another server's stage go down its
//! stream, a ROUTER next stages connect a DEALER to with their name as identity; the cache
//! answers on a REP. In pylm's
//! layout (`pylm` submodule) it is PULL, PUB and REP, as pylm's.

use std::sync::Arc;
use std::time::Instant;

use rylm_core_router::{Mode, Router};
use rylm_message::{Codec, Message, NativeCodec};
use tokio::sync::watch;

use crate::cache::{CacheLimits, CacheStore};
use crate::callers::{CallerSocket, Callers, ResultCounters, Results, status_base};
use crate::discovery::advertised;
use crate::parts::{Endpoint, Listen, Transport};
use crate::{Error, Functions};

#[cfg(feature = "pylm")]
mod pylm;

/// Builds a [`Server`]. Every address defaults to a free loopback tcp port.
pub struct ServerBuilder {
    name: String,
    clients: Endpoint,
    takes_requests: bool,
    previous: Vec<(Endpoint, Vec<String>)>,
    stream: Endpoint,
    cache: Endpoint,
    advertise: Option<String>,
    functions: Functions,
    codec: Arc<dyn Codec>,
    handle_stream: Arc<dyn Fn(&Message) -> String + Send + Sync>,
    pylm: bool,
    transport: Transport,
    cache_limits: CacheLimits,
    max_in_flight: usize,
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
    /// Where callers connect (a ROUTER, bound; in pylm's layout the PULL clients push to).
    pub fn client_address(mut self, address: &str) -> Self {
        self.clients = Endpoint::Bind(address.to_owned());
        self
    }

    /// Takes no requests from clients directly (a Pipeline stage or a Sink). In rylm's layout
    /// its callers' ROUTER is still bound: the callers of a pipeline take their answers there.
    pub(crate) fn without_requests(mut self) -> Self {
        self.takes_requests = false;
        self
    }

    /// Also takes what a previous server sends down its stream (`stream_address`) for this
    /// server: a DEALER connected to it with this server's name as identity. In pylm's layout, a SUB connected to its PUB, subscribed to
    /// `topics` (usually its name). Call it once per previous server (a Sink has several).
    pub fn subscribe_to(mut self, stream_address: &str, topics: &[&str]) -> Self {
        let topics = topics.iter().map(|t| (*t).to_owned()).collect();
        self.previous
            .push((Endpoint::Connect(stream_address.to_owned()), topics));
        self
    }

    /// Where next stages connect (a ROUTER, bound; in pylm's layout the PUB of results).
    pub fn stream_address(mut self, address: &str) -> Self {
        self.stream = Endpoint::Bind(address.to_owned());
        self
    }

    /// Where the cache answers (REP, bound).
    pub fn db_address(mut self, address: &str) -> Self {
        self.cache = Endpoint::Bind(address.to_owned());
        self
    }

    /// The host other machines reach this server at: the addresses its cache gives out name
    /// it instead of the host bound (needed when binding a wildcard such as `0.0.0.0`).
    pub fn advertise(mut self, host: &str) -> Self {
        self.advertise = Some(host.to_owned());
        self
    }

    /// The functions the server runs.
    pub fn functions(mut self, functions: Functions) -> Self {
        self.functions = functions;
        self
    }

    #[cfg(feature = "pylm")]
    /// Speaks pylm's wire format and layout, so that real pylm clients use this server:
    /// PalmMessage frames, PULL and PUB, a cache that answers raw bytes, and `b"0"` as the
    /// result of a failed function.
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

    /// The bounds of what peers store in the cache (default [`CacheLimits::default`]).
    pub fn cache_limits(mut self, limits: CacheLimits) -> Self {
        self.cache_limits = limits;
        self
    }

    /// How many messages from callers it holds at once (default 1024); beyond them a caller
    /// is answered `busy` at once.
    pub fn max_in_flight(mut self, messages: usize) -> Self {
        self.max_in_flight = messages.max(1);
        self
    }

    /// Socket options, security among them (default: `rylm-transport`'s safe defaults, NULL
    /// security).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// pylm's `handle_stream` hook: where a result goes. The default is the client's id (its
    /// caller), or this server's name when the message goes on to another server's stage (down
    /// the stream; in pylm's layout, the topic it is published under).
    pub fn handle_stream(
        mut self,
        topic: impl Fn(&Message) -> String + Send + Sync + 'static,
    ) -> Self {
        self.handle_stream = Arc::new(topic);
        self
    }

    /// Binds every socket, presets the cache, and starts serving.
    pub async fn start(self) -> Result<Server, Error> {
        #[cfg(feature = "pylm")]
        if self.pylm {
            return self.start_pylm().await;
        }
        let (stop, stopped) = watch::channel(false);
        let codec = self.codec.clone();
        let callers = CallerSocket::open(&self.clients, &self.transport, codec.clone()).await?;
        let counters = callers.counters();
        let status = {
            let (name, counters, started) = (self.name.clone(), counters.clone(), Instant::now());
            let mut functions: Vec<String> = self.functions.names().map(str::to_owned).collect();
            functions.sort();
            let kind = if self.previous.is_empty() {
                "server"
            } else {
                "pipeline"
            };
            Arc::new(move || status_base(&name, kind, started, functions.clone(), &counters))
        };
        let results = Results::new(
            callers.clone(),
            &self.stream,
            &self.transport,
            &self.name,
            self.handle_stream.clone(),
        )
        .await?;
        let client_address = advertised(callers.address(), self.advertise.as_deref())?;
        let stream_address = advertised(results.stream_address(), self.advertise.as_deref())?;
        let mut builder = Router::builder()
            .capacity(self.max_in_flight)
            .outbound(
                "results",
                move |queue| results.run(queue),
                None,
                Mode::NonBlocking,
            )
            .inbound(
                "callers",
                move |link| Callers::new(callers).with_status(status).run(link),
                "functions",
                Mode::NonBlocking,
            );
        for (i, (endpoint, _)) in self.previous.iter().enumerate() {
            let pull = Listen::dealer(endpoint, &self.name, &self.transport, codec.clone()).await?;
            builder = builder.inbound(
                &format!("previous-{i}"),
                move |link| pull.run(link),
                "functions",
                Mode::NonBlocking,
            );
        }
        let store = CacheStore::default().with_limits(self.cache_limits.clone());
        let (db_address, cache_task) = store
            .clone()
            .serve(&self.cache, &self.transport, codec, stopped)
            .await?;
        let db_address = advertised(&db_address, self.advertise.as_deref())?;
        store.preset("name", self.name.clone());
        store.preset("client_address", client_address.clone());
        store.preset("stream_address", stream_address.clone());
        store.preset("db_address", db_address.clone());
        let (functions, name) = (self.functions, self.name.clone());
        let router = builder
            .outbound(
                "functions",
                move |queue| functions.run(name, queue),
                Some("results"),
                Mode::Blocking,
            )
            .start()?;
        tracing::info!(name = %self.name, %client_address, %stream_address, %db_address, "server started");
        Ok(Server {
            name: self.name,
            client_address,
            stream_address,
            db_address,
            router,
            stop,
            cache_task,
            store,
            counters,
        })
    }
}

/// A running Server: callers connect to its client address and find it through its cache,
/// whose address alone is enough for a [`crate::Client`].
#[derive(Debug)]
pub struct Server {
    name: String,
    client_address: String,
    stream_address: String,
    db_address: String,
    router: Router,
    stop: watch::Sender<bool>,
    cache_task: tokio::task::JoinHandle<()>,
    store: CacheStore,
    counters: Arc<ResultCounters>,
}

impl Server {
    /// A builder for a server named `name`.
    pub fn builder(name: &str) -> ServerBuilder {
        ServerBuilder {
            name: name.to_owned(),
            clients: loopback(),
            takes_requests: true,
            previous: Vec::new(),
            stream: loopback(),
            cache: loopback(),
            advertise: None,
            functions: Functions::new(),
            pylm: false,
            transport: Transport::default(),
            cache_limits: CacheLimits::default(),
            max_in_flight: rylm_core_router::DEFAULT_CAPACITY,
            codec: Arc::new(NativeCodec::default()),
            handle_stream: {
                let name = name.to_owned();
                Arc::new(move |message: &Message| crate::default_topic(&name, message))
            },
        }
    }

    /// A builder for a Pipeline stage named `name`: it takes what the server at
    /// `previous_stream_address` sends down its stream (in pylm's layout, what it publishes
    /// under `previous_name`), runs its functions, and sends results on (for a next stage) or
    /// to their callers (at the last stage).
    pub fn pipeline(
        name: &str,
        previous_stream_address: &str,
        previous_name: &str,
    ) -> ServerBuilder {
        Server::builder(name)
            .without_requests()
            .subscribe_to(previous_stream_address, &[previous_name])
    }

    /// A builder for a Sink named `name`: add each previous server with
    /// [`ServerBuilder::subscribe_to`].
    pub fn sink(name: &str) -> ServerBuilder {
        Server::builder(name).without_requests()
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where callers connect (in pylm's layout, where clients push).
    pub fn client_address(&self) -> &str {
        &self.client_address
    }

    /// Where the next stage connects (in pylm's layout, where results are published).
    pub fn stream_address(&self) -> &str {
        &self.stream_address
    }

    /// Where the cache answers.
    pub fn db_address(&self) -> &str {
        &self.db_address
    }

    /// The cache's store, to preset or read keys.
    pub fn cache(&self) -> &CacheStore {
        &self.store
    }

    /// What became of its results: answered, streamed, `busy`, dropped (rylm's layout).
    pub fn counters(&self) -> Arc<ResultCounters> {
        self.counters.clone()
    }

    /// Resolves when a part of the server stops while it runs (a socket closed under it, a
    /// panic), with what happened: the server can no longer serve, and its process should end
    /// or restart it. Never resolves while every part runs.
    pub async fn died(&self) -> String {
        self.router.died().await
    }

    /// Stops taking requests, finishes and sends the results of the ones taken, then closes.
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
