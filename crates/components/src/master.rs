//! The Master and its Workers: work farmed out by credit, over ROUTER (master) and DEALER
//! (workers), with heartbeats.
//!
//! A worker connects and says `READY` with its number of credits (how many messages it runs at
//! once). The master sends a message only to a worker with a free credit, so work goes where
//! there is capacity rather than blindly in turn, and a worker that joins late gets work at
//! once. Each answer returns a credit. Workers send heartbeats; a worker silent for
//! `heartbeat_misses` intervals is dead: each message it held is sent to another worker once,
//! and failed back to its client (an error reply) if it was already a second try. Nothing is
//! silently lost.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_core_router::{Mode, OutboundQueue, Router};
use rylm_message::{Codec, Message, NativeCodec};
use rylm_transport::{Event, Kind, Socket};
use tokio::sync::{Semaphore, watch};

use crate::cache::CacheStore;
use crate::functions::SYNC_FUNCTION;
use crate::parts::{Endpoint, Listen, Transport, error_reply};
use crate::{Error, Functions};

/// A worker says it is ready, with header [`CREDITS`].
pub const READY_FUNCTION: &str = "rylm.ready";
/// A worker's heartbeat.
pub const HEARTBEAT_FUNCTION: &str = "rylm.heartbeat";
/// The header of a `READY` that says how many messages the worker runs at once.
pub const CREDITS: &str = "rylm-credits";
/// The header of a `READY` that lists the worker's functions.
pub const FUNCTIONS: &str = "rylm-functions";
/// The header that tells the master which dispatch an answer belongs to.
const DISPATCH: &str = "rylm-dispatch";

/// A hook that turns one message into any number (pylm's `scatter` and `gather`).
pub type Hook = Arc<dyn Fn(Message) -> Vec<Message> + Send + Sync>;
/// pylm's `handle_stream`: the topic a result is published under.
pub type StreamHook = Arc<dyn Fn(&Message) -> String + Send + Sync>;

/// Timing of the master's view of its workers.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    /// How often workers send heartbeats (default 1 s).
    pub interval: Duration,
    /// How many silent intervals make a worker dead (default 3).
    pub misses: u32,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(1),
            misses: 3,
        }
    }
}

/// Builds a [`Master`] (or, with [`MasterBuilder::subscribe_to`], a Hub).
pub struct MasterBuilder {
    name: String,
    inbound: Endpoint,
    hub_topics: Option<Vec<String>>,
    publish: Endpoint,
    workers: Endpoint,
    cache: Endpoint,
    heartbeat: Heartbeat,
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

fn loopback() -> Endpoint {
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
    /// workers with [`WorkerBuilder::connect_pylm`]) use this master: PalmMessage frames, a PUSH
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

    #[cfg(feature = "pylm")]
    async fn start_pylm(self) -> Result<Master, Error> {
        use crate::parts::{Emit, HeldPublisher};
        let codec = self.codec.clone();
        let (stop, stopped) = watch::channel(false);
        // A Hub's input is the previous server's stream; a Master's, its clients' PUSH.
        let clients = match &self.hub_topics {
            Some(topics) => {
                let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                Either::Sub(
                    Listen::sub(&self.inbound, &topics, &self.transport, codec.clone()).await?,
                )
            }
            None => {
                Either::Pull(Listen::pull(&self.inbound, &self.transport, codec.clone()).await?)
            }
        };
        // A Master's clients all reach it directly: a subscription stays good until a new client
        // connection arrives (see `HeldPublisher`). A Hub's clients reach an earlier server.
        let (clients, connections) = match clients {
            Either::Pull(listen) => {
                let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
                (
                    Either::Pull(listen.count_connections(counter.clone())),
                    Some(counter),
                )
            }
            sub => (sub, None),
        };
        let to_workers = Emit::push(&self.workers, &self.transport, codec.clone()).await?;
        let from_workers = Listen::pull(&loopback(), &self.transport, codec.clone()).await?;
        let name = self.name.clone();
        let hook = self.handle_stream.unwrap_or_else(|| {
            let name = name.clone();
            Arc::new(move |message: &Message| default_topic(&name, message))
        });
        let mut publish = HeldPublisher::xpub(
            &self.publish,
            Arc::new(move |message: &Message| vec![hook(message)]),
            &self.transport,
            codec.clone(),
            Duration::from_millis(50),
        )
        .await?;
        if let Some(counter) = connections {
            publish = publish.cleared_until_new_connection(counter);
        }
        let (pull_address, worker_push_address, worker_pull_address, pub_address) = (
            match &clients {
                Either::Pull(listen) => listen.address().to_owned(),
                Either::Sub(listen) => listen.address().to_owned(),
            },
            to_workers.address().to_owned(),
            from_workers.address().to_owned(),
            publish.address().to_owned(),
        );
        let store = CacheStore::default().with_raw_replies();
        let (db_address, cache_task) = store
            .clone()
            .serve(&self.cache, &self.transport, codec, stopped)
            .await?;
        for (key, value) in [
            ("name", self.name.as_str()),
            ("pull_address", &pull_address),
            ("pub_address", &pub_address),
            ("worker_push_address", &worker_push_address),
            ("worker_pull_address", &worker_pull_address),
            ("db_address", &db_address),
        ] {
            store.set(key, value.to_owned());
        }
        let router = Router::builder()
            .outbound(
                "workers",
                move |q| to_workers.run(q),
                None,
                Mode::NonBlocking,
            )
            .outbound("publish", move |q| publish.run(q), None, Mode::NonBlocking)
            .inbound(
                "clients",
                move |link| async move {
                    match clients {
                        Either::Pull(listen) => listen.run(link).await,
                        Either::Sub(listen) => listen.run(link).await,
                    }
                },
                "workers",
                Mode::NonBlocking,
            )
            .inbound(
                "from-workers",
                move |link| from_workers.run(link),
                "publish",
                Mode::NonBlocking,
            )
            .start()?;
        tracing::info!(name = %self.name, %pull_address, %pub_address, %worker_push_address, %worker_pull_address, %db_address, "pylm-mode master started");
        Ok(Master {
            name: self.name,
            pull_address,
            pub_address,
            worker_address: worker_push_address,
            db_address,
            router,
            stop,
            cache_task,
        })
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
        store.set("name", self.name.clone());
        store.set("pull_address", inbound_address.clone());
        store.set("pub_address", pub_address.clone());
        store.set("worker_address", worker_address.clone());
        store.set("db_address", db_address.clone());

        let name = self.name.clone();
        let handle_stream = self.handle_stream.unwrap_or_else(|| {
            let name = name.clone();
            Arc::new(move |message: &Message| default_topic(&name, message))
        });
        let pool = Pool {
            codec: codec.clone(),
            heartbeat: self.heartbeat,
            scatter: self.scatter,
            gather: self.gather,
            handle_stream,
            drain_for: self.drain_for,
            workers: HashMap::new(),
            waiting: VecDeque::new(),
            in_flight: HashMap::new(),
            dispatched: 0,
            status: Arc::default(),
        };
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
        })
    }
}

enum Either {
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

    /// Stops taking messages, lets the workers finish what they hold (up to `drain_for`), and
    /// closes.
    pub async fn shutdown(self) -> Result<(), Error> {
        let outcome = self.router.shutdown().await;
        let _ = self.stop.send(true);
        let _ = self.cache_task.await;
        Ok(outcome?)
    }
}

/// Where a worker pool's results go.
pub enum ResultSink {
    /// Published on a PUB socket under `handle_stream`'s topic (a Master).
    Publish(Socket),
    /// Handed to a channel, for a component in the same process (a gateway).
    Channel(tokio::sync::mpsc::Sender<Message>),
}

impl std::fmt::Debug for ResultSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResultSink::Publish(_) => "ResultSink::Publish",
            ResultSink::Channel(_) => "ResultSink::Channel",
        })
    }
}

/// What a worker pool knows of its workers, shared with whoever asks.
#[derive(Debug, Default)]
pub struct PoolStatus {
    live: std::sync::atomic::AtomicUsize,
    functions: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl PoolStatus {
    /// How many workers are live now.
    pub fn live_workers(&self) -> usize {
        self.live.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The functions the workers have announced.
    pub fn functions(&self) -> Vec<String> {
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn joined<'a>(&self, live: usize, names: impl Iterator<Item = &'a str>) {
        self.live.store(live, std::sync::atomic::Ordering::Relaxed);
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(names.map(str::to_owned));
    }
}

/// A Master's worker pool on its own, for a server of another kind (the HTTP gateway): workers
/// connect to its ROUTER; messages from its router queue go to them by credit; results go to a
/// [`ResultSink`].
pub struct WorkerPool {
    pool: Pool,
    socket: Socket,
    address: String,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("address", &self.address)
            .finish()
    }
}

impl WorkerPool {
    /// Binds (or connects) the workers' ROUTER.
    pub async fn new(
        workers: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
        heartbeat: Heartbeat,
    ) -> Result<WorkerPool, Error> {
        let (socket, address) = transport.open(Kind::Router, workers).await?;
        let pool = Pool {
            codec,
            heartbeat,
            scatter: Arc::new(|message| vec![message]),
            gather: Arc::new(|message| vec![message]),
            handle_stream: Arc::new(|message: &Message| message.client.clone()),
            drain_for: Duration::from_secs(10),
            workers: HashMap::new(),
            waiting: VecDeque::new(),
            in_flight: HashMap::new(),
            dispatched: 0,
            status: Arc::default(),
        };
        Ok(WorkerPool {
            pool,
            socket,
            address,
        })
    }

    /// Where workers connect.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The pool's view of its workers, kept current while it runs.
    pub fn status(&self) -> Arc<PoolStatus> {
        self.pool.status.clone()
    }

    /// The router component (non-blocking): runs until its queue closes and the workers have
    /// answered (or `drain_for` has passed).
    pub async fn run(
        self,
        queue: OutboundQueue,
        sink: ResultSink,
    ) -> Result<(), rylm_core_router::Error> {
        self.pool.run(queue, self.socket, sink).await
    }
}

struct WorkerState {
    credits: usize,
    holds: Vec<String>,
    last_seen: Instant,
}

struct Dispatched {
    message: Message,
    retried: bool,
}

struct Pool {
    codec: Arc<dyn Codec>,
    heartbeat: Heartbeat,
    scatter: Hook,
    gather: Hook,
    handle_stream: StreamHook,
    drain_for: Duration,
    workers: HashMap<Bytes, WorkerState>,
    waiting: VecDeque<(Message, bool)>,
    in_flight: HashMap<String, Dispatched>,
    dispatched: u64,
    status: Arc<PoolStatus>,
}

impl Pool {
    async fn run(
        mut self,
        mut queue: OutboundQueue,
        workers: Socket,
        mut publish: ResultSink,
    ) -> Result<(), rylm_core_router::Error> {
        let mut ticker = tokio::time::interval(self.heartbeat.interval);
        let mut draining_since: Option<Instant> = None;
        loop {
            if draining_since.is_some() && self.waiting.is_empty() && self.in_flight.is_empty() {
                break;
            }
            if draining_since.is_some_and(|since| since.elapsed() >= self.drain_for) {
                let left: Vec<Message> = self
                    .waiting
                    .drain(..)
                    .map(|(m, _)| m)
                    .chain(self.in_flight.drain().map(|(_, d)| d.message))
                    .collect();
                for message in left {
                    let reply = error_reply(
                        &message,
                        "shutdown",
                        "the master shut down before a worker answered",
                    );
                    self.publish(&mut publish, reply).await;
                }
                break;
            }
            tokio::select! {
                delivery = queue.recv(), if draining_since.is_none() => match delivery {
                    Some(delivery) => {
                        let (message, _) = delivery.into_parts();
                        if message.function_name() == Some(SYNC_FUNCTION) {
                            self.publish(&mut publish, message.reply(Bytes::new())).await;
                        } else {
                            for part in (self.scatter)(message) {
                                self.waiting.push_back((part, false));
                            }
                        }
                    }
                    None => draining_since = Some(Instant::now()),
                },
                received = workers.recv() => match received {
                    Ok(mut frames) if !frames.is_empty() => {
                        let identity = frames.remove(0);
                        match self.codec.decode_frames(&frames) {
                            Ok(message) => self.on_worker_frame(identity, message, &workers, &mut publish).await,
                            Err(error) => tracing::warn!(%error, "dropped a worker frame that does not decode"),
                        }
                    }
                    Ok(_) => {}
                    Err(error) if error.is_closed() => break,
                    Err(error) => tracing::warn!(%error, "receiving from the workers failed"),
                },
                _ = ticker.tick() => self.bury_the_dead(&mut publish).await,
            }
            self.dispatch(&workers).await;
        }
        // Flush the last results (the transport's linger), then close.
        if let ResultSink::Publish(socket) = publish {
            socket.close().await;
        }
        workers.close().await;
        Ok(())
    }

    async fn publish(&self, sink: &mut ResultSink, message: Message) {
        match sink {
            ResultSink::Publish(socket) => {
                let topic = (self.handle_stream)(&message);
                match self.codec.encode_frames(&message) {
                    Ok(mut frames) => {
                        frames.insert(0, Bytes::from(topic));
                        if let Err(error) = socket.send(frames).await {
                            tracing::warn!(%error, "could not publish a result");
                        }
                    }
                    Err(error) => tracing::error!(%error, "could not encode a result"),
                }
            }
            ResultSink::Channel(sender) => {
                if sender.send(message).await.is_err() {
                    tracing::warn!("a result had nowhere to go: its receiver is gone");
                }
            }
        }
    }

    async fn on_worker_frame(
        &mut self,
        identity: Bytes,
        mut message: Message,
        workers: &Socket,
        publish: &mut ResultSink,
    ) {
        let now = Instant::now();
        match message.function_name() {
            Some(READY_FUNCTION) => {
                let credits = message
                    .header(CREDITS)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1usize);
                tracing::info!(credits, "a worker is ready");
                let worker = self.workers.entry(identity).or_insert(WorkerState {
                    credits: 0,
                    holds: Vec::new(),
                    last_seen: now,
                });
                worker.credits = credits.saturating_sub(worker.holds.len());
                worker.last_seen = now;
                let names = message.header(FUNCTIONS).unwrap_or_default();
                self.status.joined(
                    self.workers.len(),
                    names.split(',').filter(|n| !n.is_empty()),
                );
                return;
            }
            Some(HEARTBEAT_FUNCTION) => {
                match self.workers.get_mut(&identity) {
                    Some(worker) => worker.last_seen = now,
                    // A worker this master does not know (it restarted, or buried the worker
                    // while it was alive): ask it to announce itself again.
                    None => self.ask_to_announce(identity, workers).await,
                }
                return;
            }
            _ => {}
        }
        let Some(dispatch) = message.headers.remove(DISPATCH) else {
            tracing::warn!("dropped a worker answer without a dispatch id");
            return;
        };
        // A part of a mux function's results: pass it on, the dispatch is not over yet.
        if message.header(crate::functions::MORE).is_some() {
            if let Some(worker) = self.workers.get_mut(&identity) {
                worker.last_seen = now;
            }
            if self.in_flight.contains_key(&dispatch) {
                for result in (self.gather)(message) {
                    self.publish(publish, result).await;
                }
            }
            return;
        }
        if let Some(worker) = self.workers.get_mut(&identity) {
            worker.last_seen = now;
            // A credit comes back only for what this master gave this worker: an answer to a
            // dispatch of an earlier master (or one buried) does not add one.
            let held = worker.holds.len();
            worker.holds.retain(|held| *held != dispatch);
            if worker.holds.len() < held {
                worker.credits += 1;
            }
        }
        if self.in_flight.remove(&dispatch).is_none() {
            // Answered twice (a re-dispatch raced a slow worker): the first answer went out.
            return;
        }
        for result in (self.gather)(message) {
            self.publish(publish, result).await;
        }
    }

    async fn bury_the_dead(&mut self, publish: &mut ResultSink) {
        let dead_after = self.heartbeat.interval * self.heartbeat.misses;
        let dead: Vec<Bytes> = self
            .workers
            .iter()
            .filter(|(_, w)| w.last_seen.elapsed() > dead_after)
            .map(|(id, _)| id.clone())
            .collect();
        for identity in dead {
            let Some(worker) = self.workers.remove(&identity) else {
                continue;
            };
            self.status
                .live
                .store(self.workers.len(), std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                held = worker.holds.len(),
                "a worker stopped sending heartbeats"
            );
            for held in worker.holds {
                let Some(dispatched) = self.in_flight.remove(&held) else {
                    continue;
                };
                if dispatched.retried {
                    let reply = error_reply(
                        &dispatched.message,
                        "worker-died",
                        "two workers died holding this message; it was not run to the end",
                    );
                    self.publish(publish, reply).await;
                } else {
                    self.waiting.push_front((dispatched.message, true));
                }
            }
        }
    }

    async fn ask_to_announce(&self, identity: Bytes, workers: &Socket) {
        match self
            .codec
            .encode_frames(&Message::call(READY_FUNCTION, Bytes::new()))
        {
            Ok(frames) => {
                let mut with_identity = vec![identity];
                with_identity.extend(frames);
                if let Err(error) = workers.send(with_identity).await {
                    tracing::debug!(%error, "could not ask a worker to announce itself");
                }
            }
            Err(error) => tracing::error!(%error, "could not encode a request to announce"),
        }
    }

    async fn dispatch(&mut self, to_workers: &Socket) {
        while !self.waiting.is_empty() {
            let Some((identity, worker)) = self
                .workers
                .iter_mut()
                .filter(|(_, w)| w.credits > 0)
                .max_by_key(|(_, w)| w.credits)
            else {
                return;
            };
            let Some((mut message, retried)) = self.waiting.pop_front() else {
                return;
            };
            // Unique within this master, and cheaper than a random id on the hot path.
            self.dispatched += 1;
            let dispatch = self.dispatched.to_string();
            message.headers.insert(DISPATCH.into(), dispatch.clone());
            let frames = match self.codec.encode_frames(&message) {
                Ok(frames) => frames,
                Err(error) => {
                    tracing::error!(%error, "could not encode a message for a worker");
                    continue;
                }
            };
            let mut with_identity = vec![identity.clone()];
            with_identity.extend(frames);
            worker.credits -= 1;
            worker.holds.push(dispatch.clone());
            message.headers.remove(DISPATCH);
            self.in_flight
                .insert(dispatch, Dispatched { message, retried });
            if let Err(error) = to_workers.send(with_identity).await {
                tracing::warn!(%error, "could not reach a worker; it will be taken for dead");
            }
        }
    }
}

/// Builds a [`Worker`].
pub struct WorkerBuilder {
    functions: Functions,
    codec: Arc<dyn Codec>,
    credits: usize,
    heartbeat: Duration,
    server: String,
    transport: Transport,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("credits", &self.credits)
            .finish()
    }
}

impl WorkerBuilder {
    /// How many messages the worker runs at once (default 8).
    pub fn credits(mut self, credits: usize) -> Self {
        self.credits = credits.max(1);
        self
    }

    /// The wire format (default: rylm's native codec; match the master's).
    pub fn codec(mut self, codec: Arc<dyn Codec>) -> Self {
        self.codec = codec;
        self
    }

    /// How often it sends heartbeats (default 1 s; match the master's).
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Socket options, security among them (a worker connects: `transport.connected` counts).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Connects to the master whose cache is at `db_address` (the worker address is read from
    /// it) and starts working.
    pub async fn connect_via_cache(
        self,
        db_address: &str,
        deadline: Duration,
    ) -> Result<Worker, Error> {
        let codec = self.codec.clone();
        let mut cache = crate::parts::Ask::req(
            &Endpoint::Connect(db_address.to_owned()),
            &self.transport,
            codec,
        )
        .await?
        .with_deadline(deadline);
        let lookup = async {
            let name = cache.ask(&Message::call("cache.get", "name")).await?;
            let address = cache
                .ask(&Message::call("cache.get", "worker_address"))
                .await?;
            Ok::<_, Error>((name, address))
        };
        let (name, address) =
            tokio::time::timeout(deadline, lookup)
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("the cache at {db_address}"),
                    waited: deadline,
                })??;
        if address.header(crate::MISSING).is_some() {
            return Err(Error::Server {
                address: db_address.to_owned(),
                reason: "its cache has no worker_address: it is not a master".into(),
            });
        }
        let mut builder = self;
        builder.server = String::from_utf8_lossy(&name.payload).into_owned();
        builder
            .connect(&String::from_utf8_lossy(&address.payload))
            .await
    }

    /// Serves a pylm Master whose cache is at `db_address`, in pylm's layout: PULL from its
    /// `worker_push_address`, PUSH answers to its `worker_pull_address`, PalmMessage frames, and
    /// `b"0"` for a failed function. pylm masters have no credits or heartbeats: this worker
    /// runs up to `credits` messages at once.
    #[cfg(feature = "pylm")]
    pub async fn connect_pylm(self, db_address: &str, deadline: Duration) -> Result<Worker, Error> {
        let codec: Arc<dyn Codec> = Arc::new(rylm_message::PylmCodec::default());
        let mut cache = crate::parts::Ask::req(
            &Endpoint::Connect(db_address.to_owned()),
            &self.transport,
            codec.clone(),
        )
        .await?
        .with_raw_replies()
        .with_deadline(deadline);
        let lookup = async {
            let mut values = Vec::new();
            for key in ["name", "worker_push_address", "worker_pull_address"] {
                let reply = cache.ask(&Message::call("cache.get", key)).await?;
                if reply.header(crate::MISSING).is_some() {
                    return Err(Error::Server {
                        address: db_address.to_owned(),
                        reason: format!("its cache has no {key:?}: it is not a pylm master"),
                    });
                }
                values.push(String::from_utf8_lossy(&reply.payload).into_owned());
            }
            Ok(values)
        };
        let values =
            tokio::time::timeout(deadline, lookup)
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("the cache at {db_address}"),
                    waited: deadline,
                })??;
        let [server, from_master, to_master] =
            <[String; 3]>::try_from(values).map_err(|_| Error::Closed)?;
        let pull = Socket::new(Kind::Pull, &self.transport.connected)?;
        pull.connect(&from_master).await?;
        let push = Socket::new(Kind::Push, &self.transport.connected)?;
        push.connect(&to_master).await?;
        let (stop, mut stopped) = watch::channel(false);
        let functions = Arc::new(self.functions.failure_payload("0"));
        let slots = Arc::new(Semaphore::new(self.credits));
        let task = tokio::spawn(async move {
            let mut running = tokio::task::JoinSet::new();
            loop {
                let received = tokio::select! {
                    _ = stopped.changed() => break,
                    received = pull.recv() => received,
                };
                while running.try_join_next().is_some() {}
                let received = match received {
                    Ok(received) => received,
                    Err(error) if error.is_closed() => break,
                    Err(_) => continue,
                };
                let message = match codec.decode_frames(&received) {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::warn!(%error, "dropped a frame from the pylm master that does not decode");
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (functions, server, push, codec) = (
                    functions.clone(),
                    server.clone(),
                    push.clone(),
                    codec.clone(),
                );
                running.spawn(async move {
                    // A mux function's parts each go back as an answer, as pylm's MuxWorker does.
                    for answer in functions.call_many(&server, message).await {
                        match codec.encode_frames(&answer) {
                            Ok(frames) => {
                                if let Err(error) = push.send(frames).await {
                                    tracing::warn!(%error, "could not answer the pylm master");
                                }
                            }
                            Err(error) => tracing::error!(%error, "could not encode an answer"),
                        }
                    }
                    drop(permit);
                });
            }
            while running.join_next().await.is_some() {}
            pull.close().await;
            push.close().await;
        });
        Ok(Worker { stop, task })
    }

    /// Connects to the master's worker address and starts working.
    pub async fn connect(self, worker_address: &str) -> Result<Worker, Error> {
        let codec = self.codec.clone();
        let socket = Socket::new(Kind::Dealer, &self.transport.connected)?;
        // Watch before connecting, so that the first connection's news is not missed.
        let events = socket.events();
        socket.connect(worker_address).await?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(work(self, codec, socket, events, stopped));
        Ok(Worker { stop, task })
    }
}

/// A running worker.
#[derive(Debug)]
pub struct Worker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// A builder for a worker that runs `functions`.
    pub fn builder(functions: Functions) -> WorkerBuilder {
        WorkerBuilder {
            functions,
            codec: Arc::new(NativeCodec::default()),
            credits: 8,
            heartbeat: Duration::from_secs(1),
            server: String::new(),
            transport: Transport::default(),
        }
    }

    /// Stops taking messages, finishes and answers the ones it holds, then closes.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops at once, as a crash would: what it holds is never answered.
    pub fn abort(self) {
        self.task.abort();
    }
}

async fn send_to_master(socket: &Socket, codec: &dyn Codec, message: &Message) {
    match codec.encode_frames(message) {
        Ok(frames) => {
            if let Err(error) = socket.send(frames).await {
                tracing::warn!(%error, "could not reach the master");
            }
        }
        Err(error) => tracing::error!(%error, "could not encode an answer"),
    }
}

/// The READY of a worker with `free` credits and these functions.
fn ready(free: usize, names: &str) -> Message {
    Message::call(READY_FUNCTION, Bytes::new())
        .with_header(CREDITS, free.to_string())
        .with_header(FUNCTIONS, names)
}

async fn work(
    builder: WorkerBuilder,
    codec: Arc<dyn Codec>,
    socket: Socket,
    mut events: rylm_transport::Events,
    mut stopped: watch::Receiver<bool>,
) {
    let mut names: Vec<&str> = builder.functions.names().collect();
    names.sort_unstable();
    let names = names.join(",");
    let slots = Arc::new(Semaphore::new(builder.credits));
    // READY is sent whenever a connection to the master is (again) ready, and whenever the
    // master asks: a restarted master learns of its workers without a restart of theirs.
    send_to_master(&socket, codec.as_ref(), &ready(builder.credits, &names)).await;
    let functions = Arc::new(builder.functions);
    let server: Arc<str> = builder.server.into();
    let mut ticker = tokio::time::interval(builder.heartbeat);
    let mut running = tokio::task::JoinSet::new();
    let mut connections = 0u64;
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = ticker.tick() => {
                send_to_master(&socket, codec.as_ref(), &Message::call(HEARTBEAT_FUNCTION, Bytes::new())).await;
            }
            event = events.next() => {
                if let Some(Event::Ready { .. }) = event {
                    connections += 1;
                    // The first READY went out with the first message; later ones announce again.
                    if connections > 1 {
                        tracing::info!("the master is back; announcing again");
                        send_to_master(&socket, codec.as_ref(), &ready(slots.available_permits(), &names)).await;
                    }
                }
            }
            received = socket.recv() => {
                while running.try_join_next().is_some() {}
                let received = match received {
                    Ok(received) => received,
                    Err(error) if error.is_closed() => break,
                    Err(_) => continue,
                };
                let message = match codec.decode_frames(&received) {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::warn!(%error, "dropped a frame from the master that does not decode");
                        continue;
                    }
                };
                if message.function_name() == Some(READY_FUNCTION) {
                    send_to_master(&socket, codec.as_ref(), &ready(slots.available_permits(), &names)).await;
                    continue;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                let (functions, server, socket, codec) = (functions.clone(), server.clone(), socket.clone(), codec.clone());
                running.spawn(async move {
                    for answer in functions.call_many(&server, message).await {
                        send_to_master(&socket, codec.as_ref(), &answer).await;
                    }
                    drop(permit);
                });
            }
        }
    }
    // Finish and answer what is held, heartbeating meanwhile so the master waits for it.
    loop {
        tokio::select! {
            done = running.join_next() => if done.is_none() { break },
            _ = ticker.tick() => {
                send_to_master(&socket, codec.as_ref(), &Message::call(HEARTBEAT_FUNCTION, Bytes::new())).await;
            }
        }
    }
    socket.close().await;
}
