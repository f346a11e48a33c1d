//! The Client: finds a server from its cache address, calls functions, reads and writes the
//! cache.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_message::trace::{Hop, TRACEPARENT};
use rylm_message::{Codec, Message, NativeCodec, Stamp, new_id};
use rylm_transport::{Event, Kind, Outbox, Received, Socket, Undelivered};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::Instrument;

use crate::cache::MISSING;
use crate::functions::SYNC_FUNCTION;
use crate::parts::{Ask, Endpoint, Transport};
use crate::{ERROR_KIND, ERROR_MESSAGE, Error};

/// How a [`Client`] connects.
#[derive(Clone)]
pub struct ClientOptions {
    /// The cache address of the last server of a pipeline, whose results this client takes
    /// (over a connection of its own to that server), as well as its own server's.
    pub results_from: Option<String>,
    /// The wire format (default: rylm's native codec; match the server's).
    pub codec: Arc<dyn Codec>,
    /// The deadline of the set-up, and the default of every call (default 30 s).
    pub deadline: Duration,
    /// The server's cache answers raw bytes (a pylm server's does).
    pub raw_cache: bool,
    /// Socket options (the client connects every socket: `transport.connected` counts).
    pub transport: Transport,
    /// pylm's layout: PUSH requests, SUB results (see [`ClientOptions::pylm`]).
    pub pylm_layout: bool,
    /// When the server answers `busy`, try again (backing off) until the call's deadline
    /// instead of failing at once (default false).
    pub retry_busy: bool,
    /// Carry W3C trace context: a call without a `traceparent` header starts a trace, and
    /// each call is a span `rylm.client.call` of it (default true; pylm's codec has no
    /// headers, so its options turn it off).
    pub trace: bool,
}

impl ClientOptions {
    /// Options for a pylm server: pylm's wire format and its raw-bytes cache. A pylm server
    /// answers a failed function with `b"0"`, which the client cannot tell from a result.
    #[cfg(feature = "pylm")]
    pub fn pylm(deadline: Duration) -> ClientOptions {
        ClientOptions {
            codec: Arc::new(rylm_message::PylmCodec::default()),
            raw_cache: true,
            pylm_layout: true,
            trace: false,
            deadline,
            ..ClientOptions::default()
        }
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            results_from: None,
            codec: Arc::new(NativeCodec::default()),
            deadline: Duration::from_secs(30),
            raw_cache: false,
            transport: Transport::default(),
            pylm_layout: false,
            retry_busy: false,
            trace: true,
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("results_from", &self.results_from)
            .field("codec", &self.codec.name())
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// Where the answers of a call in flight go, by call number.
type Pending = Arc<std::sync::Mutex<HashMap<u64, Waiter>>>;

/// A call waiting for its answers.
enum Waiter {
    /// One answer: the first that comes ends the call (and leaves the map with it).
    One(oneshot::Sender<Answer>),
    /// Every part of a mux function's answer, until the last.
    Parts(mpsc::UnboundedSender<Answer>),
}

/// The receiving end of a [`Waiter`].
enum Answers {
    One(oneshot::Receiver<Answer>),
    Parts(mpsc::UnboundedReceiver<Answer>),
}

impl Answers {
    /// The next answer; `None` once the call was dropped (its server went away).
    async fn next(&mut self) -> Option<Answer> {
        match self {
            Answers::One(receiver) => receiver.await.ok(),
            Answers::Parts(receiver) => receiver.recv().await,
        }
    }
}

/// What a call needs of an answer: its payload, its error if it is one, and whether more
/// parts follow. Read in place from native frames (nothing allocated but an error's text).
#[derive(Debug)]
struct Answer {
    /// The call it answers.
    call: u64,
    payload: Bytes,
    /// The error's kind and text ([`ERROR_KIND`], [`ERROR_MESSAGE`]).
    error: Option<(String, String)>,
    /// A part of a mux function's results, more to come.
    more: bool,
    /// The mux function yielded nothing.
    none: bool,
}

/// The headers an answer is read by: an error's kind and text, more parts to come, no part.
const ANSWER_HEADERS: [&str; 4] = [
    ERROR_KIND,
    ERROR_MESSAGE,
    crate::functions::MORE,
    crate::functions::NONE,
];

/// The value of [`crate::BATCH`] on a request: its caller reads answers in batches of up to
/// [`crate::MAX_BATCH`].
const READS_BATCHES: &str = "64";

/// Logs an answer that does not decode (it is dropped).
fn dropped(error: rylm_message::Error) {
    tracing::warn!(%error, "dropped a result that does not decode");
}

impl Answer {
    /// The answer in `frames`; `None` when they do not decode or answer no call of this
    /// client's (its call numbers are decimal).
    fn read(codec: &dyn Codec, frames: &[Bytes]) -> Option<Answer> {
        let message = codec.decode_frames(frames).map_err(dropped).ok()?;
        let headers = ANSWER_HEADERS.map(|name| message.header(name));
        Answer::of(&message.cache, message.payload.clone(), headers)
    }

    /// A native answer read in place from frame `at` of `received`, whose marker is frame
    /// `skip` (the first after a SUB's topic; a batch has one marker and several bodies): a
    /// call needs its payload and error, not the envelope.
    fn read_native(
        native: NativeCodec,
        received: &Received,
        skip: usize,
        at: usize,
    ) -> Option<Answer> {
        let (marker, body) = (received.part(skip)?, received.part(at)?);
        let view = native.view_parts(marker, body).map_err(dropped).ok()?;
        let payload = match view.payload() {
            [] => Bytes::new(),
            payload => {
                // The payload's place in the body, taken from the body as a frame of its own.
                let owned = received.bytes(at)?;
                let start = payload.as_ptr() as usize - body.as_ptr() as usize;
                let end = start + payload.len();
                (end <= owned.len()).then(|| owned.slice(start..end))?
            }
        };
        Answer::of(view.cache(), payload, view.headers_named(ANSWER_HEADERS))
    }

    /// The answer to call `cache` (decimal), with the values of its [`ANSWER_HEADERS`].
    fn of(
        cache: &str,
        payload: Bytes,
        [kind, text, more, none]: [Option<&str>; 4],
    ) -> Option<Answer> {
        Some(Answer {
            call: cache.parse().ok()?,
            payload,
            error: kind.map(|kind| (kind.to_owned(), text.unwrap_or_default().to_owned())),
            more: more.is_some(),
            none: none.is_some(),
        })
    }

    /// The payload, or the error the answer carries, as a call of `function` returns it.
    fn into_result(self, function: impl FnOnce() -> String) -> Result<Bytes, Error> {
        match self.error {
            Some((kind, message)) => Err(Error::Remote {
                function: function(),
                kind,
                message,
            }),
            None => Ok(self.payload),
        }
    }
}

/// What the client knows of its connections to the server.
#[derive(Debug, Default)]
struct Link {
    /// A connection was lost: the next call first makes sure the subscription is live again.
    resync: std::sync::atomic::AtomicBool,
}

/// A client of a Server (or of a Master): `eval`, `job`, and the cache.
///
/// It connects a DEALER to the server's ROUTER, with its id as its routing identity, and each
/// answer comes back over that connection. A client of a pipeline also connects to the last
/// server, which answers it there; before its first call it makes sure that connection is live
/// with a round trip through the whole pipeline. In pylm's layout it pushes requests and
/// subscribes to its own id on the server's PUB, with the same round trip first (PUB/SUB's
/// slow-joiner race would otherwise lose the first results).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Whether this handle's calls carry trace context ([`ClientOptions::trace`],
    /// [`Client::with_trace`]).
    trace: bool,
}

struct Inner {
    id: String,
    session: std::sync::Mutex<String>,
    server: String,
    codec: Arc<dyn Codec>,
    /// The codec when it is rylm's own: requests are then written stamped, straight from the
    /// caller's message (see [`Stamp`]).
    native: Option<NativeCodec>,
    address: String,
    requests: Socket,
    /// The calls of many tasks reach `requests` through it, in bursts.
    outbox: Arc<Outbox<u64>>,
    cache: Mutex<Ask>,
    pending: Pending,
    link: Arc<Link>,
    calls: std::sync::atomic::AtomicU64,
    deadline: Duration,
    /// The last server of the pipeline, when this client takes its results from there.
    sync_through: Option<String>,
    retry_busy: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Undelivered<u64> for Inner {
    /// Call `call`'s request could not be sent: the call ends as if its server went away.
    fn undelivered(&self, call: u64, error: rylm_transport::Error) {
        tracing::debug!(%call, %error, address = %self.address, "a request could not be sent");
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&call);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .field("server", &self.inner.server)
            .finish()
    }
}

impl Client {
    /// Connects to the server whose cache is at `db_address`, reading the rest of its
    /// addresses from the cache; `deadline` bounds the set-up and is the default for calls.
    pub async fn connect(db_address: &str, deadline: Duration) -> Result<Client, Error> {
        let options = ClientOptions {
            deadline,
            ..ClientOptions::default()
        };
        Self::connect_with(db_address, options).await
    }

    /// Like [`Client::connect`], but takes results from the PUB at `results_from` (the last
    /// server of a pipeline) instead of the first server's.
    pub async fn connect_with_results_from(
        db_address: &str,
        results_from: Option<&str>,
        deadline: Duration,
    ) -> Result<Client, Error> {
        let options = ClientOptions {
            results_from: results_from.map(str::to_owned),
            deadline,
            ..ClientOptions::default()
        };
        Self::connect_with(db_address, options).await
    }

    /// Connects with every option.
    pub async fn connect_with(db_address: &str, options: ClientOptions) -> Result<Client, Error> {
        let deadline = options.deadline;
        tokio::time::timeout(deadline, Self::connect_now(db_address, options))
            .await
            .map_err(|_| Error::Timeout {
                what: format!("the server whose cache is at {db_address}"),
                waited: deadline,
            })?
    }

    async fn connect_now(db_address: &str, options: ClientOptions) -> Result<Client, Error> {
        let ClientOptions {
            results_from,
            codec,
            deadline,
            raw_cache,
            transport,
            pylm_layout,
            retry_busy,
            trace,
        } = options;
        let started = Instant::now();
        let open_cache = |address: &str| {
            let (transport, codec) = (transport.clone(), codec.clone());
            let address = address.to_owned();
            async move {
                let cache = Ask::req(&Endpoint::Connect(address), &transport, codec)
                    .await?
                    .with_deadline(deadline);
                Ok::<_, Error>(if raw_cache {
                    cache.with_raw_replies()
                } else {
                    cache
                })
            }
        };
        let mut cache = open_cache(db_address).await?;
        let server = preset(&mut cache, db_address, "name", deadline).await?;
        // Where requests go, and where the results of the last stage come from.
        let (requests_key, results_key) = if pylm_layout {
            ("pull_address", "pub_address")
        } else {
            ("client_address", "client_address")
        };
        let address = preset(&mut cache, db_address, requests_key, deadline).await?;
        let mut last_server = None;
        let results_address = match &results_from {
            Some(last) => {
                let mut last_cache = open_cache(last).await?;
                last_server = Some(preset(&mut last_cache, last, "name", deadline).await?);
                Some(preset(&mut last_cache, last, results_key, deadline).await?)
            }
            None if pylm_layout => {
                Some(preset(&mut cache, db_address, "pub_address", deadline).await?)
            }
            None => None,
        };

        let id = new_id();
        let pending: Pending = Arc::default();
        let link = Arc::new(Link::default());
        let mut tasks = Vec::new();
        let requests = if pylm_layout {
            let sub = Socket::new(Kind::Sub, &transport.connected)?;
            sub.subscribe(Bytes::from(id.clone())).await?;
            sub.connect(results_address.as_deref().unwrap_or_default())
                .await?;
            tasks.push(tokio::spawn(watch_link(
                sub.events(),
                pending.clone(),
                link.clone(),
            )));
            tasks.push(receive(sub, 1, codec.clone(), pending.clone()));
            let push = Socket::new(Kind::Push, &transport.connected)?;
            push.connect(&address).await?;
            push
        } else {
            // Answers are routed back by identity: the client's id.
            let mut options = transport.connected.clone();
            options.identity = Bytes::from(id.clone());
            let dealer = Socket::new(Kind::Dealer, &options)?;
            let results = match &results_address {
                Some(last) => {
                    let results = Socket::new(Kind::Dealer, &options)?;
                    let events = results.events();
                    results.connect(last).await?;
                    Some((results, events))
                }
                None => None,
            };
            // The calls in flight fail when the connection their answers come over is lost.
            let events = match &results {
                Some(_) => None,
                None => Some(dealer.events()),
            };
            dealer.connect(&address).await?;
            if let Some((results, events)) = results {
                tasks.push(tokio::spawn(watch_link(
                    events,
                    pending.clone(),
                    link.clone(),
                )));
                tasks.push(receive(results, 0, codec.clone(), pending.clone()));
            }
            if let Some(events) = events {
                tasks.push(tokio::spawn(watch_link(
                    events,
                    pending.clone(),
                    link.clone(),
                )));
            }
            tasks.push(receive(dealer.clone(), 0, codec.clone(), pending.clone()));
            dealer
        };
        let client = Client {
            inner: Arc::new(Inner {
                id,
                session: std::sync::Mutex::new(new_id()),
                server,
                native: NativeCodec::when_native(codec.as_ref()),
                codec,
                address,
                requests,
                outbox: Arc::default(),
                cache: Mutex::new(cache),
                pending,
                link,
                calls: std::sync::atomic::AtomicU64::new(0),
                deadline,
                sync_through: last_server,
                retry_busy,
                tasks,
            }),
            trace,
        };
        client
            .sync(deadline.saturating_sub(started.elapsed()))
            .await?;
        Ok(client)
    }

    /// A call number, unique within this client: its results come back on its own topic, so
    /// a counter is enough, and cheaper than a random id on the hot path. It travels as the
    /// message's cache key, in decimal.
    fn next_call(&self) -> u64 {
        self.inner
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A handle on the same connections whose calls carry trace context or not, whatever the
    /// options said.
    pub fn with_trace(&self, trace: bool) -> Client {
        Client {
            inner: self.inner.clone(),
            trace,
        }
    }

    /// The current session: the stream id (pylm's `pipeline`) its calls carry.
    pub fn session(&self) -> String {
        self.inner
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts a new session: calls from now on carry a new stream id. Returns it.
    pub fn new_session(&self) -> String {
        let session = new_id();
        *self.inner.session.lock().unwrap_or_else(|e| e.into_inner()) = session.clone();
        session
    }

    /// The client's id (the topic of its results).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The server's name, as its cache gave it.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The handshake: through the whole pipeline when this client takes its results from its
    /// last server.
    fn sync_message(&self) -> Message {
        let message = Message::call(SYNC_FUNCTION, Bytes::new());
        match &self.inner.sync_through {
            Some(last) => message.with_header(crate::SYNC_THROUGH, last.clone()),
            None => message,
        }
    }

    /// Round trips until one comes back: then the way back is live.
    async fn sync(&self, within: Duration) -> Result<(), Error> {
        let started = Instant::now();
        let mut wait = Duration::from_millis(20);
        while started.elapsed() < within {
            let mut message = self.sync_message();
            if self.send_and_wait_now(&mut message, wait).await.is_ok() {
                return Ok(());
            }
            wait = (wait * 2).min(Duration::from_millis(500));
        }
        Err(Error::Timeout {
            what: "the server's first answer".into(),
            waited: within,
        })
    }

    async fn send_and_wait(
        &self,
        mut message: Message,
        deadline: Duration,
    ) -> Result<Answer, Error> {
        let started = Instant::now();
        self.resync_if_needed(deadline).await?;
        let mut backoff = Duration::from_millis(5);
        // Each attempt stamps the message in place; a retry starts again from the caller's
        // trace context, not from the attempt before.
        let parent = message.header(TRACEPARENT).map(str::to_owned);
        loop {
            let left = deadline.saturating_sub(started.elapsed());
            let answer = self.send_and_wait_now(&mut message, left).await?;
            let busy = answer
                .error
                .as_ref()
                .is_some_and(|(kind, _)| kind == "busy");
            if !busy || !self.inner.retry_busy || started.elapsed() + backoff >= deadline {
                return Ok(answer);
            }
            match &parent {
                Some(parent) => message.headers.insert(TRACEPARENT.into(), parent.clone()),
                None => message.headers.remove(TRACEPARENT),
            };
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// After a lost connection, a round trip before the next call: results published before
    /// the subscription reached the server again would be lost.
    async fn resync_if_needed(&self, deadline: Duration) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        if !self.inner.link.resync.load(Ordering::SeqCst) {
            return Ok(());
        }
        let started = Instant::now();
        let mut wait = Duration::from_millis(20);
        while started.elapsed() < deadline {
            self.inner.link.resync.store(false, Ordering::SeqCst);
            let mut message = self.sync_message();
            if self.send_and_wait_now(&mut message, wait).await.is_ok() {
                return Ok(());
            }
            self.inner.link.resync.store(true, Ordering::SeqCst);
            wait = (wait * 2).min(Duration::from_millis(500));
        }
        Err(Error::Timeout {
            what: format!("the server at {} to come back", self.inner.address),
            waited: deadline,
        })
    }

    async fn send_and_wait_now(
        &self,
        message: &mut Message,
        deadline: Duration,
    ) -> Result<Answer, Error> {
        let mut answers = self.exchange(message, deadline, false).await?;
        answers.pop().ok_or(Error::Closed)
    }

    /// Sends `message` and collects its answer, or (with `all`) every part of a mux function's
    /// answer, within `deadline`.
    async fn exchange(
        &self,
        message: &mut Message,
        deadline: Duration,
        all: bool,
    ) -> Result<Vec<Answer>, Error> {
        let call = self.next_call();
        let (mut number, mut millis) = ([0u8; 20], [0u8; 20]);
        let millis = decimal(
            u64::try_from(deadline.as_millis().max(1)).unwrap_or(u64::MAX),
            &mut millis,
        );
        let (traceparent, span) =
            if self.trace && message.function_name() != Some(crate::SYNC_FUNCTION) {
                let hop = Hop::continue_from(message.header(TRACEPARENT));
                (hop.traceparent(), hop.span("rylm.client.call"))
            } else {
                (String::new(), tracing::Span::none())
            };
        // The stamp's headers in order of name: this client reads answers in batches.
        let headers = [
            (crate::BATCH, READS_BATCHES),
            (crate::DEADLINE, millis),
            (TRACEPARENT, traceparent.as_str()),
        ];
        let frames = {
            let session = self.inner.session.lock().unwrap_or_else(|e| e.into_inner());
            let stamp = Stamp {
                client: &self.inner.id,
                pipeline: &session,
                cache: decimal(call, &mut number),
                headers: &headers[..if traceparent.is_empty() { 2 } else { 3 }],
            };
            match &self.inner.native {
                Some(native) => vec![
                    Bytes::from_static(&rylm_message::MARKER),
                    native.encode_stamped(message, &stamp)?,
                ],
                None => {
                    stamp.apply(message);
                    self.inner.codec.encode_frames(message)?
                }
            }
        };
        let (waiter, mut answers) = if all {
            let (parts, answers) = mpsc::unbounded_channel();
            (Waiter::Parts(parts), Answers::Parts(answers))
        } else {
            let (answer, answered) = oneshot::channel();
            (Waiter::One(answer), Answers::One(answered))
        };
        let in_flight = {
            let mut pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.insert(call, waiter);
            pending.len()
        };
        let collect = async {
            self.inner
                .outbox
                .send(call, &self.inner.requests, frames, &self.inner, in_flight)
                .await?;
            let mut collected = Vec::new();
            while let Some(answer) = answers.next().await {
                let (more, none) = (all && answer.more, answer.none);
                if !none {
                    collected.push(answer);
                }
                if !more {
                    return Ok(collected);
                }
            }
            // The link watcher dropped this call: its server went away.
            Err(Error::ServerGone {
                address: self.inner.address.clone(),
            })
        };
        let outcome = match tokio::time::timeout(deadline, collect.instrument(span)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::Timeout {
                what: format!("{}", message.function),
                waited: deadline,
            }),
        };
        // A call answered once has left the map already, with its answer.
        if all || outcome.is_err() {
            self.inner
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&call);
        }
        outcome
    }

    /// `function` as `server.method`: on this client's server unless it names one.
    fn full_name(&self, function: &str) -> String {
        if function.contains('.') {
            return function.to_owned();
        }
        let server = &self.inner.server;
        let mut name = String::with_capacity(server.len() + 1 + function.len());
        name.push_str(server);
        name.push('.');
        name.push_str(function);
        name
    }

    /// Calls a mux function (one that yields many results) and returns every part, in order.
    pub async fn eval_all(
        &self,
        function: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Vec<Bytes>, Error> {
        let name = self.full_name(function);
        let mut message = Message::call(name.clone(), payload);
        let answers = self
            .exchange(&mut message, self.inner.deadline, true)
            .await?;
        answers
            .into_iter()
            .map(|answer| answer.into_result(|| name.clone()))
            .collect()
    }

    /// Calls `function` (on this client's server) with `payload` and returns its result.
    pub async fn eval(&self, function: &str, payload: impl Into<Bytes>) -> Result<Bytes, Error> {
        self.eval_within(function, payload, self.inner.deadline)
            .await
    }

    /// [`Client::eval`] with its own deadline.
    pub async fn eval_within(
        &self,
        function: &str,
        payload: impl Into<Bytes>,
        deadline: Duration,
    ) -> Result<Bytes, Error> {
        let message = Message::call(self.full_name(function), payload);
        self.send_and_wait(message, deadline)
            .await?
            .into_result(|| self.full_name(function))
    }

    /// Runs `payload` through a pipeline of functions, each stage's result the next one's input.
    pub async fn eval_stages(
        &self,
        stages: &[&str],
        payload: impl Into<Bytes>,
    ) -> Result<Bytes, Error> {
        let names: Vec<String> = stages.iter().map(|s| self.full_name(s)).collect();
        let label = names.join(" ");
        let message = Message::call(rylm_message::Function::Stages(names), payload);
        self.send_and_wait(message, self.inner.deadline)
            .await?
            .into_result(|| label)
    }

    /// Calls `function` once per payload, at most `in_flight` at a time, and yields
    /// `(index, result)` pairs as they complete.
    pub fn job(
        &self,
        function: &str,
        payloads: impl IntoIterator<Item = Bytes> + Send + 'static,
        in_flight: usize,
    ) -> mpsc::Receiver<(usize, Result<Bytes, Error>)> {
        let (results, receiver) = mpsc::channel(in_flight.max(1));
        let (client, function) = (self.clone(), function.to_owned());
        let payloads: Vec<Bytes> = payloads.into_iter().collect();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
            for (index, payload) in payloads.into_iter().enumerate() {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (client, function, results) =
                    (client.clone(), function.clone(), results.clone());
                tokio::spawn(async move {
                    let outcome = client.eval(&function, payload).await;
                    let _ = results.send((index, outcome)).await;
                    drop(permit);
                });
            }
        });
        receiver
    }

    /// Stores `value` in the server's cache, under `key` or a new key; returns the key.
    pub async fn set(&self, key: Option<&str>, value: impl Into<Bytes>) -> Result<String, Error> {
        let request = Message::call("cache.set", value).with_cache(key.unwrap_or_default());
        let reply = self.cache_request(&request).await?.unwrap_or_default();
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// The value under `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, Error> {
        self.cache_request(&Message::call("cache.get", key.to_owned()))
            .await
    }

    /// Removes `key`; returns the value it had.
    pub async fn delete(&self, key: &str) -> Result<Option<Bytes>, Error> {
        self.cache_request(&Message::call("cache.delete", key.to_owned()))
            .await
    }

    async fn cache_request(&self, request: &Message) -> Result<Option<Bytes>, Error> {
        // The cache socket has the client's deadline of its own (and stays usable after it).
        let mut cache = self.inner.cache.lock().await;
        cache_ask(&mut cache, request).await
    }
}

/// `value` in decimal, written into `buffer`.
fn decimal(mut value: u64, buffer: &mut [u8; 20]) -> &str {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    std::str::from_utf8(&buffer[at..]).unwrap_or_default()
}

/// Hands every result that comes over `socket` (after `skip` frames: a SUB's topic) to the call
/// waiting for it.
fn receive(
    socket: Socket,
    skip: usize,
    codec: Arc<dyn Codec>,
    pending: Pending,
) -> tokio::task::JoinHandle<()> {
    // Native answers are read in place: a call needs its payload and error, not the envelope.
    let native = NativeCodec::when_native(codec.as_ref());
    tokio::spawn(async move {
        while let Ok(received) = socket.recv_message().await {
            match native {
                // One answer, or a batch of them (`[MARKER, body, ...]`).
                Some(native)
                    if received.len() == skip + 2
                        || (received.len() > skip + 2
                            && received.part(skip) == Some(&rylm_message::MARKER[..])) =>
                {
                    for at in skip + 1..received.len() {
                        hand_over(&pending, Answer::read_native(native, &received, skip, at));
                    }
                }
                _ => {
                    let frames = received.into_frames();
                    let answer =
                        Answer::read(codec.as_ref(), frames.get(skip..).unwrap_or_default());
                    hand_over(&pending, answer);
                }
            }
        }
    })
}

/// Gives `answer` to the call waiting for it. An answer to no call of this client (a stray, or
/// past its deadline), or one that did not read, is dropped.
fn hand_over(pending: &Pending, answer: Option<Answer>) {
    let Some(answer) = answer else {
        return;
    };
    let call = answer.call;
    let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
    match pending.remove(&call) {
        Some(Waiter::One(waiter)) => {
            drop(pending);
            let _ = waiter.send(answer);
        }
        Some(Waiter::Parts(parts)) => {
            let _ = parts.send(answer);
            pending.insert(call, Waiter::Parts(parts));
        }
        None => {}
    }
}

/// Fails every pending call with [`Error::ServerGone`] when the connection its results come
/// over is lost, and asks the next call to resynchronise once it is back. (The requests'
/// connection may close first on a graceful stop, while the results still come.)
async fn watch_link(mut results: rylm_transport::Events, pending: Pending, link: Arc<Link>) {
    use std::sync::atomic::Ordering;
    loop {
        match results.next().await {
            None => return,
            Some(Event::Disconnected { reason, .. }) => {
                link.resync.store(true, Ordering::SeqCst);
                let failed: Vec<_> = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain()
                    .collect();
                tracing::warn!(%reason, failed = failed.len(), "lost the connection to the server; its calls failed");
            }
            Some(_) => {}
        }
    }
}

/// A preset key of the server's cache, as text.
async fn preset(
    cache: &mut Ask,
    db_address: &str,
    key: &str,
    deadline: Duration,
) -> Result<String, Error> {
    let request = Message::call("cache.get", key.to_owned());
    let value = tokio::time::timeout(deadline, cache_ask(cache, &request))
        .await
        .map_err(|_| Error::Timeout {
            what: format!("the cache at {db_address}"),
            waited: deadline,
        })??
        .ok_or_else(|| Error::Server {
            address: db_address.to_owned(),
            reason: format!("its cache has no {key:?}"),
        })?;
    Ok(String::from_utf8_lossy(&value).into_owned())
}

async fn cache_ask(cache: &mut Ask, request: &Message) -> Result<Option<Bytes>, Error> {
    let reply = cache.ask(request).await?;
    if let Some(kind) = reply.header(ERROR_KIND) {
        return Err(Error::Remote {
            function: request.function.to_string(),
            kind: kind.to_owned(),
            message: reply.header(ERROR_MESSAGE).unwrap_or_default().to_owned(),
        });
    }
    Ok(if reply.header(MISSING).is_some() {
        None
    } else {
        Some(reply.payload)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_are_written_in_decimal() {
        for value in [0, 7, 10, 12_345, u64::from(u32::MAX), u64::MAX] {
            let mut buffer = [0u8; 20];
            assert_eq!(super::decimal(value, &mut buffer), value.to_string());
        }
    }

    /// The batch size a Client announces is the one the crate reads (a literal because the
    /// request's headers are borrowed; this keeps it from drifting).
    #[test]
    fn a_client_announces_the_batch_size_it_reads() {
        assert_eq!(super::READS_BATCHES, crate::MAX_BATCH.to_string());
    }
}
