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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_core_router::{Delivery, OutboundQueue};
use rylm_message::{Codec, Message, NativeCodec};
use rylm_transport::{Event, Kind, Received, Socket};

use crate::Error;
use crate::parts::{Endpoint, Transport, error_reply};

mod answers;
pub(crate) mod batch;
mod lineup;
mod record;
mod status;

use record::{DispatchId, Dispatched, Queued, WorkerState};
pub use status::{PoolCounters, PoolStatus};

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
/// The header of a `READY` that says how many messages the worker takes in one transport
/// message (a batch: `[MARKER, body, body, ...]`); absent or 1, one at a time. A worker that
/// was sent a batch may answer in batches too. A caller's request that carries it (rylm's
/// Client sets it) is answered in a batch with the caller's other answers of the same burst.
pub const BATCH: &str = "rylm-batch";
/// The most messages one batch carries, either way.
pub const MAX_BATCH: usize = 64;
/// The most bytes of bodies one batch carries (a body larger than half of it goes alone), well
/// under any transport's message size limit.
pub const BATCH_BYTES: usize = 256 * 1024;
/// Withdraws the messages of one caller (its id as the message's `client`): those waiting are
/// dropped, and the answers of those a worker holds are discarded (a gateway sends it for a
/// request whose HTTP client went away).
pub const WITHDRAW_FUNCTION: &str = "rylm.withdraw";
/// The header that tells the pool which dispatch an answer belongs to.
pub(crate) const DISPATCH: &str = "rylm-dispatch";
/// Asks a worker to stop running a dispatch whose caller went away (header [`CANCEL`]); the
/// worker confirms with the same function and the dispatch in header `rylm-dispatch`, which
/// gives the credit back at once instead of when the function would have ended.
pub const CANCEL_FUNCTION: &str = "rylm.cancel";
/// The header of a [`CANCEL_FUNCTION`] from the pool: the dispatch to stop. (Not `rylm-dispatch`,
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
        let mut pool = Pool::new(codec, heartbeat, Arc::new(|m: &Message| m.client.clone()));
        pool.batching = takes_batches(transport.options(workers).max_message_size);
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
    /// Answers of this burst to callers that read batches, each with its caller.
    answers_out: Vec<(String, Bytes)>,
    dispatched: u64,
    keys: std::hash::RandomState,
    /// A dead worker's messages are failed back at once when no other worker is connected.
    pub(crate) fail_alone: bool,
    /// Whether batches may go to workers: only when the workers' socket takes messages of
    /// twice [`BATCH_BYTES`] (a worker sent a batch answers in batches of up to that).
    pub(crate) batching: bool,
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
            answers_out: Vec::new(),
            dispatched: 0,
            keys: std::hash::RandomState::new(),
            fail_alone: false,
            batching: true,
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
                // The rest of a burst is taken without waiting again, and dispatched once.
                delivery = queue.recv(), if draining_since.is_none() => match delivery {
                    Some(delivery) => {
                        self.on_router_message(delivery, &mut sink).await;
                        // The whole burst is lined up before any is dispatched, so that what
                        // goes to one worker goes in one batch.
                        for _ in 1..rylm_transport::BURST {
                            // Each counts against the task's budget, as a wait would: a long burst
                            // yields to the tasks it woke instead of starving them.
                            tokio::task::coop::consume_budget().await;
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
                            let Ok(Some(received)) = workers.try_recv_message() else { break };
                            self.on_worker_message(received, &workers, &mut sink).await;
                        }
                        self.flush_answers(&sink).await;
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
        if received.is_empty() {
            return;
        }
        // A batch, `[identity, MARKER, body, body, ...]`: each body is a message of its own.
        let batch = received.len() > 3 && received.part(1) == Some(&rylm_message::MARKER[..]);
        let bodies = if batch { 2..received.len() } else { 2..3 };
        for body in bodies {
            if self.pass_on(&received, body, sink).await {
                continue;
            }
            let (Some(identity), Some(frames)) =
                (received.bytes(0), frames_of(&received, body, batch))
            else {
                continue;
            };
            match self.codec.decode_frames(&frames) {
                Ok(message) => self.on_worker_frame(identity, message, workers, sink).await,
                Err(error) => {
                    count(&self.status.counters.malformed);
                    tracing::warn!(%error, "dropped a worker frame that does not decode");
                }
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
}

/// Whether a socket whose largest message is `max_message` bytes takes batches (of up to
/// [`BATCH_BYTES`] of bodies, with room to spare).
pub(crate) fn takes_batches(max_message: usize) -> bool {
    max_message >= 2 * BATCH_BYTES
}

/// The frames after the identity of the message at `body` of `received`: all of them as they
/// came, or `[MARKER, body]` for a body of a batch.
fn frames_of(received: &Received, body: usize, batch: bool) -> Option<Vec<Bytes>> {
    if !batch {
        return Some(
            (1..received.len())
                .filter_map(|i| received.bytes(i))
                .collect(),
        );
    }
    Some(vec![
        Bytes::from_static(&rylm_message::MARKER),
        received.bytes(body)?,
    ])
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
