//! The Master (and the Hub): a server whose functions run on [`crate::Worker`]s, farmed out by
//! the worker pool of [`crate::pool`] with pylm's `scatter`, `gather` and `handle_stream`
//! hooks. In pylm's layout (`pylm` submodule) its workers take work from a PUSH instead.

use std::sync::Arc;
use std::time::Duration;

use rylm_core_router::{Mode, Router};
use rylm_message::{Codec, Message, NativeCodec};
use rylm_transport::Kind;
use tokio::sync::watch;

use crate::Error;
use crate::cache::CacheStore;
use crate::parts::{Endpoint, Listen, Transport};
use crate::pool::{Admission, Heartbeat, Hook, Pool, PoolStatus, ResultSink, StreamHook};

#[cfg(feature = "pylm")]
mod pylm;

/// Builds a [`Master`] (or, with [`MasterBuilder::subscribe_to`], a Hub).
pub struct MasterBuilder {
    name: String,
    inbound: Endpoint,
    hub_topics: Option<Vec<String>>,
    publish: Endpoint,
    workers: Endpoint,
    cache: Endpoint,
    heartbeat: Heartbeat,
    admission: Admission,
    scatter: Hook,
    gather: Hook,
    handle_stream: Option<StreamHook>,
    drain_for: Duration,
    codec: Arc<dyn Codec>,
    pylm: bool,
    transport: Transport,
}

impl std::fmt::Debug for MasterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterBuilder")
            .field("name", &self.name)
            .finish()
    }
}

pub(crate) fn loopback() -> Endpoint {
    Endpoint::Bind("tcp://127.0.0.1:0".into())
}

impl MasterBuilder {
    /// Where clients push (PULL, bound).
    pub fn pull_address(mut self, address: &str) -> Self {
        self.inbound = Endpoint::Bind(address.to_owned());
        self
    }

    /// Makes this master a Hub: its input is a SUB connected to a previous server's PUB,
    /// subscribed to `topics` (usually that server's name), instead of a PULL.
    pub fn subscribe_to(mut self, pub_address: &str, topics: &[&str]) -> Self {
        self.inbound = Endpoint::Connect(pub_address.to_owned());
        self.hub_topics = Some(topics.iter().map(|t| (*t).to_owned()).collect());
        self
    }

    /// Where results are published (PUB, bound).
    pub fn pub_address(mut self, address: &str) -> Self {
        self.publish = Endpoint::Bind(address.to_owned());
        self
    }

    /// Where workers connect (ROUTER, bound).
    pub fn worker_address(mut self, address: &str) -> Self {
        self.workers = Endpoint::Bind(address.to_owned());
        self
    }

    /// Where the cache answers (REP, bound).
    pub fn db_address(mut self, address: &str) -> Self {
        self.cache = Endpoint::Bind(address.to_owned());
        self
    }

    /// The wire format (default: rylm's native codec).
    pub fn codec(mut self, codec: Arc<dyn Codec>) -> Self {
        self.codec = codec;
        self
    }

    /// Socket options, security among them (default: `rylm-transport`'s safe defaults, NULL
    /// security).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Speaks pylm's wire format and layout, so that pylm clients and pylm workers (and rylm
    /// workers with [`crate::WorkerBuilder::connect_pylm`]) use this master: PalmMessage frames, a PUSH
    /// to the workers at `worker_push_address` and a PULL from them at `worker_pull_address`, a
    /// raw-bytes cache with pylm's preset keys, and a publisher that waits for pylm's late
    /// subscriptions. pylm workers have neither credits nor heartbeats: ZeroMQ's PUSH spreads
    /// the work in turn, and a message held by a worker that dies is lost, as with pylm.
    #[cfg(feature = "pylm")]
    pub fn pylm_wire(mut self) -> Self {
        self.codec = Arc::new(rylm_message::PylmCodec::default());
        self.pylm = true;
        self
    }

    /// The bounds of admission: messages waiting for a worker, credits per worker, the
    /// deadline of a message that carries none (default [`Admission::default`]).
    pub fn admission(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
    }

    /// How workers are watched.
    pub fn heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// pylm's `scatter`: on the way to the workers, one message becomes any number.
    pub fn scatter(
        mut self,
        hook: impl Fn(Message) -> Vec<Message> + Send + Sync + 'static,
    ) -> Self {
        self.scatter = Arc::new(hook);
        self
    }

    /// pylm's `gather`: on the way back, one answer becomes any number of results.
    pub fn gather(
        mut self,
        hook: impl Fn(Message) -> Vec<Message> + Send + Sync + 'static,
    ) -> Self {
        self.gather = Arc::new(hook);
        self
    }

    /// pylm's `handle_stream`: the topic a result is published under (default: the client's
    /// id, or this master's name when the message goes on to another server's stage).
    pub fn handle_stream(
        mut self,
        hook: impl Fn(&Message) -> String + Send + Sync + 'static,
    ) -> Self {
        self.handle_stream = Some(Arc::new(hook));
        self
    }

    /// How long a shutdown waits for workers to finish what they hold (default 10 s); what is
    /// still unanswered then is failed back to its clients.
    pub fn drain_for(mut self, drain_for: Duration) -> Self {
        self.drain_for = drain_for;
        self
    }

    /// Binds every socket, presets the cache and starts.
    pub async fn start(self) -> Result<Master, Error> {
        #[cfg(feature = "pylm")]
        if self.pylm {
            return self.start_pylm().await;
        }
        let codec = self.codec.clone();
        let (stop, stopped) = watch::channel(false);
        let (workers, worker_address) = self.transport.open(Kind::Router, &self.workers).await?;
        let (publish, pub_address) = self.transport.open(Kind::Pub, &self.publish).await?;
        let (inbound_address, inbound) = match &self.hub_topics {
            Some(topics) => {
                let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                let listen =
                    Listen::sub(&self.inbound, &topics, &self.transport, codec.clone()).await?;
                (listen.address().to_owned(), Either::Sub(listen))
            }
            None => {
                let listen = Listen::pull(&self.inbound, &self.transport, codec.clone()).await?;
                (listen.address().to_owned(), Either::Pull(listen))
            }
        };
        let store = CacheStore::default();
        let (db_address, cache_task) = store
            .clone()
            .serve(&self.cache, &self.transport, codec.clone(), stopped)
            .await?;
        store.preset("name", self.name.clone());
        store.preset("pull_address", inbound_address.clone());
        store.preset("pub_address", pub_address.clone());
        store.preset("worker_address", worker_address.clone());
        store.preset("db_address", db_address.clone());

        let name = self.name.clone();
        let handle_stream = self.handle_stream.unwrap_or_else(|| {
            let name = name.clone();
            Arc::new(move |message: &Message| default_topic(&name, message))
        });
        let mut pool = Pool::new(codec.clone(), self.heartbeat, handle_stream);
        pool.admission = self.admission;
        pool.scatter = self.scatter;
        pool.gather = self.gather;
        pool.drain_for = self.drain_for;
        let status = pool.status.clone();
        let router = Router::builder()
            .outbound(
                "workers",
                move |queue| pool.run(queue, workers, ResultSink::Publish(publish)),
                None,
                Mode::NonBlocking,
            )
            .inbound(
                "clients",
                move |link| async move {
                    match inbound {
                        Either::Pull(listen) => listen.run(link).await,
                        Either::Sub(listen) => listen.run(link).await,
                    }
                },
                "workers",
                Mode::NonBlocking,
            )
            .start()?;
        tracing::info!(name = %self.name, %inbound_address, %pub_address, %worker_address, %db_address, "master started");
        Ok(Master {
            name: self.name,
            pull_address: inbound_address,
            pub_address,
            worker_address,
            db_address,
            router,
            stop,
            cache_task,
            status,
        })
    }
}

pub(crate) enum Either {
    Pull(Listen),
    Sub(Listen),
}

/// The default `handle_stream`: a result goes to its client, unless it moves on to another
/// server's stage, in which case it is published under this server's name for the next one.
pub fn default_topic(server: &str, message: &Message) -> String {
    if message.header(crate::functions::PIPELINED).is_some() {
        server.to_owned()
    } else {
        message.client.clone()
    }
}

/// A running Master (or Hub).
#[derive(Debug)]
pub struct Master {
    name: String,
    pull_address: String,
    pub_address: String,
    worker_address: String,
    db_address: String,
    router: Router,
    stop: watch::Sender<bool>,
    cache_task: tokio::task::JoinHandle<()>,
    status: Arc<PoolStatus>,
}

impl Master {
    /// A builder for a master named `name`; every address defaults to a free loopback port.
    pub fn builder(name: &str) -> MasterBuilder {
        MasterBuilder {
            name: name.to_owned(),
            inbound: loopback(),
            hub_topics: None,
            publish: loopback(),
            workers: loopback(),
            cache: loopback(),
            heartbeat: Heartbeat::default(),
            admission: Admission::default(),
            scatter: Arc::new(|message| vec![message]),
            gather: Arc::new(|message| vec![message]),
            handle_stream: None,
            drain_for: Duration::from_secs(10),
            codec: Arc::new(NativeCodec::default()),
            pylm: false,
            transport: Transport::default(),
        }
    }

    /// The master's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where clients push (or, for a Hub, the PUB it listens to).
    pub fn pull_address(&self) -> &str {
        &self.pull_address
    }

    /// Where results are published.
    pub fn pub_address(&self) -> &str {
        &self.pub_address
    }

    /// Where workers connect.
    pub fn worker_address(&self) -> &str {
        &self.worker_address
    }

    /// Where the cache answers.
    pub fn db_address(&self) -> &str {
        &self.db_address
    }

    /// The worker pool's view: workers, credits, waiting and in-flight messages, counters.
    /// (In pylm's layout, which has no pool, it stays empty.)
    pub fn status(&self) -> Arc<PoolStatus> {
        self.status.clone()
    }

    /// Stops taking messages, lets the workers finish what they hold (up to `drain_for`), and
    /// closes.
    pub async fn shutdown(self) -> Result<(), Error> {
        let outcome = self.router.shutdown().await;
        let _ = self.stop.send(true);
        let _ = self.cache_task.await;
        Ok(outcome?)
    }

    /// [`Master::shutdown`] within `limit` (make it longer than `drain_for`): what is still
    /// running then is dropped, and the result is a router error that says so.
    pub async fn shutdown_within(self, limit: Duration) -> Result<(), Error> {
        let outcome = self.router.shutdown_within(limit).await;
        let _ = self.stop.send(true);
        let abort = self.cache_task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), self.cache_task)
            .await
            .is_err()
        {
            abort.abort();
        }
        Ok(outcome?)
    }

    /// Resolves when a part of the master stops while it runs (a socket closed under it, a
    /// panic), with what happened; never while every part runs.
    pub async fn died(&self) -> String {
        self.router.died().await
    }
}
