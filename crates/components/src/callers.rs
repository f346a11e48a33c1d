//! The native layout's two parts: callers' connections and the stream between servers.
//!
//! **Callers** ([`Callers`], inbound). A client reaches a server through a DEALER to the
//! server's ROUTER, announcing its id as its routing identity. Each request is stamped with the
//! identity it came from (so a caller cannot ask for another's answers) and submitted; when the
//! server already holds as many messages as it admits, the caller is answered `busy` at once
//! instead.
//!
//! **Results** ([`Results`], outbound). Each result goes where `handle_stream` says: to the
//! caller whose id it names, back over that caller's own connection to this server's ROUTER, or,
//! when it names this server (the message goes on to another server's stage), down the stream:
//! a ROUTER that next stages connect a DEALER to, each with its server name as identity, so that
//! a message goes to the stage that owns its next function. A send waits for room, so a slow
//! next stage pushes back; a stage that is not connected, or takes nothing within the send
//! timeout, makes the result an error answer (`next-stage-unavailable`) to its caller. An answer that cannot be delivered (its caller is
//! gone, or reads nothing for long) is dropped, counted in [`ResultCounters`], and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rylm_core_router::{Error as RouterError, InboundLink, OutboundQueue};
use rylm_message::{Codec, Forward, Message, NativeCodec};
use rylm_transport::{Kind, Received, Socket};

use crate::parts::{Endpoint, Transport, answer_frames, error_reply};
use crate::pool::WITHDRAW_FUNCTION;
use crate::{Error, SYNC_FUNCTION};

/// What a caller refused at the door is told.
const BUSY: &str = "this server holds as many messages as it admits; try again later";

/// A caller's request that a master can pass on to its workers as it came: a plain call of one
/// function (no handshake, withdrawal or status), in its caller's name, with no span to record
/// here. `None` sends it the decoding way (which also reports what does not decode).
fn forwardable(native: &NativeCodec, marker: &[u8], body: &Bytes, caller: &str) -> Option<Forward> {
    let view = native.view_parts(marker, body).ok()?;
    let name = view.function_name()?;
    let control = matches!(name, SYNC_FUNCTION | WITHDRAW_FUNCTION | STATUS_FUNCTION);
    let traced = view
        .header(rylm_message::trace::TRACEPARENT)
        .is_some_and(|tp| rylm_message::trace::Hop::continue_if_recorded(tp).is_some());
    if control || traced || !view.is_single_function() || view.client() != caller {
        return None;
    }
    view.forward(body)
}

/// How long an answer waits for room in its caller's queue before it is dropped: a caller that
/// reads nothing must not hold up the answers of the others.
const ANSWER_WAIT: Duration = Duration::from_millis(100);

/// The header of a handshake that travels down a pipeline to the server it names (set by a
/// client that takes its results from there).
pub const SYNC_THROUGH: &str = "rylm-sync-through";

/// What became of a server's results.
#[derive(Debug, Default)]
pub struct ResultCounters {
    /// Answers sent to their callers.
    pub answered: AtomicU64,
    /// Results sent down the stream to the next stage.
    pub streamed: AtomicU64,
    /// Requests answered `busy`.
    pub busy: AtomicU64,
    /// Answers dropped: the caller is gone or its queue stayed full.
    pub undeliverable: AtomicU64,
    /// Results the next stage did not take within the send timeout.
    pub stream_refused: AtomicU64,
    /// Requests that did not decode.
    pub malformed: AtomicU64,
}

impl ResultCounters {
    /// Every counter as (name, what it counts, value now): what `rylm.status` and the admin
    /// metrics both show, from one list.
    pub fn fields(&self) -> [(&'static str, &'static str, u64); 6] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "answered",
                "answers sent to their callers",
                load(&self.answered),
            ),
            (
                "streamed",
                "results sent down the stream to the next stage",
                load(&self.streamed),
            ),
            ("busy", "requests answered busy", load(&self.busy)),
            (
                "undeliverable",
                "answers dropped: the caller is gone or stays full",
                load(&self.undeliverable),
            ),
            (
                "stream_refused",
                "results the next stage did not take in time",
                load(&self.stream_refused),
            ),
            (
                "malformed",
                "requests that did not decode",
                load(&self.malformed),
            ),
        ]
    }
}

/// A JSON object of (name, value) from a counters' `fields()`.
pub(crate) fn fields_json(fields: &[(&str, &str, u64)]) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .iter()
            .map(|(name, _, value)| ((*name).to_owned(), serde_json::Value::from(*value)))
            .collect(),
    )
}

/// `transport` with ROUTER sends to unknown peers failing (and so counted) rather than dropped.
fn mandatory(transport: &Transport) -> Transport {
    let mut transport = transport.clone();
    transport.bound.router_mandatory = true;
    transport.connected.router_mandatory = true;
    transport
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The ROUTER callers connect to, shared by [`Callers`] (which reads it) and [`Results`]
/// (which answers through it).
#[derive(Clone)]
pub struct CallerSocket {
    socket: Socket,
    address: String,
    codec: Arc<dyn Codec>,
    /// The codec when it is the native one, whose requests are read in place.
    native: Option<NativeCodec>,
    counters: Arc<ResultCounters>,
    /// The largest message a caller takes (the transport's limit).
    max_message: usize,
}

impl std::fmt::Debug for CallerSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerSocket")
            .field("address", &self.address)
            .finish()
    }
}

impl CallerSocket {
    /// Binds (or connects) the ROUTER.
    pub async fn open(
        endpoint: &Endpoint,
        transport: &Transport,
        codec: Arc<dyn Codec>,
    ) -> Result<CallerSocket, Error> {
        let (socket, address) = mandatory(transport).open(Kind::Router, endpoint).await?;
        Ok(CallerSocket {
            socket,
            address,
            native: NativeCodec::when_native(codec.as_ref()),
            codec,
            counters: Arc::default(),
            max_message: transport.options(endpoint).max_message_size,
        })
    }

    /// The address callers connect to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// What became of the results.
    pub fn counters(&self) -> Arc<ResultCounters> {
        self.counters.clone()
    }

    /// Sends `message` to the caller whose routing identity is `caller`; false if it could not
    /// be delivered (counted and logged).
    async fn answer(&self, caller: &str, message: &Message) -> bool {
        // The caller learns why, rather than losing its connection to an oversized frame.
        let Ok(frames) = answer_frames(self.codec.as_ref(), message, self.max_message) else {
            return false;
        };
        self.pass_on(caller, &frames, 1).await
    }

    /// Sends an answer's frames as they are (a worker's, passed on unchanged, or one encoded
    /// here) to the caller whose routing identity is `caller`; false if it could not be
    /// delivered (counted and logged, as `answers` answers: a batch carries several).
    async fn pass_on(&self, caller: &str, frames: &[Bytes], answers: u64) -> bool {
        let mut routed = Vec::with_capacity(frames.len() + 1);
        routed.push(Bytes::copy_from_slice(caller.as_bytes()));
        routed.extend_from_slice(frames);
        match self.socket.send_within(routed, ANSWER_WAIT).await {
            Ok(()) => {
                self.counters.answered.fetch_add(answers, Ordering::Relaxed);
                true
            }
            Err(error) => {
                self.counters
                    .undeliverable
                    .fetch_add(answers, Ordering::Relaxed);
                tracing::debug!(address = %self.address, %caller, %error, "dropped an answer: its caller is gone or not reading");
                false
            }
        }
    }
}

/// The function a caller calls for a server's account of itself (`rylm status`): its answer is
/// a JSON object (name, kind, version, uptime, functions, workers, in flight, counters), made
/// by the server itself, never by a function or a worker.
pub const STATUS_FUNCTION: &str = "rylm.status";

/// What a server says of itself when asked [`STATUS_FUNCTION`].
pub type StatusReport = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The parts of a status report every server gives: its name and kind, rylm's version, how
/// long it has run, what it serves, and what became of its results.
pub fn status_base(
    name: &str,
    kind: &str,
    started: std::time::Instant,
    functions: Vec<String>,
    counters: &ResultCounters,
) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "kind": kind,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": started.elapsed().as_secs(),
        "functions": functions,
        "results": fields_json(&counters.fields()),
    })
}

/// The inbound part: takes requests from callers' connections.
pub struct Callers {
    socket: CallerSocket,
    status: Option<StatusReport>,
    /// Plain calls go on as they came (a master's callers, see [`Callers::forwarding`]).
    forwarding: bool,
}

impl std::fmt::Debug for Callers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callers")
            .field("socket", &self.socket.address)
            .finish_non_exhaustive()
    }
}

impl Callers {
    /// Reads requests from `socket`.
    pub fn new(socket: CallerSocket) -> Callers {
        Callers {
            socket,
            status: None,
            forwarding: false,
        }
    }

    /// Passes plain calls on as they came (see [`InboundLink::try_submit_forward`]): for a
    /// master whose pool sends them to its workers without hooks.
    pub(crate) fn forwarding(mut self, forwarding: bool) -> Callers {
        self.forwarding = forwarding;
        self
    }

    /// Submits a plain call as it came, with a message that holds only its caller; one refused
    /// is answered `busy`.
    async fn forward(
        &self,
        link: &InboundLink,
        caller: &str,
        forward: Forward,
    ) -> Result<(), RouterError> {
        let message = Message {
            client: caller.to_owned(),
            ..Message::default()
        };
        if let Some((_, Some(forward))) = link.try_submit_forward(message, Some(forward)).await?
            && let Ok(mut refused) = forward.decode()
        {
            refused.client = caller.to_owned();
            count(&self.socket.counters.busy);
            let reply = error_reply(&refused, "busy", BUSY);
            self.socket.answer(caller, &reply).await;
        }
        Ok(())
    }

    /// Answers [`STATUS_FUNCTION`] with `report`.
    pub fn with_status(mut self, report: StatusReport) -> Callers {
        self.status = Some(report);
        self
    }

    /// The router component (register it non-blocking).
    pub async fn run(self, mut link: InboundLink) -> Result<(), RouterError> {
        let socket = &self.socket;
        loop {
            let received = tokio::select! {
                _ = link.stopping() => return Ok(()),
                received = socket.socket.recv_message() => received,
            };
            match received {
                Ok(received) => self.take(&link, received).await?,
                Err(error) if error.is_closed() => return Ok(()),
                Err(error) => {
                    tracing::warn!(address = %socket.address, %error, "receiving from callers failed");
                    continue;
                }
            }
            // The rest of a burst without waiting again.
            for _ in 1..rylm_transport::BURST {
                // Each counts against the task's budget, as a wait would: a long burst
                // yields to the tasks it woke instead of starving them.
                tokio::task::coop::consume_budget().await;
                match socket.socket.try_recv_message() {
                    Ok(Some(received)) => self.take(&link, received).await?,
                    _ => break,
                }
            }
        }
    }

    /// One request from a caller: passed on as it came, or decoded and submitted; a refusal
    /// answered `busy`.
    async fn take(&self, link: &InboundLink, received: Received) -> Result<(), RouterError> {
        let socket = &self.socket;
        // Answers go back by this identity: a client announces its id as its identity.
        let caller = received.part(0).map(std::str::from_utf8);
        let (Some(Ok(caller)), true) = (caller, received.len() >= 2) else {
            count(&socket.counters.malformed);
            return Ok(());
        };
        let decoded = match (&socket.native, received.len()) {
            // Read in place: no vector of frames, no copy of the marker.
            (Some(native), 3) => match (received.part(1), received.bytes(2)) {
                (Some(marker), Some(body)) => {
                    let forward = self
                        .forwarding
                        .then(|| forwardable(native, marker, &body, caller));
                    if let Some(Some(forward)) = forward {
                        self.forward(link, caller, forward).await?;
                        return Ok(());
                    }
                    native.decode_parts(marker, body)
                }
                _ => {
                    count(&socket.counters.malformed);
                    return Ok(());
                }
            },
            _ => {
                let frames: Vec<Bytes> = (1..received.len())
                    .filter_map(|i| received.bytes(i))
                    .collect();
                socket.codec.decode_frames(&frames)
            }
        };
        let mut message = match decoded {
            Ok(message) => message,
            Err(error) => {
                count(&socket.counters.malformed);
                // A warning (throttled per place by the programs' log, counted in the
                // metrics): a peer sending garbage is worth an operator's eye.
                tracing::warn!(address = %socket.address, %error, "dropped a request that does not decode");
                return Ok(());
            }
        };
        // In the string the message came with: a client's id is its identity, so this
        // reuses the allocation.
        message.client.clear();
        message.client.push_str(caller);
        if let Some(report) = &self.status
            && message.function_name() == Some(STATUS_FUNCTION)
        {
            let reply = message.reply(Bytes::from(report().to_string()));
            socket.answer(&message.client, &reply).await;
            return Ok(());
        }
        if let Some(refused) = link.try_submit(message).await? {
            count(&socket.counters.busy);
            let reply = error_reply(&refused, "busy", BUSY);
            socket.answer(&refused.client, &reply).await;
        }
        Ok(())
    }
}

/// Where a result goes: to a caller by id, or down the stream (the server's own name).
pub type Destination = Arc<dyn Fn(&Message) -> String + Send + Sync>;

/// The next stages connected to a stream, by connection: each announces its server name as its
/// routing identity.
type Stages = Arc<std::sync::Mutex<std::collections::HashMap<u64, Bytes>>>;

/// The outbound part: sends each result to its caller or down the stream.
pub struct Results {
    callers: CallerSocket,
    stream: Socket,
    stream_address: String,
    server: String,
    destination: Destination,
    stages: Stages,
    watcher: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Results {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Results")
            .field("server", &self.server)
            .finish()
    }
}

impl Results {
    /// Answers through `callers`; results for a next stage go down the stream, a ROUTER bound
    /// (or connected) at `stream` that next stages connect to with their name as identity.
    pub async fn new(
        callers: CallerSocket,
        stream: &Endpoint,
        transport: &Transport,
        server: &str,
        destination: Destination,
    ) -> Result<Results, Error> {
        let (socket, stream_address) = mandatory(transport).open(Kind::Router, stream).await?;
        let mut events = socket.events();
        let stages: Stages = Arc::default();
        let watcher = {
            let stages = stages.clone();
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    let mut stages = stages.lock().unwrap_or_else(|e| e.into_inner());
                    match event {
                        rylm_transport::Event::Ready {
                            connection,
                            identity: Some(identity),
                        } => {
                            stages.insert(connection, identity);
                        }
                        rylm_transport::Event::Disconnected { connection, .. } => {
                            stages.remove(&connection);
                        }
                        _ => {}
                    }
                }
            })
        };
        Ok(Results {
            callers,
            stream: socket,
            stream_address,
            server: server.to_owned(),
            destination,
            stages,
            watcher,
        })
    }

    /// Sends a worker's answer, or a batch of `answers` of them, to `caller` as they came (see
    /// [`crate::pool`]).
    pub(crate) async fn pass_on(&self, caller: &str, frames: &[Bytes], answers: u64) {
        self.callers.pass_on(caller, frames, answers).await;
    }

    /// The address the next stage connects to.
    pub fn stream_address(&self) -> &str {
        &self.stream_address
    }

    /// The router component (register it non-blocking).
    pub async fn run(self, mut queue: OutboundQueue) -> Result<(), RouterError> {
        while let Some(delivery) = queue.recv().await {
            let (message, responder) = delivery.into_parts();
            self.deliver(message).await;
            responder.send(Ok(None));
        }
        self.close().await;
        Ok(())
    }

    /// Closes the stream, flushing what it holds (the transport's linger).
    pub async fn close(self) {
        self.watcher.abort();
        self.stream.close().await;
    }

    /// The next stages connected now, by name.
    fn stages(&self) -> Vec<Bytes> {
        let stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<Bytes> = stages.values().cloned().collect();
        names.sort();
        names.dedup();
        names
    }

    /// Sends `message` to its caller or down the stream: to the stage that owns its next
    /// function (the server part of `server.method`).
    pub async fn deliver(&self, message: Message) {
        let destination = (self.destination)(&message);
        let through = message.function_name() == Some(SYNC_FUNCTION);
        let target = message.header(SYNC_THROUGH).filter(|_| through);
        // A handshake that travels through a pipeline goes on until the server it names (or
        // the end of the pipeline): to that server when it is a next stage, else to every next
        // stage.
        let next: Vec<Bytes> = match target {
            Some(target) if target == self.server => Vec::new(),
            Some(target) => {
                let stages = self.stages();
                match stages.iter().find(|s| s.as_ref() == target.as_bytes()) {
                    Some(stage) => vec![stage.clone()],
                    None => stages,
                }
            }
            None if destination == self.server => {
                let owner = message
                    .function_name()
                    .and_then(|f| f.split_once('.'))
                    .map_or("", |(owner, _)| owner);
                vec![Bytes::copy_from_slice(owner.as_bytes())]
            }
            None => Vec::new(),
        };
        if next.is_empty() {
            // At its caller the answer's journey ends, and the caller holds its trace context:
            // the header would only be carried and decoded for nothing.
            let mut message = message;
            message.headers.remove(rylm_message::trace::TRACEPARENT);
            let caller = if through {
                &message.client
            } else {
                &destination
            };
            self.callers.answer(caller, &message).await;
            return;
        }
        let mut sent = Ok(());
        for stage in next {
            let frames = match self.callers.codec.encode_frames(&message) {
                Ok(frames) => frames,
                Err(error) => {
                    sent = Err(error.to_string());
                    break;
                }
            };
            let mut routed = Vec::with_capacity(frames.len() + 1);
            routed.push(stage.clone());
            routed.extend(frames);
            if let Err(error) = self.stream.send(routed).await {
                let name = String::from_utf8_lossy(&stage);
                sent = Err(format!("stage {name:?}: {error}"));
            }
        }
        match sent {
            Ok(()) => count(&self.callers.counters.streamed),
            Err(error) => {
                count(&self.callers.counters.stream_refused);
                tracing::warn!(server = %self.server, %error, "the next stage did not take a result; its caller gets an error");
                let text = format!("the next stage did not take it: {error}");
                let reply = error_reply(&message, "next-stage-unavailable", &text);
                self.callers.answer(&message.client, &reply).await;
            }
        }
    }
}
