//! User functions by name, and the blocking router component that runs them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use rylm_core_router::{Error as RouterError, OutboundQueue};
use rylm_message::Message;
use tracing::Instrument;

use crate::parts::error_reply;

/// The function a client calls to learn that its subscription is live (see [`crate::Client`]).
pub const SYNC_FUNCTION: &str = "rylm.sync";
/// The header of a result that goes on to another server's stage: it is published under this
/// server's name (for the next stage's server) rather than to the client.
pub const PIPELINED: &str = "rylm-pipelined";

type FunctionFuture = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>>;
pub(crate) type Function = Arc<dyn Fn(Bytes) -> FunctionFuture + Send + Sync>;
type MuxFuture = Pin<Box<dyn Future<Output = Result<Vec<Bytes>, String>> + Send>>;
type MuxFunction = Arc<dyn Fn(Bytes) -> MuxFuture + Send + Sync>;
type ParamFunction = Arc<dyn Fn(String, Bytes) -> FunctionFuture + Send + Sync>;
type MessageFunction = Arc<dyn Fn(Message) -> FunctionFuture + Send + Sync>;

/// The header on every part of a mux function's results but the last.
pub const MORE: &str = "rylm-more";
/// The header of the one answer of a mux function that yielded nothing.
pub const NONE: &str = "rylm-none";
/// The header with the milliseconds a message has left before its caller stops waiting, as
/// the sender counted them when it sent the message. Each hop turns it into a deadline on its
/// own clock (so clocks need not agree), and passes on what is left.
pub const DEADLINE: &str = "rylm-deadline-ms";

/// The longest deadline a message may carry (a day); longer ones are cut to it.
const LONGEST_DEADLINE_MS: u64 = 86_400_000;

/// The deadline `message` carries ([`DEADLINE`]), counted from `now`.
pub fn deadline_of(message: &Message, now: std::time::Instant) -> Option<std::time::Instant> {
    deadline_in(message.header(DEADLINE)?, now)
}

/// The deadline a [`DEADLINE`] header's `value` sets, counted from `now`.
pub(crate) fn deadline_in(value: &str, now: std::time::Instant) -> Option<std::time::Instant> {
    let millis: u64 = value.parse().ok()?;
    Some(now + std::time::Duration::from_millis(millis.min(LONGEST_DEADLINE_MS)))
}

/// Functions by name: each takes a payload and returns one, or an error.
///
/// ```
/// use bytes::Bytes;
/// use rylm_components::Functions;
/// let functions = Functions::new()
///     .add("upper", |payload: Bytes| async move { Ok::<_, String>(Bytes::from(payload.to_ascii_uppercase())) })
///     .add_blocking("len", |payload: Bytes| Ok::<_, String>(Bytes::from(payload.len().to_string())));
/// assert!(functions.names().any(|n| n == "len"));
/// ```
#[derive(Clone, Default)]
pub struct Functions {
    map: HashMap<String, Function>,
    mux: HashMap<String, MuxFunction>,
    parameterized: HashMap<String, ParamFunction>,
    with_message: HashMap<String, MessageFunction>,
    failure_payload: Option<Bytes>,
    once: std::collections::BTreeSet<String>,
    stats: Arc<crate::stats::FunctionStats>,
}

impl std::fmt::Debug for Functions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.map.keys()).finish()
    }
}

impl Functions {
    /// No functions.
    pub fn new() -> Self {
        Functions::default()
    }

    /// Registers an async function.
    pub fn add<F, Fut, E>(mut self, name: &str, function: F) -> Self
    where
        F: Fn(Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let function = Arc::new(function);
        self.map.insert(
            name.to_owned(),
            Arc::new(move |payload| {
                let function = function.clone();
                Box::pin(async move { function(payload).await.map_err(|e| e.to_string()) })
            }),
        );
        self
    }

    /// Registers a blocking function; it runs on tokio's blocking thread pool.
    pub fn add_blocking<F, E>(mut self, name: &str, function: F) -> Self
    where
        F: Fn(Bytes) -> Result<Bytes, E> + Send + Sync + 'static,
        E: std::fmt::Display,
    {
        let function = Arc::new(function);
        self.map.insert(
            name.to_owned(),
            Arc::new(move |payload| {
                let function = function.clone();
                Box::pin(async move {
                    match tokio::task::spawn_blocking(move || {
                        function(payload).map_err(|e| e.to_string())
                    })
                    .await
                    {
                        Ok(outcome) => outcome,
                        // Carried on to the caller, which turns it into a `panicked` reply.
                        Err(join_error) => match join_error.try_into_panic() {
                            Ok(panic) => std::panic::resume_unwind(panic),
                            Err(_) => Err("cancelled".to_owned()),
                        },
                    }
                })
            }),
        );
        self
    }

    /// Answers every failure with this payload as well as the error headers: pylm peers, which
    /// have no headers, take `b"0"` as a failed function.
    pub fn failure_payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.failure_payload = Some(payload.into());
        self
    }

    pub(crate) fn failed(&self, reply: Message) -> Message {
        match &self.failure_payload {
            Some(payload) => reply.with_payload(payload.clone()),
            None => reply,
        }
    }

    /// Declares that function `name` must not run twice for one message. A master re-dispatches
    /// the messages of a worker that died (at-least-once execution); a message of this function
    /// is failed back (`worker-died`) instead, as it may or may not have run.
    pub fn must_not_run_twice(mut self, name: &str) -> Self {
        self.once.insert(name.to_owned());
        self
    }

    /// The functions declared with [`Functions::must_not_run_twice`].
    pub fn once_names(&self) -> impl Iterator<Item = &str> {
        self.once.iter().map(String::as_str)
    }

    /// What each function did: calls, failures, panics and latencies, by registered name.
    pub fn stats(&self) -> Vec<(String, Arc<crate::stats::FunctionStat>)> {
        self.stats.all(|| self.names().map(str::to_owned).collect())
    }

    fn stat(&self, method: &str) -> &crate::stats::FunctionStat {
        self.stats
            .of(method, || self.names().map(str::to_owned).collect())
    }

    /// Counts a call of `message` stopped at its deadline after `took`.
    pub(crate) fn count_timeout(&self, message: &Message, took: std::time::Duration) {
        self.count_timeout_of(message.method().unwrap_or_default(), took);
    }

    /// Counts a call of `method` stopped at its deadline after `took`.
    pub(crate) fn count_timeout_of(&self, method: &str, took: std::time::Duration) {
        self.stat(method).record(
            took,
            crate::stats::Outcome::Error(crate::stats::ErrorKind::TimedOut),
        );
    }

    /// The registered names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map
            .keys()
            .chain(self.mux.keys())
            .chain(self.parameterized.keys())
            .chain(self.with_message.keys())
            .map(String::as_str)
    }

    /// Registers a function called as `name:<argument>` (for example `sleep:100`), which gets
    /// the argument's text with the payload.
    pub fn add_parameterized<F, Fut, E>(mut self, name: &str, function: F) -> Self
    where
        F: Fn(String, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let function = Arc::new(function);
        self.parameterized.insert(
            name.to_owned(),
            Arc::new(move |argument, payload| {
                let function = function.clone();
                Box::pin(
                    async move { function(argument, payload).await.map_err(|e| e.to_string()) },
                )
            }),
        );
        self
    }

    /// Registers a function that sees the whole message (its headers: an HTTP request's
    /// headers and query parameters, for instance) and returns the result's payload.
    pub fn add_message<F, Fut, E>(mut self, name: &str, function: F) -> Self
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let function = Arc::new(function);
        self.with_message.insert(
            name.to_owned(),
            Arc::new(move |message| {
                let function = function.clone();
                Box::pin(async move { function(message).await.map_err(|e| e.to_string()) })
            }),
        );
        self
    }

    /// The function for `method`: a plain one, one that sees `message`, or a parameterized one
    /// bound to its argument.
    fn resolve(&self, method: &str, message: &Message) -> Option<Function> {
        if let Some(function) = self.map.get(method) {
            return Some(function.clone());
        }
        if let Some(function) = self.with_message.get(method) {
            let (function, message) = (function.clone(), message.clone());
            return Some(Arc::new(move |_payload| function(message.clone())));
        }
        let (name, argument) = method.split_once(':')?;
        let function = self.parameterized.get(name)?.clone();
        let argument = argument.to_owned();
        Some(Arc::new(move |payload| function(argument.clone(), payload)))
    }

    /// Registers a mux function, which yields any number of results per message (pylm's
    /// MuxWorker). It runs on workers behind a master; a client gets every part with
    /// [`crate::Client::eval_all`].
    pub fn add_mux<F, Fut, E>(mut self, name: &str, function: F) -> Self
    where
        F: Fn(Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Bytes>, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let function = Arc::new(function);
        self.mux.insert(
            name.to_owned(),
            Arc::new(move |payload| {
                let function = function.clone();
                Box::pin(async move { function(payload).await.map_err(|e| e.to_string()) })
            }),
        );
        self
    }

    /// Like [`Functions::call`], and for a mux function every part of its results: each but the
    /// last carries the header [`MORE`]; none at all gives one empty answer marked [`NONE`].
    pub async fn call_many(&self, server: &str, mut message: Message) -> Vec<Message> {
        match traced(&mut message) {
            Some(span) => self.call_many_here(server, message).instrument(span).await,
            None => self.call_many_here(server, message).await,
        }
    }

    async fn call_many_here(&self, server: &str, mut message: Message) -> Vec<Message> {
        message.headers.remove(PIPELINED);
        let method = message.method().unwrap_or_default().to_owned();
        let Some(function) = self.mux.get(&method).cloned() else {
            return vec![self.call_here(server, message).await];
        };
        let started = std::time::Instant::now();
        let outcome = match caught(function(message.payload.clone())).await {
            Ok(outcome) => outcome.map_err(|text| ("failed", text)),
            Err(panic) => Err(("panicked", panic)),
        };
        self.stat(&method)
            .record(started.elapsed(), outcome_of(&outcome));
        match outcome {
            Err((kind, text)) => vec![self.failed(error_reply(&message, kind, &text))],
            Ok(parts) if parts.is_empty() => {
                vec![message.reply(Bytes::new()).with_header(NONE, "true")]
            }
            Ok(parts) => {
                let last = parts.len() - 1;
                parts
                    .into_iter()
                    .enumerate()
                    .map(|(i, part)| {
                        let reply = message.reply(part);
                        if i < last {
                            reply.with_header(MORE, "true")
                        } else {
                            reply
                        }
                    })
                    .collect()
            }
        }
    }

    /// The function a call of `method` runs when it is a plain one (one result, made from the
    /// payload alone): what a worker runs straight from a request's bytes.
    pub(crate) fn plain(&self, method: &str) -> Option<Function> {
        if self.mux.contains_key(method) {
            return None;
        }
        self.map.get(method).cloned()
    }

    /// Runs plain `function` of `method` on `payload`, counted in the function's stats, a
    /// panic caught: its result, or the kind and text of its failure.
    pub(crate) async fn run_plain(
        &self,
        method: &str,
        function: &Function,
        payload: Bytes,
    ) -> Result<Bytes, (&'static str, String)> {
        let started = std::time::Instant::now();
        let outcome = match caught(function(payload)).await {
            Ok(outcome) => outcome.map_err(|text| ("failed", text)),
            Err(panic) => Err(("panicked", panic)),
        };
        self.stat(method)
            .record(started.elapsed(), outcome_of(&outcome));
        outcome
    }

    /// Runs the function of `message`'s current stage (and the following stages that belong to
    /// `server`), and returns the reply: the message with the result as its payload, or an error
    /// reply (`unknown-function`, `failed`, `panicked`).
    pub async fn call(&self, server: &str, mut message: Message) -> Message {
        match traced(&mut message) {
            Some(span) => self.call_here(server, message).instrument(span).await,
            None => self.call_here(server, message).await,
        }
    }

    async fn call_here(&self, server: &str, mut message: Message) -> Message {
        message.headers.remove(PIPELINED);
        loop {
            if message.function_name() == Some(SYNC_FUNCTION) {
                return message.reply(Bytes::new());
            }
            let method = message.method().unwrap_or_default().to_owned();
            if self.mux.contains_key(&method) && !self.map.contains_key(&method) {
                let text =
                    format!("{method:?} yields many results: it runs on a worker behind a master");
                return self.failed(error_reply(&message, "unsupported", &text));
            }
            let Some(function) = self.resolve(&method, &message) else {
                let mut known: Vec<&str> = self.names().collect();
                known.sort_unstable();
                let text = format!(
                    "no function {method:?} here (this server has {})",
                    known.join(", ")
                );
                self.stat(crate::stats::UNKNOWN).record(
                    std::time::Duration::ZERO,
                    crate::stats::Outcome::Error(crate::stats::ErrorKind::Unknown),
                );
                return self.failed(error_reply(&message, "unknown-function", &text));
            };
            // A panic becomes an error reply, not a dead server.
            let payload = message.payload.clone();
            let started = std::time::Instant::now();
            let outcome = match caught(function(payload)).await {
                Ok(outcome) => outcome.map_err(|text| ("failed", text)),
                Err(panic) => Err(("panicked", panic)),
            };
            self.stat(&method)
                .record(started.elapsed(), outcome_of(&outcome));
            match outcome {
                Ok(result) => message.payload = result,
                Err((kind, text)) => return self.failed(error_reply(&message, kind, &text)),
            }
            // Go on through the stages that are this server's; a stage of another server is for
            // the next server down the pipeline, which takes what this one publishes under its
            // name.
            if !matches!(message.function, rylm_message::Function::Stages(_)) {
                return message;
            }
            let next_owner = message
                .function
                .at(message.stage.saturating_add(1))
                .map(|name| {
                    name.split_once('.')
                        .map_or("", |(owner, _)| owner)
                        .to_owned()
                });
            match next_owner {
                Some(owner) if owner.is_empty() || owner == server => {
                    message.next_stage();
                }
                Some(_) => {
                    message.next_stage();
                    message.headers.insert(PIPELINED.into(), "true".into());
                    return message;
                }
                None => return message,
            }
        }
    }

    /// The blocking router component that runs each message's function, many at once.
    pub async fn run(self, server: String, mut queue: OutboundQueue) -> Result<(), RouterError> {
        let functions = Arc::new(self);
        let server: Arc<str> = server.into();
        while let Some(delivery) = queue.recv().await {
            let (functions, server) = (functions.clone(), server.clone());
            tokio::spawn(async move {
                let (message, responder) = delivery.into_parts();
                let now = std::time::Instant::now();
                let reply = match deadline_of(&message, now) {
                    // Its caller stopped waiting: not started.
                    Some(deadline) if deadline <= now => error_reply(
                        &message,
                        "deadline",
                        "the deadline passed before the function started",
                    ),
                    Some(deadline) => {
                        let call = functions.call(&server, message.clone());
                        match tokio::time::timeout_at(deadline.into(), call).await {
                            Ok(reply) => reply,
                            Err(_) => {
                                functions.count_timeout(&message, now.elapsed());
                                error_reply(
                                    &message,
                                    "deadline",
                                    "the deadline passed before the function finished",
                                )
                            }
                        }
                    }
                    None => functions.call(&server, message).await,
                };
                // A message that goes on to another server takes what is left of its time.
                let reply = pass_on_deadline(reply, now);
                responder.send(Ok(Some(reply)));
            });
        }
        Ok(())
    }
}

/// For a message that carries a `traceparent`, when spans are recorded here: the span of its
/// run here (named after its function), whose id the message (and so its answer and its next
/// stages) carries on.
fn traced(message: &mut Message) -> Option<tracing::Span> {
    use rylm_message::trace::{Hop, TRACEPARENT};
    let hop = Hop::continue_if_recorded(message.header(TRACEPARENT)?)?;
    message
        .headers
        .insert(TRACEPARENT.into(), hop.traceparent());
    Some(hop.span(message.method().unwrap_or_default()))
}

/// How a call ended, for its counters.
fn outcome_of<T>(outcome: &Result<T, (&str, String)>) -> crate::stats::Outcome {
    use crate::stats::{ErrorKind, Outcome};
    match outcome {
        Ok(_) => Outcome::Ok,
        Err(("panicked", _)) => Outcome::Error(ErrorKind::Panicked),
        Err(_) => Outcome::Error(ErrorKind::Failed),
    }
}

/// Sets [`DEADLINE`] of a message about to leave to what is left of it, counted from `received`.
pub(crate) fn pass_on_deadline(mut message: Message, received: std::time::Instant) -> Message {
    if let Some(deadline) = deadline_of(&message, received) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        message
            .headers
            .insert(DEADLINE.into(), left.as_millis().max(1).to_string());
    }
    message
}

/// Runs `future` in the calling task (a task of its own per call would cost a hop between
/// threads), with a panic caught and described.
async fn caught<T>(future: impl Future<Output = T>) -> Result<T, String> {
    use futures_lite::FutureExt;
    std::panic::AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned())
        })
}
