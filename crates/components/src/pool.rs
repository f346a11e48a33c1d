//! A worker pool: work farmed out by credit to workers on a ROUTER, with heartbeats both ways,
//! bounded admission, a deadline per message and per dispatch, and exactly one answer per
//! message.
//!
//! A worker connects and says `READY` with its number of credits (how many messages it runs at
//! once, capped by [`Admission::max_credits`]) and the dispatches it still holds. The pool sends
//! a message only to a worker with a free credit; each answer to a dispatch the worker holds
//! returns a credit. Workers send heartbeats and the pool answers each, so both sides notice a
//! silence. A worker silent for `misses` intervals is buried: each message it held goes to
//! another worker once (unless its function must not run twice), and is failed back
//! (`worker-died`) when it was already a second try. A buried worker that speaks again is asked
//! to announce itself and is readmitted.
//!
//! Answers are taken only from a worker the dispatch was sent to, and only once: the first
//! answer wins, a late one (from a buried worker, or after a re-dispatch) is dropped and
//! counted. Dispatch ids carry a keyed hash, so a peer cannot guess another's.
//!
//! Admission is bounded: beyond [`Admission::max_waiting`] messages waiting for a credit, a new
//! one is answered `busy` at once. A message carries its caller's deadline
//! ([`crate::DEADLINE`]); one still waiting at its deadline is answered `deadline` and never
//! dispatched, and a dispatch unanswered past its deadline (plus the heartbeat grace) is
//! answered `deadline` and gives its credit back, so credits always come back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_core_router::{Delivery, OutboundQueue};
use rylm_message::{Codec, Forward, Message, NativeCodec};
use rylm_transport::{Event, Kind, Received, Socket};

use crate::functions::{PIPELINED, SYNC_FUNCTION, deadline_of};
use crate::parts::{Endpoint, Transport, answer_frames, error_reply};
use crate::{Error, MORE};

/// A worker says it is ready, with headers [`CREDITS`], [`FUNCTIONS`], [`HOLDING`] and
/// [`ONCE`].
pub const READY_FUNCTION: &str = "rylm.ready";
/// A heartbeat, from a worker and back from the pool.
pub const HEARTBEAT_FUNCTION: &str = "rylm.heartbeat";
/// The header of a `READY` that says how many messages the worker runs at once.
pub const CREDITS: &str = "rylm-credits";
/// The header of a `READY` that lists the worker's functions.
pub const FUNCTIONS: &str = "rylm-functions";
/// The header of a `READY` that lists the dispatches the worker is still running.
pub const HOLDING: &str = "rylm-holding";
/// The header of a `READY` that lists the worker's functions that must not run twice.
pub const ONCE: &str = "rylm-once";
/// Withdraws the messages of one caller (its id as the message's `client`): those waiting are
/// dropped, and the answers of those a worker holds are discarded (a gateway sends it for a
/// request whose HTTP client went away).
pub const WITHDRAW_FUNCTION: &str = "rylm.withdraw";
/// The header that tells the pool which dispatch an answer belongs to.
pub(crate) const DISPATCH: &str = "rylm-dispatch";
/// Asks a worker to stop running a dispatch whose caller went away (header [`CANCEL`]); the
/// worker confirms with the same function and the dispatch in [`DISPATCH`], which gives the
/// credit back at once instead of when the function would have ended.
pub const CANCEL_FUNCTION: &str = "rylm.cancel";
/// The header of a [`CANCEL_FUNCTION`] from the pool: the dispatch to stop. (Not [`DISPATCH`],
/// so that a worker that does not know the function answers an error that settles nothing.)
pub const CANCEL: &str = "rylm-cancel";

/// Timing of the pool's view of its workers (and theirs of the pool).
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

impl Heartbeat {
    /// How long a silence lasts before the other side is taken for dead.
    pub fn grace(&self) -> Duration {
        self.interval * self.misses.max(1)
    }
}

/// The bounds of a pool.
#[derive(Clone, Debug)]
pub struct Admission {
    /// Messages waiting for a credit; beyond them a new message is answered `busy` (default
    /// 10,000).
    pub max_waiting: usize,
    /// The most credits one worker may announce (default 256).
    pub max_credits: usize,
    /// The deadline of a message that carries none (default 5 minutes).
    pub default_deadline: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_waiting: 10_000,
            max_credits: 256,
            default_deadline: Duration::from_secs(300),
        }
    }
}

/// A hook that turns one message into any number (pylm's `scatter` and `gather`).
pub type Hook = Arc<dyn Fn(Message) -> Vec<Message> + Send + Sync>;

/// What `hook` (named `name` in the log) makes of `message`. A hook that panics does not take
/// its component down: the log says so, and the error is the message without its payload (what
/// an error reply to its caller needs).
pub(crate) fn run_hook(
    hook: &Hook,
    name: &str,
    message: Message,
) -> Result<Vec<Message>, Box<Message>> {
    let mut kept = Message {
        payload: bytes::Bytes::new(),
        ..message.clone()
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(message))) {
        Ok(messages) => Ok(messages),
        Err(_) => {
            tracing::error!(hook = name, function = %kept.function, client = %kept.client, "a hook panicked");
            kept.headers.remove(DISPATCH);
            Err(Box::new(kept))
        }
    }
}
/// pylm's `handle_stream`: the topic a result is published under.
pub type StreamHook = Arc<dyn Fn(&Message) -> String + Send + Sync>;

/// Where a worker pool's results go.
pub enum ResultSink {
    /// To their callers or down the stream (a Master in rylm's layout).
    Answer(Box<crate::callers::Results>),
    /// Published on a PUB socket under `handle_stream`'s topic.
    Publish(Socket),
    /// Handed to a channel, for a component in the same process (a gateway).
    Channel(tokio::sync::mpsc::Sender<Message>),
}

impl std::fmt::Debug for ResultSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResultSink::Answer(_) => "ResultSink::Answer",
            ResultSink::Publish(_) => "ResultSink::Publish",
            ResultSink::Channel(_) => "ResultSink::Channel",
        })
    }
}

/// What a pool has done, counted since it started.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Messages sent to a worker (re-dispatches included).
    pub dispatched: AtomicU64,
    /// Answers passed on.
    pub answered: AtomicU64,
    /// Messages sent to a second worker after the first was buried.
    pub redispatched: AtomicU64,
    /// Messages answered `busy` because the waiting line was full.
    pub busy: AtomicU64,
    /// Messages answered `deadline`: still waiting, or still unanswered, at their deadline.
    pub expired: AtomicU64,
    /// Messages failed back because the workers holding them died.
    pub worker_died: AtomicU64,
    /// Answers dropped: late duplicates, answers from a worker a dispatch was not sent to,
    /// answers to unknown dispatches.
    pub dropped_answers: AtomicU64,
    /// Frames from workers that did not decode.
    pub malformed: AtomicU64,
    /// Workers buried for silence.
    pub buried: AtomicU64,
    /// Workers admitted (again, after a burial or a restart, included).
    pub admitted: AtomicU64,
    /// Messages withdrawn by their caller before an answer.
    pub withdrawn: AtomicU64,
    /// Withdrawn messages a worker stopped running at the pool's request, its credit back.
    pub cancelled: AtomicU64,
}

impl PoolCounters {
    /// Every counter as (name, what it counts, value now): what `rylm.status` and the admin
    /// metrics both show, from one list.
    pub fn fields(&self) -> [(&'static str, &'static str, u64); 12] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "dispatched",
                "messages sent to a worker, re-dispatches included",
                load(&self.dispatched),
            ),
            ("answered", "answers passed on", load(&self.answered)),
            (
                "redispatched",
                "messages sent again after their worker was buried",
                load(&self.redispatched),
            ),
            (
                "busy",
                "messages answered busy: the waiting line was full",
                load(&self.busy),
            ),
            ("expired", "messages answered deadline", load(&self.expired)),
            (
                "worker_died",
                "messages failed back because their workers died",
                load(&self.worker_died),
            ),
            (
                "dropped_answers",
                "late, duplicate or unknown answers dropped",
                load(&self.dropped_answers),
            ),
            (
                "malformed",
                "frames from workers that did not decode",
                load(&self.malformed),
            ),
            (
                "workers_buried",
                "workers buried for silence or a closed connection",
                load(&self.buried),
            ),
            (
                "workers_admitted",
                "workers admitted, again after a burial included",
                load(&self.admitted),
            ),
            (
                "withdrawn",
                "messages withdrawn by their caller",
                load(&self.withdrawn),
            ),
            (
                "cancelled",
                "withdrawn messages a worker stopped running, its credit back",
                load(&self.cancelled),
            ),
        ]
    }
}

/// What a worker pool knows of its workers, shared with whoever asks.
#[derive(Debug, Default)]
pub struct PoolStatus {
    live: AtomicUsize,
    free_credits: AtomicUsize,
    waiting: AtomicUsize,
    in_flight: AtomicUsize,
    functions: std::sync::Mutex<std::collections::BTreeSet<String>>,
    counters: PoolCounters,
}

impl PoolStatus {
    /// How many workers are live now.
    pub fn live_workers(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Free credits over all live workers.
    pub fn free_credits(&self) -> usize {
        self.free_credits.load(Ordering::Relaxed)
    }

    /// Messages waiting for a credit.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Messages held by workers.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What the pool has done.
    pub fn counters(&self) -> &PoolCounters {
        &self.counters
    }

    /// Whether a worker has announced `function` (no copy of the list, for hot paths).
    pub fn knows(&self, function: &str) -> bool {
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(function)
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
}

/// An error answer to `message`, without the dispatch stamp a worker saw.
fn failure(message: &Message, kind: &str, text: &str) -> Message {
    let mut reply = error_reply(message, kind, text);
    reply.headers.remove(DISPATCH);
    reply
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
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
        let pool = Pool::new(codec, heartbeat, Arc::new(|m: &Message| m.client.clone()));
        Ok(WorkerPool {
            pool,
            socket,
            address,
        })
    }

    /// The bounds of admission (default [`Admission::default`]).
    pub fn admission(mut self, admission: Admission) -> Self {
        self.pool.admission = admission;
        self
    }

    /// When a worker dies and no other is connected, its messages are answered `worker-died`
    /// at once instead of waiting for another worker (for a gateway, whose callers are HTTP
    /// clients that should not wait for a worker that may never come).
    pub fn fail_when_alone(mut self) -> Self {
        self.pool.fail_alone = true;
        self
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
    holds: HashSet<DispatchId>,
    once: HashSet<String>,
    last_seen: Instant,
}

/// A dispatch's id: its number in the pool that made it and a keyed hash of that number, so
/// that a peer cannot guess another's. On the wire (header [`DISPATCH`]) `{number:x}.{tag:016x}`;
/// kept as two numbers, so that the pool's bookkeeping hashes and copies no string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DispatchId {
    number: u64,
    tag: u64,
}

impl DispatchId {
    /// Reads an id as it came back from a worker; `None` for what no pool writes.
    fn parse(text: &str) -> Option<DispatchId> {
        let (number, tag) = text.split_once('.')?;
        Some(DispatchId {
            number: u64::from_str_radix(number, 16).ok()?,
            tag: u64::from_str_radix(tag, 16).ok()?,
        })
    }

    /// Writes the id as it goes on the wire into `out`.
    fn write(self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(out, "{:x}.{:016x}", self.number, self.tag);
    }
}

/// Sets header `name` to what `write` writes, in place when the message has it already (a
/// caller's deadline, a re-dispatch's stamp): no allocation then.
fn set_header(message: &mut Message, name: &str, write: impl FnOnce(&mut String)) {
    match message.headers.get_mut(name) {
        Some(value) => {
            value.clear();
            write(value);
        }
        None => {
            let mut value = String::new();
            write(&mut value);
            message.headers.insert(name.to_owned(), value);
        }
    }
}

/// The workers a dispatch was sent to, in turn (at most two: one that dies holding it makes it
/// go to one other). The first is kept in place, so a dispatch allocates nothing for it.
#[derive(Default)]
struct Holders {
    first: Option<Bytes>,
    others: Vec<Bytes>,
}

impl Holders {
    fn push(&mut self, worker: Bytes) {
        match self.first {
            None => self.first = Some(worker),
            Some(_) => self.others.push(worker),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.first.iter().chain(&self.others)
    }

    fn contains(&self, worker: &[u8]) -> bool {
        self.iter().any(|w| w == worker)
    }

    fn len(&self) -> usize {
        self.iter().count()
    }
}

/// A caller's request as the pool keeps it: decoded, or (passed on as it came) its body and a
/// message that holds only its caller.
struct Request {
    message: Message,
    forward: Option<Forward>,
}

impl Request {
    /// The whole message: an error answer to it is made from this (rare: a request passed on
    /// as it came is decoded only then).
    fn full(&self) -> Message {
        let Some(forward) = &self.forward else {
            return self.message.clone();
        };
        match forward.decode() {
            Ok(mut message) => {
                message.client.clone_from(&self.message.client);
                message
            }
            Err(_) => self.message.clone(),
        }
    }
}

/// A message some worker holds (or held, and will be sent to another).
struct Dispatched {
    request: Request,
    /// The workers it was sent to, in turn: an answer from any of them is taken.
    holders: Holders,
    deadline: Instant,
}

/// A message waiting for a credit.
#[expect(
    clippy::large_enum_variant,
    reason = "the line holds fresh requests mostly; a box for each would cost an allocation per call"
)]
enum Queued {
    /// Not sent yet.
    Fresh(Request, Instant),
    /// Sent to a worker that was buried; to go to another.
    Again(DispatchId),
}

pub(crate) struct Pool {
    codec: Arc<dyn Codec>,
    heartbeat: Heartbeat,
    pub(crate) admission: Admission,
    pub(crate) scatter: Option<Hook>,
    pub(crate) gather: Option<Hook>,
    handle_stream: StreamHook,
    pub(crate) drain_for: Duration,
    workers: HashMap<Bytes, WorkerState>,
    waiting: VecDeque<Queued>,
    in_flight: HashMap<DispatchId, Dispatched>,
    /// Withdrawn dispatches whose workers are to be asked to stop running them (native
    /// workers only), sent before the next dispatch.
    cancels: Vec<(Bytes, DispatchId)>,
    dispatched: u64,
    keys: std::hash::RandomState,
    /// A dead worker's messages are failed back at once when no other worker is connected.
    pub(crate) fail_alone: bool,
    /// Set when the hooks are the defaults and the wire is native: answers go to their
    /// callers as they came from the workers, read in place rather than decoded and encoded
    /// again.
    pub(crate) pass_answers: Option<NativeCodec>,
    pub(crate) status: Arc<PoolStatus>,
}

impl Pool {
    pub(crate) fn new(codec: Arc<dyn Codec>, heartbeat: Heartbeat, topic: StreamHook) -> Pool {
        Pool {
            codec,
            heartbeat,
            admission: Admission::default(),
            scatter: None,
            gather: None,
            handle_stream: topic,
            drain_for: Duration::from_secs(10),
            workers: HashMap::new(),
            waiting: VecDeque::new(),
            in_flight: HashMap::new(),
            cancels: Vec::new(),
            dispatched: 0,
            keys: std::hash::RandomState::new(),
            fail_alone: false,
            pass_answers: None,
            status: Arc::default(),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut queue: OutboundQueue,
        workers: Socket,
        mut sink: ResultSink,
    ) -> Result<(), rylm_core_router::Error> {
        let mut ticker = tokio::time::interval(self.heartbeat.interval);
        let mut draining_since: Option<Instant> = None;
        // Which worker each connection carries (workers declare their identity), so that a
        // closed connection buries its worker at once rather than after the heartbeat grace.
        let mut events = Some(workers.events());
        let mut connections: HashMap<u64, Bytes> = HashMap::new();
        loop {
            if draining_since.is_some() && self.waiting.is_empty() && self.in_flight.is_empty() {
                break;
            }
            if draining_since.is_some_and(|since| since.elapsed() >= self.drain_for) {
                self.fail_everything(&mut sink).await;
                break;
            }
            tokio::select! {
                // The rest of a burst is taken without waiting again, each message dispatched
                // as it would be alone.
                delivery = queue.recv(), if draining_since.is_none() => match delivery {
                    Some(delivery) => {
                        self.on_router_message(delivery, &mut sink).await;
                        for _ in 1..rylm_transport::BURST {
                            // Each counts against the task's budget, as a wait would: a long burst
                            // yields to the tasks it woke instead of starving them.
                            tokio::task::coop::consume_budget().await;
                            self.dispatch(&workers, &mut sink).await;
                            let Some(delivery) = queue.try_recv() else { break };
                            self.on_router_message(delivery, &mut sink).await;
                        }
                    }
                    None => draining_since = Some(Instant::now()),
                },
                received = workers.recv_message() => match received {
                    Ok(received) => {
                        self.on_worker_message(received, &workers, &mut sink).await;
                        for _ in 1..rylm_transport::BURST {
                            // Each counts against the task's budget, as a wait would: a long burst
                            // yields to the tasks it woke instead of starving them.
                            tokio::task::coop::consume_budget().await;
                            self.dispatch(&workers, &mut sink).await;
                            let Ok(Some(received)) = workers.try_recv_message() else { break };
                            self.on_worker_message(received, &workers, &mut sink).await;
                        }
                    }
                    Err(error) if error.is_closed() => break,
                    Err(error) => tracing::warn!(%error, "receiving from the workers failed"),
                },
                _ = ticker.tick() => {
                    self.bury_the_dead(&mut sink).await;
                    self.expire(&mut sink).await;
                }
                event = next_event(&mut events) => match event {
                    Some(Event::Ready { connection, identity: Some(identity) }) => {
                        connections.insert(connection, identity);
                    }
                    Some(Event::Disconnected { connection, reason, .. }) => {
                        if let Some(identity) = connections.remove(&connection)
                            && self.workers.contains_key(&identity)
                        {
                            tracing::warn!(%reason, "a worker's connection closed");
                            self.bury(identity, &mut sink).await;
                        }
                    }
                    _ => {}
                },
            }
            self.dispatch(&workers, &mut sink).await;
            self.publish_status();
        }
        // Flush the last results (the transport's linger), then close.
        match sink {
            ResultSink::Publish(socket) => socket.close().await,
            ResultSink::Answer(results) => (*results).close().await,
            ResultSink::Channel(_) => {}
        }
        workers.close().await;
        Ok(())
    }

    /// A message from the router: a caller's request (lined up) or a control message.
    async fn on_router_message(&mut self, delivery: Delivery, sink: &mut ResultSink) {
        let (message, forward, _) = delivery.into_forwarded();
        self.admit(message, forward, sink).await;
    }

    /// A worker's answer passed on as it came, or any other worker frame decoded and handled.
    async fn on_worker_message(
        &mut self,
        received: Received,
        workers: &Socket,
        sink: &mut ResultSink,
    ) {
        if received.is_empty() || self.pass_on(&received, sink).await {
            return;
        }
        let mut frames = received.into_frames();
        let identity = frames.remove(0);
        match self.codec.decode_frames(&frames) {
            Ok(message) => self.on_worker_frame(identity, message, workers, sink).await,
            Err(error) => {
                count(&self.status.counters.malformed);
                tracing::warn!(%error, "dropped a worker frame that does not decode");
            }
        }
    }

    fn publish_status(&self) {
        let status = &self.status;
        status.live.store(self.workers.len(), Ordering::Relaxed);
        status.waiting.store(self.waiting.len(), Ordering::Relaxed);
        status
            .in_flight
            .store(self.in_flight.len(), Ordering::Relaxed);
        let free = self.workers.values().map(|w| w.credits).sum();
        status.free_credits.store(free, Ordering::Relaxed);
    }

    /// Takes a message from the router: answers a client's handshake, refuses it when the line
    /// is full, else lines up its parts.
    async fn admit(&mut self, message: Message, forward: Option<Forward>, sink: &mut ResultSink) {
        if let Some(forward) = forward {
            // Passed on as it came: the callers' part took it for a plain call.
            let now = Instant::now();
            let deadline = forward
                .header(crate::DEADLINE)
                .and_then(|value| crate::functions::deadline_in(value, now))
                .unwrap_or(now + self.admission.default_deadline);
            let request = Request {
                message,
                forward: Some(forward),
            };
            self.line_up(request, deadline, sink).await;
            return;
        }
        match message.function_name() {
            Some(SYNC_FUNCTION) => {
                self.publish(sink, message.reply(Bytes::new())).await;
                return;
            }
            Some(WITHDRAW_FUNCTION) => {
                self.withdraw(&message.client);
                return;
            }
            _ => {}
        }
        let now = Instant::now();
        // A traced message passes on under a span of this master when spans are recorded here
        // (the pool's work on it is short: the span marks that it came through here, and is
        // the workers' parent); otherwise as it came.
        let mut message = message;
        if let Some(hop) = message
            .header(rylm_message::trace::TRACEPARENT)
            .and_then(rylm_message::trace::Hop::continue_if_recorded)
        {
            let _entered = hop.span("rylm.master.dispatch").entered();
            message
                .headers
                .insert(rylm_message::trace::TRACEPARENT.into(), hop.traceparent());
        }
        let parts = match &self.scatter {
            None => vec![message],
            Some(scatter) => match run_hook(scatter, "scatter", message) {
                Ok(parts) => parts,
                Err(kept) => {
                    let failed = failure(&kept, "panicked", "the master's scatter hook panicked");
                    self.publish(sink, failed).await;
                    return;
                }
            },
        };
        for part in parts {
            let deadline = deadline_of(&part, now).unwrap_or(now + self.admission.default_deadline);
            let request = Request {
                message: part,
                forward: None,
            };
            self.line_up(request, deadline, sink).await;
        }
    }

    /// Lines `request` up for a credit, or answers it `busy` when the line is full.
    async fn line_up(&mut self, request: Request, deadline: Instant, sink: &mut ResultSink) {
        if self.waiting.len() >= self.admission.max_waiting {
            count(&self.status.counters.busy);
            let text = format!(
                "{} messages are waiting for a worker; try again later",
                self.waiting.len()
            );
            self.publish(sink, failure(&request.full(), "busy", &text))
                .await;
            return;
        }
        self.waiting.push_back(Queued::Fresh(request, deadline));
    }

    /// Drops what waits for `client`, and forgets what workers hold for it (their answers are
    /// dropped when they come; their credits come back then).
    fn withdraw(&mut self, client: &str) {
        let before = self.waiting.len();
        self.waiting.retain(
            |queued| !matches!(queued, Queued::Fresh(request, _) if request.message.client == client),
        );
        let held: Vec<DispatchId> = self
            .in_flight
            .iter()
            .filter(|(_, d)| d.request.message.client == client)
            .map(|(id, _)| *id)
            .collect();
        let withdrawn = before - self.waiting.len() + held.len();
        // A native worker is asked to stop what it runs for nobody (one of pylm's would take
        // the request for a call).
        let native = NativeCodec::when_native(self.codec.as_ref()).is_some();
        for id in held {
            if let Some(dispatched) = self.in_flight.remove(&id)
                && native
            {
                self.cancels
                    .extend(dispatched.holders.iter().map(|worker| (worker.clone(), id)));
            }
        }
        self.status
            .counters
            .withdrawn
            .fetch_add(withdrawn as u64, Ordering::Relaxed);
    }

    async fn fail_everything(&mut self, sink: &mut ResultSink) {
        let mut left: Vec<Message> = Vec::new();
        for queued in self.waiting.drain(..) {
            if let Queued::Fresh(request, _) = queued {
                left.push(request.full());
            }
        }
        left.extend(self.in_flight.drain().map(|(_, d)| d.request.full()));
        for message in left {
            let reply = failure(
                &message,
                "shutdown",
                "the master shut down before a worker answered",
            );
            self.publish(sink, reply).await;
        }
    }

    async fn publish(&self, sink: &mut ResultSink, message: Message) {
        match sink {
            ResultSink::Answer(results) => results.deliver(message).await,
            ResultSink::Publish(socket) => {
                let topic = (self.handle_stream)(&message);
                // A result that does not encode reaches its caller as an error.
                match answer_frames(self.codec.as_ref(), &message, usize::MAX) {
                    Ok(mut frames) => {
                        frames.insert(0, Bytes::from(topic));
                        if let Err(error) = socket.send(frames).await {
                            tracing::warn!(%error, "could not publish a result");
                        }
                    }
                    Err(error) => tracing::error!(%error, "could not encode an error answer"),
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
        sink: &mut ResultSink,
    ) {
        let now = Instant::now();
        match message.function_name() {
            Some(READY_FUNCTION) => {
                self.on_ready(identity, &message, now);
                return;
            }
            Some(CANCEL_FUNCTION) => {
                // The worker stopped a withdrawn dispatch: its credit comes back now.
                if let Some(id) = message.header(DISPATCH).and_then(DispatchId::parse)
                    && self.heard_from(&identity, id, true, now)
                {
                    count(&self.status.counters.cancelled);
                }
                return;
            }
            Some(HEARTBEAT_FUNCTION) => {
                match self.workers.get_mut(&identity) {
                    Some(worker) => {
                        worker.last_seen = now;
                        let beat = Message::call(HEARTBEAT_FUNCTION, Bytes::new());
                        self.send_to(workers, identity, &beat).await;
                    }
                    // A worker this pool does not know (it restarted, or buried the worker
                    // while it was alive): ask it to announce itself again.
                    None => {
                        let ask = Message::call(READY_FUNCTION, Bytes::new());
                        self.send_to(workers, identity, &ask).await;
                    }
                }
                return;
            }
            _ => {}
        }
        let Some(dispatch) = message.headers.remove(DISPATCH) else {
            count(&self.status.counters.dropped_answers);
            tracing::debug!("dropped a worker answer without a dispatch id");
            return;
        };
        let dispatch = dispatch.as_str();
        let more = message.header(MORE).is_some();
        // A worker's short answer leaves out the request's session: the hooks get it back.
        if message.pipeline.is_empty()
            && let Some(dispatched) =
                DispatchId::parse(dispatch).and_then(|id| self.in_flight.get(&id))
        {
            message
                .pipeline
                .clone_from(&dispatched.request.message.pipeline);
        }
        // The caller the dispatch came from, whatever the answer says.
        let Some(caller) = self.settle(&identity, dispatch, more, now) else {
            return;
        };
        message.client = caller;
        let results = match &self.gather {
            None => vec![message],
            Some(gather) => match run_hook(gather, "gather", message) {
                Ok(results) => results,
                Err(kept) => vec![failure(
                    &kept,
                    "panicked",
                    "the master's gather hook panicked",
                )],
            },
        };
        for result in results {
            self.publish(sink, result).await;
        }
    }

    /// The bookkeeping of an answer to `dispatch` from the worker `identity` (a part of a mux
    /// function's results when `more`): the worker was heard from; its credit comes back only
    /// for what this pool gave it, once; the answer is taken only from a worker the dispatch
    /// was sent to, and the first answer ends the dispatch. Returns the caller the dispatch
    /// came from, or `None` when the answer is dropped.
    fn settle(
        &mut self,
        identity: &[u8],
        dispatch: &str,
        more: bool,
        now: Instant,
    ) -> Option<String> {
        let Some(id) = DispatchId::parse(dispatch) else {
            count(&self.status.counters.dropped_answers);
            tracing::debug!(%dispatch, "dropped an answer whose dispatch id does not read");
            return None;
        };
        self.heard_from(identity, id, !more, now);
        let client = match self.in_flight.get(&id) {
            Some(dispatched) if dispatched.holders.contains(identity) => {
                &dispatched.request.message.client
            }
            _ => {
                // A late duplicate (the first answer went out), an answer from a worker this
                // dispatch was not sent to, or one to a dispatch of an earlier pool.
                count(&self.status.counters.dropped_answers);
                tracing::debug!(%dispatch, "dropped an answer that is not awaited from this worker");
                return None;
            }
        };
        if more {
            // A part of a mux function's results: the dispatch goes on.
            return Some(client.clone());
        }
        let dispatched = self.in_flight.remove(&id)?;
        count(&self.status.counters.answered);
        Some(dispatched.request.message.client)
    }

    /// The worker `identity` was heard from at `now` about dispatch `id`; when it is `done` with
    /// it, the credit the dispatch held comes back, once, and only for what this pool gave it.
    /// Returns whether a credit came back.
    fn heard_from(&mut self, identity: &[u8], id: DispatchId, done: bool, now: Instant) -> bool {
        let Some(worker) = self.workers.get_mut(identity) else {
            return false;
        };
        worker.last_seen = now;
        let returned = done && worker.holds.remove(&id);
        if returned {
            worker.credits += 1;
        }
        returned
    }

    /// Passes a worker's answer on to its caller as it came, read in place instead of decoded
    /// and encoded again, when [`Pool::pass_answers`] allows it and the answer is a plain one;
    /// false when it takes the full path (a control message, a result that moves on down a
    /// pipeline, frames that do not read, another sink).
    async fn pass_on(&mut self, received: &Received, sink: &ResultSink) -> bool {
        let (Some(codec), ResultSink::Answer(results)) = (self.pass_answers, sink) else {
            return false;
        };
        let (3, Some(identity), Some(marker), Some(body)) = (
            received.len(),
            received.part(0),
            received.part(1),
            received.part(2),
        ) else {
            return false;
        };
        let Ok(view) = codec.view_parts(marker, body) else {
            return false;
        };
        let control = matches!(
            view.function_name(),
            None | Some(READY_FUNCTION | HEARTBEAT_FUNCTION | CANCEL_FUNCTION)
        );
        let [pipelined, dispatch, more] = view.headers_named([PIPELINED, DISPATCH, MORE]);
        if control || pipelined.is_some() {
            return false;
        }
        let Some(dispatch) = dispatch else {
            return false;
        };
        let more = more.is_some();
        // The caller the dispatch came from, whatever the answer says.
        if let Some(caller) = self.settle(identity, dispatch, more, Instant::now())
            && let Some(body) = received.bytes(2)
        {
            // The view checked the marker: the static one goes on rather than a copy.
            let marker = Bytes::from_static(&rylm_message::MARKER);
            results.pass_on(&caller, &[marker, body]).await;
        }
        true
    }

    fn on_ready(&mut self, identity: Bytes, message: &Message, now: Instant) {
        let announced = message
            .header(CREDITS)
            .and_then(|c| c.parse().ok())
            .unwrap_or(1usize);
        let credits = announced.clamp(1, self.admission.max_credits.max(1));
        if credits < announced {
            tracing::warn!(
                announced,
                credits,
                "a worker announced more credits than allowed; capped"
            );
        }
        let list = |name: &str| -> HashSet<String> {
            message
                .header(name)
                .unwrap_or_default()
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect()
        };
        // What the worker still runs holds a credit, whichever pool sent it.
        let holds: HashSet<DispatchId> = list(HOLDING)
            .iter()
            .filter_map(|id| DispatchId::parse(id))
            .take(credits)
            .collect();
        let fresh = !self.workers.contains_key(&identity);
        let worker = self.workers.entry(identity).or_insert_with(|| WorkerState {
            credits: 0,
            holds: HashSet::new(),
            once: HashSet::new(),
            last_seen: now,
        });
        worker.credits = credits.saturating_sub(holds.len());
        worker.holds = holds;
        worker.once = list(ONCE);
        worker.last_seen = now;
        if fresh {
            count(&self.status.counters.admitted);
            tracing::info!(credits, "a worker is ready");
        }
        self.status
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(list(FUNCTIONS));
    }

    async fn bury_the_dead(&mut self, sink: &mut ResultSink) {
        let dead_after = self.heartbeat.grace();
        let dead: Vec<Bytes> = self
            .workers
            .iter()
            .filter(|(_, w)| w.last_seen.elapsed() > dead_after)
            .map(|(id, _)| id.clone())
            .collect();
        for identity in dead {
            tracing::warn!("a worker stopped sending heartbeats");
            self.bury(identity, sink).await;
        }
    }

    /// Takes a worker for dead: each message it held goes to another worker once, or back to
    /// its caller (`worker-died`) when that is not allowed or there is no other worker to take
    /// it (with `fail_alone`).
    async fn bury(&mut self, identity: Bytes, sink: &mut ResultSink) {
        let Some(worker) = self.workers.remove(&identity) else {
            return;
        };
        count(&self.status.counters.buried);
        tracing::warn!(held = worker.holds.len(), "a worker is taken for dead");
        let alone = self.fail_alone && self.workers.is_empty();
        for held in worker.holds {
            let Some(dispatched) = self.in_flight.get(&held) else {
                continue;
            };
            let once = dispatched
                .request
                .full()
                .method()
                .map(|m| m.split(':').next().unwrap_or(m))
                .is_some_and(|m| worker.once.contains(m));
            let reason = if once {
                Some("the worker holding this message died; it must not run twice")
            } else if dispatched.holders.len() >= 2 {
                Some("two workers died holding this message; it was not run to the end")
            } else if alone {
                Some("the worker holding this message died, and no other worker is connected")
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    if let Some(dispatched) = self.in_flight.remove(&held) {
                        count(&self.status.counters.worker_died);
                        let reply = failure(&dispatched.request.full(), "worker-died", reason);
                        self.publish(sink, reply).await;
                    }
                }
                None => {
                    count(&self.status.counters.redispatched);
                    self.waiting.push_front(Queued::Again(held));
                }
            }
        }
    }

    /// Answers `deadline` for what waited or ran past its deadline, and gives the credits of
    /// overdue dispatches back.
    async fn expire(&mut self, sink: &mut ResultSink) {
        let now = Instant::now();
        let mut late = Vec::new();
        let in_flight = &self.in_flight;
        self.waiting.retain(|queued| match queued {
            Queued::Fresh(request, deadline) if *deadline <= now => {
                late.push(request.full());
                false
            }
            Queued::Again(id) => in_flight.contains_key(id),
            Queued::Fresh(..) => true,
        });
        // A worker gets the deadline too and answers by it; the grace covers its way back.
        let grace = self.heartbeat.grace();
        let overdue: Vec<DispatchId> = self
            .in_flight
            .iter()
            .filter(|(_, d)| d.deadline + grace <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            let Some(dispatched) = self.in_flight.remove(&id) else {
                continue;
            };
            for holder in dispatched.holders.iter() {
                if let Some(worker) = self.workers.get_mut(holder)
                    && worker.holds.remove(&id)
                {
                    worker.credits += 1;
                }
            }
            self.waiting
                .retain(|queued| !matches!(queued, Queued::Again(again) if *again == id));
            late.push(dispatched.request.full());
        }
        for message in late {
            count(&self.status.counters.expired);
            let reply = failure(&message, "deadline", "no answer before the deadline");
            self.publish(sink, reply).await;
        }
    }

    async fn send_to(&self, workers: &Socket, identity: Bytes, message: &Message) {
        match self.codec.encode_frames(message) {
            Ok(frames) => {
                let mut with_identity = Vec::with_capacity(frames.len() + 1);
                with_identity.push(identity);
                with_identity.extend(frames);
                if let Err(error) = workers.send(with_identity).await {
                    tracing::debug!(%error, "could not reach a worker");
                }
            }
            Err(error) => tracing::error!(%error, "could not encode a message for a worker"),
        }
    }

    /// A new dispatch id: unique in this pool, and not to be guessed from the others.
    fn next_dispatch(&mut self) -> DispatchId {
        self.dispatched += 1;
        DispatchId {
            number: self.dispatched,
            tag: self.keys.hash_one(self.dispatched),
        }
    }

    async fn dispatch(&mut self, to_workers: &Socket, sink: &mut ResultSink) {
        for (worker, id) in std::mem::take(&mut self.cancels) {
            // Only to a worker that still holds it (a buried one gave its holds up).
            if self
                .workers
                .get(&worker)
                .is_some_and(|w| w.holds.contains(&id))
            {
                let mut text = String::new();
                id.write(&mut text);
                let cancel = Message::call(CANCEL_FUNCTION, Bytes::new()).with_header(CANCEL, text);
                self.send_to(to_workers, worker, &cancel).await;
            }
        }
        while !self.waiting.is_empty() {
            let Some(identity) = self
                .workers
                .iter()
                .filter(|(_, w)| w.credits > 0)
                .max_by_key(|(_, w)| w.credits)
                .map(|(id, _)| id.clone())
            else {
                return;
            };
            let Some(queued) = self.waiting.pop_front() else {
                return;
            };
            let now = Instant::now();
            let id = match queued {
                Queued::Fresh(request, deadline) => {
                    let id = self.next_dispatch();
                    self.in_flight.insert(
                        id,
                        Dispatched {
                            request,
                            holders: Holders::default(),
                            deadline,
                        },
                    );
                    id
                }
                Queued::Again(id) => id,
            };
            let Some(dispatched) = self.in_flight.get_mut(&id) else {
                continue; // answered meanwhile by the worker it was first sent to
            };
            if dispatched.deadline <= now {
                continue; // `expire` answers it
            }
            let remaining = dispatched.deadline - now;
            let frames = match stamped(self.codec.as_ref(), &mut dispatched.request, id, remaining)
            {
                Ok(frames) => frames,
                Err(error) => {
                    let text = format!("could not be sent to a worker: {error}");
                    if let Some(dispatched) = self.in_flight.remove(&id) {
                        let reply = failure(&dispatched.request.full(), "unencodable", &text);
                        self.publish(sink, reply).await;
                    }
                    continue;
                }
            };
            dispatched.holders.push(identity.clone());
            if let Some(worker) = self.workers.get_mut(&identity) {
                worker.credits -= 1;
                worker.holds.insert(id);
            }
            count(&self.status.counters.dispatched);
            let mut with_identity = Vec::with_capacity(frames.len() + 1);
            with_identity.push(identity);
            with_identity.extend(frames);
            if let Err(error) = to_workers.send(with_identity).await {
                tracing::warn!(%error, "could not reach a worker; it will be taken for dead");
            }
        }
    }
}

/// The frames of `request` for a worker: stamped with dispatch `id` and the `remaining` time.
/// A request kept as it came goes on with its body's headers set; a decoded one is stamped in
/// place (no copy of the message: a re-dispatch stamps it again, and answers made from it drop
/// the stamp, see `failure`) and encoded.
fn stamped(
    codec: &dyn Codec,
    request: &mut Request,
    id: DispatchId,
    remaining: Duration,
) -> Result<Vec<Bytes>, rylm_message::Error> {
    use std::fmt::Write;
    let millis = remaining.as_millis().max(1);
    if let Some(forward) = &request.forward {
        let mut dispatch = String::with_capacity(36);
        id.write(&mut dispatch);
        let deadline = millis.to_string();
        let body = forward.with_headers(&[
            (DISPATCH, dispatch.as_str()),
            (crate::DEADLINE, deadline.as_str()),
        ])?;
        return Ok(vec![Bytes::from_static(&rylm_message::MARKER), body]);
    }
    let message = &mut request.message;
    set_header(message, DISPATCH, |value| id.write(value));
    set_header(message, crate::DEADLINE, |value| {
        let _ = write!(value, "{millis}");
    });
    codec.encode_frames(message)
}

/// The next connection event; never, once the events have ended (or with no events at all).
pub(crate) async fn next_event(events: &mut Option<rylm_transport::Events>) -> Option<Event> {
    let Some(stream) = events else {
        return std::future::pending().await;
    };
    let event = stream.next().await;
    if event.is_none() {
        *events = None;
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dispatch_id_reads_back_as_written_and_nothing_else_reads() {
        let mut pool = Pool::new(
            Arc::new(NativeCodec::default()),
            Heartbeat::default(),
            Arc::new(|_: &Message| String::new()),
        );
        let (first, second) = (pool.next_dispatch(), pool.next_dispatch());
        assert_ne!(
            first.tag, second.tag,
            "the tags are keyed hashes, not a count"
        );
        let mut text = String::new();
        second.write(&mut text);
        assert_eq!(text, format!("2.{:016x}", second.tag));
        assert_eq!(DispatchId::parse(&text), Some(second));
        for garbage in ["", "2", "2.", ".1", "x.1", "2.1.1", "ffffffffffffffffff.1"] {
            assert_eq!(DispatchId::parse(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn a_stamp_overwrites_a_header_in_place_or_adds_it() {
        let mut message = Message::call("f", Bytes::new()).with_header(crate::DEADLINE, "30000");
        set_header(&mut message, crate::DEADLINE, |v| v.push_str("29998"));
        set_header(&mut message, DISPATCH, |v| v.push_str("1.00"));
        assert_eq!(message.header(crate::DEADLINE), Some("29998"));
        assert_eq!(message.header(DISPATCH), Some("1.00"));
        assert_eq!(message.headers.len(), 2);
    }
}
