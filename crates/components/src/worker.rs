//! The Worker: runs functions for a master, in rylm's layout (a DEALER to the master's ROUTER,
//! credits and heartbeats both ways) or in pylm's (a PULL from the master's PUSH, a PUSH to its
//! PULL), with one loop for both.
//!
//! A message is never run past its deadline: one that arrives late is answered `deadline`
//! without running, and an async function still running at the deadline is cancelled and
//! answered `deadline` (a blocking function runs on, its result dropped). Every message held
//! gets an answer, so the master's credit comes back: a result too large to encode becomes an
//! `unencodable` error, and a master that sends more than twice the credits gets `busy`. The
//! worker never stalls its heartbeats: functions wait for a free slot in tasks of their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_message::trace::TRACEPARENT;
use rylm_message::{Codec, Message, NativeCodec};
use rylm_transport::{Event, Kind, Socket};
use tokio::sync::{Semaphore, watch};

use crate::functions::{PIPELINED, deadline_of};
use crate::parts::{Endpoint, Transport, answer_frames, error_reply};
use crate::pool::batch::Packer;
use crate::pool::{
    BATCH, BATCH_BYTES, CANCEL, CANCEL_FUNCTION, CREDITS, DISPATCH, FUNCTIONS, HEARTBEAT_FUNCTION,
    HOLDING, MAX_BATCH, ONCE, READY_FUNCTION, next_event,
};
use crate::{Error, Functions};

/// The longest first step of a function run in the worker's loop before functions move to tasks
/// of their own.
const INLINE_LIMIT: Duration = Duration::from_millis(2);
/// How many messages start in tasks of their own after a first step took longer than
/// `INLINE_LIMIT`, before the loop tries again.
const SPAWNED_AFTER_SLOW: u32 = 1_000;

/// How long a control message waits for room toward the master.
const CONTROL_WAIT: Duration = Duration::from_millis(20);

/// Builds a [`Worker`].
pub struct WorkerBuilder {
    functions: Functions,
    codec: Arc<dyn Codec>,
    credits: usize,
    heartbeat: crate::Heartbeat,
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

    /// How often it sends heartbeats (default 1 s; match the master's). The master is taken
    /// for gone after 3 silent intervals, and the worker announces itself until it answers.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat.interval = interval;
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
        let values = lookup(
            db_address,
            &self.transport,
            codec,
            false,
            &["name", "worker_address"],
            deadline,
        )
        .await
        .map_err(|error| match error {
            Error::Server { address, .. } => Error::Server {
                address,
                reason: "its cache has no worker_address: it is not a master".into(),
            },
            other => other,
        })?;
        let [server, address] = <[String; 2]>::try_from(values).map_err(|_| Error::Closed)?;
        let mut builder = self;
        builder.server = server;
        builder.connect(&address).await
    }

    /// Serves a pylm Master whose cache is at `db_address`, in pylm's layout: PULL from its
    /// `worker_push_address`, PUSH answers to its `worker_pull_address`, PalmMessage frames, and
    /// `b"0"` for a failed function. pylm masters have no credits or heartbeats: this worker
    /// runs up to `credits` messages at once.
    #[cfg(feature = "pylm")]
    pub async fn connect_pylm(
        mut self,
        db_address: &str,
        deadline: Duration,
    ) -> Result<Worker, Error> {
        let codec: Arc<dyn Codec> = Arc::new(rylm_message::PylmCodec::default());
        let keys = ["name", "worker_push_address", "worker_pull_address"];
        let values = lookup(
            db_address,
            &self.transport,
            codec.clone(),
            true,
            &keys,
            deadline,
        )
        .await?;
        let [server, from_master, to_master] =
            <[String; 3]>::try_from(values).map_err(|_| Error::Closed)?;
        let pull = Socket::new(Kind::Pull, &self.transport.connected)?;
        pull.connect(&from_master).await?;
        let push = Socket::new(Kind::Push, &self.transport.connected)?;
        push.connect(&to_master).await?;
        self.server = server;
        self.codec = codec;
        self.functions = self.functions.failure_payload("0");
        let link = Link {
            from: pull,
            to: push,
            events: None,
        };
        Ok(Worker::spawn(self, link))
    }

    /// Connects to the master's worker address and starts working.
    pub async fn connect(self, worker_address: &str) -> Result<Worker, Error> {
        // An identity of its own, so that the master knows which worker a connection carries
        // and buries it at once when the connection closes.
        let mut options = self.transport.connected.clone();
        options.identity = Bytes::from(format!("worker-{}", rylm_message::new_id()));
        let socket = Socket::new(Kind::Dealer, &options)?;
        // Watch before connecting, so that the first connection's news is not missed.
        let events = socket.events();
        socket.connect(worker_address).await?;
        let link = Link {
            from: socket.clone(),
            to: socket,
            events: Some(events),
        };
        Ok(Worker::spawn(self, link))
    }
}

/// Reads `keys` from the cache at `db_address`, each as text; a missing key is
/// [`Error::Server`].
async fn lookup(
    db_address: &str,
    transport: &Transport,
    codec: Arc<dyn Codec>,
    raw: bool,
    keys: &[&str],
    deadline: Duration,
) -> Result<Vec<String>, Error> {
    let mut cache =
        crate::parts::Ask::req(&Endpoint::Connect(db_address.to_owned()), transport, codec)
            .await?
            .with_deadline(deadline);
    if raw {
        cache = cache.with_raw_replies();
    }
    let read = async {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            let reply = cache
                .ask(&Message::call("cache.get", (*key).to_owned()))
                .await?;
            if reply.header(crate::MISSING).is_some() {
                return Err(Error::Server {
                    address: db_address.to_owned(),
                    reason: format!("its cache has no {key:?}"),
                });
            }
            values.push(String::from_utf8_lossy(&reply.payload).into_owned());
        }
        Ok(values)
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("the cache at {db_address}"),
            waited: deadline,
        })?
}

/// The sockets to and from the master; `events` only in rylm's layout, which has READY and
/// heartbeats.
struct Link {
    from: Socket,
    to: Socket,
    events: Option<rylm_transport::Events>,
}

/// A running worker.
#[derive(Debug)]
pub struct Worker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Set when the worker's loop ends before it was told to stop.
    ended: watch::Receiver<Option<String>>,
}

impl Worker {
    /// A builder for a worker that runs `functions`.
    pub fn builder(functions: Functions) -> WorkerBuilder {
        WorkerBuilder {
            functions,
            codec: Arc::new(NativeCodec::default()),
            credits: 8,
            heartbeat: crate::Heartbeat::default(),
            server: String::new(),
            transport: Transport::default(),
        }
    }

    fn spawn(builder: WorkerBuilder, link: Link) -> Worker {
        use futures_lite::FutureExt;
        let (stop, stopped) = watch::channel(false);
        let (ended_tx, ended) = watch::channel(None);
        let told = stopped.clone();
        let task = tokio::spawn(async move {
            let outcome = std::panic::AssertUnwindSafe(work(builder, link, stopped))
                .catch_unwind()
                .await;
            if !*told.borrow() {
                let what = match outcome {
                    Ok(()) => "the worker's connection to its master closed".to_owned(),
                    Err(_) => "the worker's loop panicked".to_owned(),
                };
                tracing::error!("{what}");
                ended_tx.send_replace(Some(what));
            }
        });
        Worker { stop, task, ended }
    }

    /// Resolves when the worker stops working though it was not told to (its socket closed
    /// under it, a panic), with what happened; never while it works.
    pub async fn died(&self) -> String {
        let mut ended = self.ended.clone();
        loop {
            if let Some(what) = ended.borrow_and_update().clone() {
                return what;
            }
            if ended.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Stops taking messages, finishes and answers the ones it holds, then closes.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// [`Worker::shutdown`] within `limit`; what is still running then is abandoned (its master
    /// re-dispatches it). Returns whether it finished in time.
    pub async fn shutdown_within(self, limit: Duration) -> bool {
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        match tokio::time::timeout(limit, self.task).await {
            Ok(_) => true,
            Err(_) => {
                abort.abort();
                false
            }
        }
    }

    /// Stops at once, as a crash would: what it holds is never answered.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// What the worker's tasks share.
struct Shared {
    functions: Functions,
    server: String,
    codec: Arc<dyn Codec>,
    to: Socket,
    slots: Semaphore,
    /// The largest message the master takes (the transport's limit).
    max_message: usize,
    /// Dispatches being run (announced in READY, so a master counts their credits).
    /// The dispatches this worker runs, each with its task once it has one of its own (so that
    /// a cancelled dispatch can be stopped).
    holding: Mutex<HashMap<Bytes, Option<tokio::task::AbortHandle>>>,
    /// While the loop takes a burst from a master that sends batches: the bodies of the plain
    /// answers made meanwhile, sent as batches at the end of the burst (see [`Shared::flush`]).
    gathered: Mutex<Option<Vec<Bytes>>>,
}

impl Shared {
    /// Sends a heartbeat, a READY or a `busy`: at once or not at all, so the worker's loop never
    /// stalls on a master that is away (heartbeats and announcements go out again anyway).
    async fn signal(&self, message: &Message) {
        match self.codec.encode_frames(message) {
            Ok(frames) => {
                if let Err(error) = self.to.send_within(frames, CONTROL_WAIT).await {
                    tracing::debug!(%error, "the master did not take a control message");
                }
            }
            Err(error) => tracing::error!(%error, "could not encode a control message"),
        }
    }

    /// Sends an answer, waiting up to the transport's send timeout for the master.
    async fn send(&self, message: &Message) {
        // Answer anyway, so the master's credit comes back and its caller knows.
        let frames = match answer_frames(self.codec.as_ref(), message, self.max_message) {
            Ok(frames) => frames,
            Err(error) => {
                tracing::error!(%error, "could not encode an error answer");
                return;
            }
        };
        if let Err(error) = self.to.send(frames).await {
            tracing::warn!(%error, "could not reach the master");
        }
    }

    /// The READY of this worker: its credits, its functions, what it still runs.
    fn ready(&self, credits: usize) -> Message {
        let mut names: Vec<&str> = self.functions.names().collect();
        names.sort_unstable();
        let mut once: Vec<&str> = self.functions.once_names().collect();
        once.sort_unstable();
        let holding: Vec<String> = self
            .holding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .map(|id| String::from_utf8_lossy(id).into_owned())
            .collect();
        let ready = Message::call(READY_FUNCTION, Bytes::new())
            .with_header(CREDITS, credits.to_string())
            .with_header(FUNCTIONS, names.join(","))
            .with_header(ONCE, once.join(","))
            .with_header(HOLDING, holding.join(","));
        // Batches only when its transport takes them.
        if crate::pool::takes_batches(self.max_message) {
            ready.with_header(BATCH, MAX_BATCH.to_string())
        } else {
            ready
        }
    }

    /// A plain answer's body: gathered while the loop takes a burst, else sent at once.
    async fn answer(&self, body: Bytes) {
        {
            let mut gathered = self.gathered.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(gathered) = gathered.as_mut() {
                gathered.push(body);
                return;
            }
        }
        let frames = vec![Bytes::from_static(&rylm_message::MARKER), body];
        if let Err(error) = self.to.send(frames).await {
            tracing::warn!(%error, "could not reach the master");
        }
    }

    /// Starts gathering plain answers (the master sends batches, so it takes them).
    fn gather(&self) {
        self.gathered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Vec::new);
    }

    /// Sends what was gathered, in batches within [`MAX_BATCH`] and [`BATCH_BYTES`] (and the
    /// transport's limit), and stops gathering.
    async fn flush(&self) {
        let Some(bodies) = self
            .gathered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let limit = BATCH_BYTES.min(self.max_message.saturating_sub(64));
        let mut packer = Packer::new(MAX_BATCH, limit);
        let mut batches: Vec<_> = bodies.into_iter().filter_map(|b| packer.push(b)).collect();
        batches.extend(packer.finish());
        for batch in batches {
            if let Err(error) = self.to.send(batch).await {
                tracing::warn!(%error, "could not reach the master");
            }
        }
    }

    /// Runs one message within its deadline and answers it. `frames` are the message as it
    /// came: past its deadline, the function (which took the message) is dropped, and the
    /// error answer is made from them instead of from a copy kept of every message. `dispatch`
    /// is the message's dispatch id (header [`DISPATCH`]), read once by the intake.
    async fn run(
        self: Arc<Self>,
        message: Message,
        frames: Vec<Bytes>,
        deadline: Option<Instant>,
        dispatch: Option<Bytes>,
    ) {
        let Ok(_permit) = self.slots.acquire().await else {
            return;
        };
        if let Some(id) = &dispatch {
            self.hold(id);
        }
        let expired = |message: &Message| {
            error_reply(
                message,
                "deadline",
                "the deadline passed before the function finished",
            )
        };
        let answers = match deadline {
            Some(deadline) if deadline <= Instant::now() => vec![expired(&message)],
            Some(deadline) => {
                let started = Instant::now();
                let call = self.functions.call_many(&self.server, message);
                match tokio::time::timeout_at(deadline.into(), call).await {
                    Ok(answers) => answers,
                    // It decoded once, so it decodes again.
                    Err(_) => match self.codec.decode_frames(&frames) {
                        Ok(message) => {
                            self.functions.count_timeout(&message, started.elapsed());
                            vec![expired(&message)]
                        }
                        Err(error) => {
                            tracing::error!(%error, "a message past its deadline no longer decodes");
                            Vec::new()
                        }
                    },
                }
            }
            None => self.functions.call_many(&self.server, message).await,
        };
        for mut answer in answers {
            // An answer that goes back to its caller ends the trace there (the caller holds
            // its context); one that moves on down a pipeline carries it on.
            if answer.header(PIPELINED).is_none() {
                answer.headers.remove(TRACEPARENT);
            }
            self.send(&answer).await;
        }
        if let Some(id) = dispatch {
            self.holding
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

/// A request to run straight from its bytes: a plain function (one result, from the payload
/// alone) of one name, with no span to record here and no pipeline to go on down. Its answer is
/// the request's body with the result as its payload, written without decoding the request into
/// a message and encoding that again, as [`Message::reply`] and the codec would write it.
struct Plain {
    function: crate::functions::Function,
    /// The method's name, in the request's body.
    method: Bytes,
    payload: Bytes,
    answering: rylm_message::Answering,
    /// The dispatch id, in the request's body.
    dispatch: Option<Bytes>,
    deadline: Option<Instant>,
}

impl Plain {
    /// The request in `frames` (`[marker, body]`) as a plain call, when it is one.
    fn read(functions: &Functions, codec: &NativeCodec, frames: &[Bytes]) -> Option<Plain> {
        let [_, body] = frames else {
            return None;
        };
        let view = codec.view(frames).ok()?;
        let name = view.function_name()?;
        let [pipelined, traceparent, dispatch, deadline] =
            view.headers_named([PIPELINED, TRACEPARENT, DISPATCH, crate::DEADLINE]);
        if !view.is_single_function()
            || matches!(name, READY_FUNCTION | HEARTBEAT_FUNCTION | CANCEL_FUNCTION)
            || pipelined.is_some()
            || traceparent
                .is_some_and(|tp| rylm_message::trace::Hop::continue_if_recorded(tp).is_some())
        {
            return None;
        }
        let method = name.split_once('.').map_or(name, |(_, method)| method);
        let function = functions.plain(method)?;
        let payload = if view.payload().is_empty() {
            Bytes::new()
        } else {
            body.slice_ref(view.payload())
        };
        Some(Plain {
            function,
            method: body.slice_ref(method.as_bytes()),
            payload,
            answering: view.answering()?,
            dispatch: dispatch.map(|id| body.slice_ref(id.as_bytes())),
            deadline: deadline
                .and_then(|value| crate::functions::deadline_in(value, Instant::now())),
        })
    }
}

impl Shared {
    /// Notes that this worker runs dispatch `id` (and keeps the task noted for it, if any).
    fn hold(&self, id: &Bytes) {
        self.holding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_insert(None);
    }

    /// Notes `task` as the task that runs dispatch `id`, so that a cancel can stop it. A task
    /// that is done by then has let its dispatch go (or is about to: it takes its entry out as
    /// it ends).
    fn running_in(&self, id: Bytes, task: tokio::task::AbortHandle) {
        let mut holding = self.holding.lock().unwrap_or_else(|e| e.into_inner());
        if task.is_finished() {
            holding.remove(&id);
        } else {
            holding.insert(id, Some(task));
        }
    }

    /// Stops dispatch `id` at the pool's request (its caller went away) and confirms, which
    /// gives its credit back at once. A dispatch this worker no longer runs (its answer went
    /// out, and gave the credit back) or that runs in no task of its own is left alone.
    async fn cancel(&self, id: &str) {
        let task = {
            let mut holding = self.holding.lock().unwrap_or_else(|e| e.into_inner());
            match holding.get(id.as_bytes()) {
                Some(Some(_)) => holding.remove(id.as_bytes()).flatten(),
                _ => None,
            }
        };
        let Some(task) = task else {
            return;
        };
        task.abort();
        let confirm =
            Message::call(CANCEL_FUNCTION, Bytes::new()).with_header(DISPATCH, id.to_owned());
        self.signal(&confirm).await;
    }

    /// [`Shared::run`] for a [`Plain`] request that came as `frames`.
    async fn run_plain(self: Arc<Self>, plain: Plain, frames: Vec<Bytes>) {
        let Ok(_permit) = self.slots.acquire().await else {
            return;
        };
        if let Some(id) = &plain.dispatch {
            self.hold(id);
        }
        let method = std::str::from_utf8(&plain.method).unwrap_or_default();
        let started = Instant::now();
        let outcome = match plain.deadline {
            Some(deadline) if deadline <= started => None,
            Some(deadline) => {
                let call = self
                    .functions
                    .run_plain(method, &plain.function, plain.payload);
                let ran = tokio::time::timeout_at(deadline.into(), call).await.ok();
                if ran.is_none() {
                    self.functions.count_timeout_of(method, started.elapsed());
                }
                ran
            }
            None => Some(
                self.functions
                    .run_plain(method, &plain.function, plain.payload)
                    .await,
            ),
        };
        let answer = match (&outcome, frames.get(1)) {
            // The short answer: the master finds the caller by the dispatch id, and the
            // caller knows its own session and id.
            (Some(Ok(result)), Some(body)) => plain
                .answering
                .short_answer(body, result, &[TRACEPARENT, crate::DEADLINE, BATCH])
                .ok()
                .filter(|body| body.len() + rylm_message::MARKER.len() <= self.max_message),
            _ => None,
        };
        match answer {
            Some(answer) => self.answer(answer).await,
            // A failure, a deadline, or a result too large: the answer is made from the message
            // (it decoded once as a view, so it decodes).
            None => match self.codec.decode_frames(&frames) {
                Ok(mut message) => {
                    message.headers.remove(TRACEPARENT);
                    let answer = match outcome {
                        Some(Ok(result)) => message.reply(result),
                        Some(Err((kind, text))) => {
                            self.functions.failed(error_reply(&message, kind, &text))
                        }
                        None => error_reply(
                            &message,
                            "deadline",
                            "the deadline passed before the function finished",
                        ),
                    };
                    self.send(&answer).await;
                }
                Err(error) => tracing::error!(%error, "a message viewed once no longer decodes"),
            },
        }
        if let Some(id) = plain.dispatch {
            self.holding
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

/// The worker's loop's own state for the messages it takes.
struct Intake {
    shared: Arc<Shared>,
    /// Reads plain calls in place (rylm's layout with its own codec).
    viewer: Option<NativeCodec>,
    native: bool,
    credits: usize,
    running: tokio::task::JoinSet<()>,
    last_heard: Instant,
    silent: bool,
    /// How many of the next messages start in a task of their own (see [`Intake::take`]).
    spawn_next: u32,
    warned: bool,
}

impl Intake {
    /// A message from the master, or each of a batch's (`[MARKER, body, body, ...]`, from a
    /// master that takes batches of answers: they are gathered from then on, see
    /// [`Shared::flush`]).
    async fn take_all(&mut self, received: rylm_transport::Received, batches: &mut bool) {
        let batch = self.native
            && received.len() > 2
            && received.part(0) == Some(&rylm_message::MARKER[..]);
        *batches |= batch;
        if *batches {
            self.shared.gather();
        }
        if !batch {
            self.take(received.into_frames()).await;
            return;
        }
        let marker = Bytes::from_static(&rylm_message::MARKER);
        for body in 1..received.len() {
            if let Some(body) = received.bytes(body) {
                self.take(vec![marker.clone(), body]).await;
            }
        }
    }

    /// One message from the master: a control message handled, a call started (its first
    /// step here) or answered `busy`.
    async fn take(&mut self, frames: Vec<Bytes>) {
        let shared = &self.shared;
        let plain = self
            .viewer
            .as_ref()
            .and_then(|viewer| Plain::read(&shared.functions, viewer, &frames));
        let message = match &plain {
            Some(_) => None,
            None => match shared.codec.decode_frames(&frames) {
                Ok(message) => Some(message),
                Err(error) => {
                    tracing::warn!(%error, "dropped a frame from the master that does not decode");
                    return;
                }
            },
        };
        self.last_heard = Instant::now();
        if self.silent {
            tracing::info!("the master answers again");
            self.silent = false;
        }
        if self.native {
            match message.as_ref().and_then(Message::function_name) {
                Some(READY_FUNCTION) => {
                    shared.signal(&shared.ready(self.credits)).await;
                    return;
                }
                Some(HEARTBEAT_FUNCTION) => return,
                Some(CANCEL_FUNCTION) => {
                    if let Some(id) = message.as_ref().and_then(|m| m.header(CANCEL)) {
                        shared.cancel(id).await;
                    }
                    return;
                }
                _ => {}
            }
        }
        // A master keeps within the credits; one that sends far more gets `busy`.
        let credits = self.credits;
        if self.running.len() >= credits * 2 {
            let text =
                format!("this worker runs {credits} messages at once and holds as many waiting");
            let busy = message.or_else(|| shared.codec.decode_frames(&frames).ok());
            if let Some(message) = busy {
                shared.signal(&error_reply(&message, "busy", &text)).await;
            }
            return;
        }
        // The dispatch, to note the task that runs it if it gets one.
        let dispatch = match (&plain, &message) {
            (Some(plain), _) => plain.dispatch.clone(),
            (None, Some(message)) => message
                .header(DISPATCH)
                .map(|id| Bytes::copy_from_slice(id.as_bytes())),
            (None, None) => None,
        };
        let mut run: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            match (plain, message) {
                (Some(plain), _) => Box::pin(shared.clone().run_plain(plain, frames)),
                (None, Some(message)) => {
                    let deadline = deadline_of(&message, self.last_heard);
                    Box::pin(
                        shared
                            .clone()
                            .run(message, frames, deadline, dispatch.clone()),
                    )
                }
                (None, None) => return,
            };
        // Its first step here: a function that answers at once needs no task (a hop between
        // threads costs more than most functions). One whose first step takes long would hold
        // up this loop and its heartbeats: after it, the next messages start in tasks of their
        // own, then the loop tries again (a thread preempted in the middle of a step looks the
        // same on a busy machine, so one slow step does not cost the worker its fast path for
        // good).
        let needs_task = if self.spawn_next > 0 {
            self.spawn_next -= 1;
            true
        } else {
            let started = self.last_heard;
            let done = futures_lite::future::poll_once(run.as_mut())
                .await
                .is_some();
            let took = started.elapsed();
            if took > INLINE_LIMIT {
                self.spawn_next = SPAWNED_AFTER_SLOW;
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::info!(
                        ?took,
                        "a function's first step is slow; messages start in tasks of their own for a while (this is logged once)"
                    );
                }
            }
            !done
        };
        if needs_task {
            let task = self.running.spawn(run);
            if let Some(id) = dispatch {
                shared.running_in(id, task);
            }
        }
    }
}

async fn work(builder: WorkerBuilder, link: Link, mut stopped: watch::Receiver<bool>) {
    let Link {
        from,
        to,
        mut events,
    } = link;
    let native = events.is_some();
    let credits = builder.credits;
    let shared = Arc::new(Shared {
        functions: builder.functions,
        server: builder.server,
        to,
        slots: Semaphore::new(credits),
        max_message: builder.transport.connected.max_message_size,
        holding: Mutex::default(),
        gathered: Mutex::default(),
        codec: builder.codec,
    });
    let beat = Message::call(HEARTBEAT_FUNCTION, Bytes::new());
    let grace = builder.heartbeat.grace();
    // READY goes out now, whenever a connection to the master is (again) ready, whenever the
    // master asks, and while the master is silent: a restarted master learns of its workers,
    // and a master that buried this worker readmits it.
    if native {
        shared.signal(&shared.ready(credits)).await;
    }
    let mut ticker = tokio::time::interval(builder.heartbeat.interval);
    let mut intake = Intake {
        viewer: NativeCodec::when_native(shared.codec.as_ref()).filter(|_| native),
        shared: shared.clone(),
        native,
        credits,
        running: tokio::task::JoinSet::new(),
        last_heard: Instant::now(),
        silent: false,
        spawn_next: 0,
        warned: false,
    };
    let mut connections = 0u64;
    // Whether the master sent a batch on this connection (and so takes batches of answers).
    let mut batches = false;
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = ticker.tick(), if native => {
                shared.signal(&beat).await;
                if intake.last_heard.elapsed() > grace {
                    if !intake.silent {
                        tracing::warn!(silent_for = ?intake.last_heard.elapsed(), "no word from the master; announcing again");
                        intake.silent = true;
                    }
                    shared.signal(&shared.ready(credits)).await;
                }
            }
            event = next_event(&mut events) => {
                if let Some(Event::Ready { .. }) = event {
                    connections += 1;
                    // A master on a new connection may not take batches until it sends one.
                    batches = false;
                    // The first READY went out above; later ones announce again.
                    if connections > 1 {
                        tracing::info!("the master is back; announcing again");
                        shared.signal(&shared.ready(credits)).await;
                    }
                }
            }
            received = from.recv_message() => {
                while intake.running.try_join_next().is_some() {}
                match received {
                    Ok(received) => intake.take_all(received, &mut batches).await,
                    Err(error) if error.is_closed() => break,
                    Err(_) => continue,
                }
                // The rest of a burst without waiting again.
                for _ in 1..rylm_transport::BURST {
                    // Each counts against the task's budget, as a wait would: a long burst
                    // yields to the tasks it woke instead of starving them.
                    tokio::task::coop::consume_budget().await;
                    match from.try_recv_message() {
                        Ok(Some(received)) => intake.take_all(received, &mut batches).await,
                        _ => break,
                    }
                }
                shared.flush().await;
            }
        }
    }
    shared.flush().await;
    // Finish and answer what is held, heartbeating meanwhile so the master waits for it.
    let mut running = intake.running;
    loop {
        tokio::select! {
            done = running.join_next() => if done.is_none() { break },
            _ = ticker.tick(), if native => shared.signal(&beat).await,
        }
    }
    from.close().await;
    if !native {
        shared.to.clone().close().await;
    }
}
