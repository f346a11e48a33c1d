//! The Master (and the Hub): a server whose functions run on [`crate::Worker`]s, farmed out by
//! the worker pool of [`crate::pool`] with pylm's `scatter`, `gather` and `handle_stream`
//! hooks. In pylm's layout (`pylm` submodule) its workers take work from a PUSH instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rylm_core_router::{Mode, Router};
use rylm_message::{Codec, Message, NativeCodec};
use rylm_transport::Kind;
use tokio::sync::watch;

use crate::Error;
use crate::cache::CacheStore;
use crate::callers::{CallerSocket, Callers, Results, StatusReport, fields_json, status_base};
use crate::discovery::advertised;
use crate::parts::{Endpoint, Listen, Transport};
use crate::pool::{Admission, Heartbeat, Hook, Pool, PoolStatus, ResultSink, StreamHook};

#[cfg(feature = "pylm")]
mod pylm;

/// Builds a [`Master`] (or, with [`MasterBuilder::subscribe_to`], a Hub).
pub struct MasterBuilder {
    name: String,
    clients: Endpoint,
    previous: Option<(Endpoint, Vec<String>)>,
    stream: Endpoint,
    workers: Endpoint,
    cache: Endpoint,
    advertise: Option<String>,
    heartbeat: Heartbeat,
    admission: Admission,
    scatter: Option<Hook>,
    gather: Option<Hook>,
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
    /// Where callers connect (a ROUTER, bound; in pylm's layout the PULL clients push to).
    pub fn client_address(mut self, address: &str) -> Self {
        self.clients = Endpoint::Bind(address.to_owned());
        self
    }

    /// Makes this master a Hub: it also takes what a previous server sends down its stream for
    /// it (a DEALER connected to it, with this master's name as identity). In pylm's layout its input is a SUB connected to the
    /// previous server's PUB, subscribed to `topics` (usually that server's name), instead of
    /// a PULL.
    pub fn subscribe_to(mut self, stream_address: &str, topics: &[&str]) -> Self {
        let topics = topics.iter().map(|t| (*t).to_owned()).collect();
        self.previous = Some((Endpoint::Connect(stream_address.to_owned()), topics));
        self
    }

    /// Where next stages connect (a ROUTER, bound; in pylm's layout the PUB of results).
    pub fn stream_address(mut self, address: &str) -> Self {
        self.stream = Endpoint::Bind(address.to_owned());
        self
    }

    /// The host other machines reach this master at: the addresses its cache gives out name
    /// it instead of the host bound (needed when binding a wildcard such as `0.0.0.0`).
    pub fn advertise(mut self, host: &str) -> Self {
        self.advertise = Some(host.to_owned());
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
        self.scatter = Some(Arc::new(hook));
        self
    }

    /// pylm's `gather`: on the way back, one answer becomes any number of results.
    pub fn gather(
        mut self,
        hook: impl Fn(Message) -> Vec<Message> + Send + Sync + 'static,
    ) -> Self {
        self.gather = Some(Arc::new(hook));
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
        let advertise = self.advertise.as_deref();
        let (stop, stopped) = watch::channel(false);
        let (workers, worker_address) = self.transport.open(Kind::Router, &self.workers).await?;
        let worker_address = advertised(&worker_address, advertise)?;
        let callers = CallerSocket::open(&self.clients, &self.transport, codec.clone()).await?;
        let name = self.name.clone();
        // With the default hooks a worker's answer goes to its caller as it came.
        let plain = self.gather.is_none() && self.handle_stream.is_none();
        let pass_answers = NativeCodec::when_native(codec.as_ref()).filter(|_| plain);
        let handle_stream = self.handle_stream.unwrap_or_else(|| {
            let name = name.clone();
            Arc::new(move |message: &Message| default_topic(&name, message))
        });
        let results = Results::new(
            callers.clone(),
            &self.stream,
            &self.transport,
            &self.name,
            handle_stream.clone(),
        )
        .await?;
        let client_address = advertised(callers.address(), advertise)?;
        let stream_address = advertised(results.stream_address(), advertise)?;
        let store = CacheStore::default();
        let (db_address, cache_task) = store
            .clone()
            .serve(&self.cache, &self.transport, codec.clone(), stopped)
            .await?;
        let db_address = advertised(&db_address, advertise)?;
        store.preset("name", self.name.clone());
        store.preset("client_address", client_address.clone());
        store.preset("stream_address", stream_address.clone());
        store.preset("worker_address", worker_address.clone());
        store.preset("db_address", db_address.clone());

        let mut pool = Pool::new(codec.clone(), self.heartbeat, handle_stream);
        pool.admission = self.admission;
        pool.batching =
            crate::pool::takes_batches(self.transport.options(&self.workers).max_message_size);
        pool.scatter = self.scatter;
        pool.gather = self.gather;
        // With no scatter either, a plain call goes to its worker as it came.
        let forwarding = pass_answers.is_some() && pool.scatter.is_none();
        pool.pass_answers = pass_answers;
        pool.drain_for = self.drain_for;
        let status = pool.status.clone();
        let report: StatusReport = {
            let (name, pool, counters) = (self.name.clone(), status.clone(), callers.counters());
            let started = Instant::now();
            let kind = if self.previous.is_some() {
                "hub"
            } else {
                "master"
            };
            Arc::new(move || {
                let mut report = status_base(&name, kind, started, pool.functions(), &counters);
                report["workers"] = serde_json::json!({
                    "live": pool.live_workers(),
                    "free_credits": pool.free_credits(),
                    "waiting": pool.waiting(),
                    "in_flight": pool.in_flight(),
                });
                report["pool"] = fields_json(&pool.counters().fields());
                report
            })
        };
        let mut builder = Router::builder()
            .outbound(
                "workers",
                move |queue| pool.run(queue, workers, ResultSink::Answer(Box::new(results))),
                None,
                Mode::NonBlocking,
            )
            .inbound(
                "callers",
                move |link| {
                    Callers::new(callers)
                        .with_status(report)
                        .forwarding(forwarding)
                        .run(link)
                },
                "workers",
                Mode::NonBlocking,
            );
        if let Some((endpoint, _)) = &self.previous {
            let pull = Listen::dealer(endpoint, &self.name, &self.transport, codec.clone()).await?;
            builder = builder.inbound(
                "previous",
                move |link| pull.run(link),
                "workers",
                Mode::NonBlocking,
            );
        }
        let router = builder.start()?;
        tracing::info!(name = %self.name, %client_address, %stream_address, %worker_address, %db_address, "master started");
        Ok(Master {
            name: self.name,
            client_address,
            stream_address,
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
/// server's stage, in which case it goes down this server's stream (in pylm's layout, is
/// published under this server's name) for the next one.
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
    client_address: String,
    stream_address: String,
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
            clients: loopback(),
            previous: None,
            stream: loopback(),
            workers: loopback(),
            cache: loopback(),
            advertise: None,
            heartbeat: Heartbeat::default(),
            admission: Admission::default(),
            scatter: None,
            gather: None,
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

    /// Where callers connect (in pylm's layout, where clients push; for a pylm Hub, the PUB
    /// it listens to).
    pub fn client_address(&self) -> &str {
        &self.client_address
    }

    /// Where the next stage connects (in pylm's layout, where results are published).
    pub fn stream_address(&self) -> &str {
        &self.stream_address
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
