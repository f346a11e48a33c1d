//! The Server: runs user functions itself (PULL from clients, PUB results, REP cache).

use std::sync::Arc;

use rylm_core_router::{Mode, Router};
use rylm_message::{Codec, Message, NativeCodec};
use tokio::sync::watch;

use crate::cache::CacheStore;
use crate::parts::{Emit, Endpoint, Listen, TopicFn};
use crate::{Error, Functions};

/// Builds a [`Server`]. Every address defaults to a free loopback tcp port.
pub struct ServerBuilder {
    name: String,
    pull: Endpoint,
    publish: Endpoint,
    cache: Endpoint,
    functions: Functions,
    codec: Arc<dyn Codec>,
    handle_stream: TopicFn,
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
        self.pull = Endpoint::Bind(address.to_owned());
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

    /// The wire format (default: rylm's native codec).
    pub fn codec(mut self, codec: Arc<dyn Codec>) -> Self {
        self.codec = codec;
        self
    }

    /// pylm's `handle_stream` hook: the topic a result is published under. The default is the
    /// client's id, which is what its client subscribes to.
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
        let pull = Listen::pull(&self.pull, self.codec.clone()).await?;
        let publish = Emit::publish(&self.publish, self.handle_stream, self.codec.clone()).await?;
        let (pull_address, pub_address) = (pull.address().to_owned(), publish.address().to_owned());
        let store = CacheStore::default();
        let (db_address, cache_task) = store
            .clone()
            .serve(&self.cache, self.codec.clone(), stopped)
            .await?;
        store.set("name", self.name.clone());
        store.set("pull_address", pull_address.clone());
        store.set("pub_address", pub_address.clone());
        store.set("db_address", db_address.clone());

        let (functions, name) = (self.functions, self.name.clone());
        let router = Router::builder()
            .outbound(
                "publish",
                move |queue| publish.run(queue),
                None,
                Mode::NonBlocking,
            )
            .outbound(
                "functions",
                move |queue| functions.run(name, queue),
                Some("publish"),
                Mode::Blocking,
            )
            .inbound(
                "clients",
                move |link| pull.run(link),
                "functions",
                Mode::NonBlocking,
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
            pull: loopback(),
            publish: loopback(),
            cache: loopback(),
            functions: Functions::new(),
            codec: Arc::new(NativeCodec::default()),
            handle_stream: {
                let name = name.to_owned();
                Arc::new(move |message: &Message| crate::default_topic(&name, message))
            },
        }
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

    /// Stops taking requests, finishes and publishes the ones taken, then closes.
    pub async fn shutdown(self) -> Result<(), Error> {
        let outcome = self.router.shutdown().await;
        let _ = self.stop.send(true);
        let _ = self.cache_task.await;
        // No LINGER in this ZeroMQ: give the last results a moment to leave.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        Ok(outcome?)
    }
}
