//! Compositions as plain data: what each kind does with its steps' responses, apart from how a
//! step reaches its service. A [`Runner`] performs the leaves (a request to a topic, a lambda);
//! the node runs them on Redis, the proxy calls lambdas back on the node's HTTP endpoint, and
//! the tests run them in memory.
//!
//! | kind | what it does |
//! |---|---|
//! | `pipe` | each step gets the previous step's output; stops at the first failure |
//! | `andand` | each step gets the original input; stops at the first failure |
//! | `oror` | each step gets the original input; stops at the first success (code <= 200) |
//! | `batch` | each step gets the original input; failures ignored; the last response, or every one with `record` |
//! | `parallel` | every step at once with the original input; every response, in completion order |

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::protocol::{self, Composed, Step};

/// A boxed future, as the recursive evaluation needs.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How deep compositions may nest.
pub const MAX_DEPTH: usize = 32;

/// The kinds of composition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Output of one step is the input of the next.
    Pipe,
    /// Sequential on the same input, until a failure.
    AndAnd,
    /// Sequential on the same input, until a success.
    OrOr,
    /// Sequential on the same input, failures ignored; `record` keeps every response.
    Batch {
        /// Keep every response, not only the last.
        record: bool,
    },
    /// All at once on the same input.
    Parallel,
}

impl Kind {
    /// The name used in JSON (`pipe`, `andand`, `oror`, `batch`, `parallel`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pipe => "pipe",
            Kind::AndAnd => "andand",
            Kind::OrOr => "oror",
            Kind::Batch { .. } => "batch",
            Kind::Parallel => "parallel",
        }
    }
}

/// One step: a request, a lambda (`L` is how the caller names one: a closure, a path on an
/// HTTP node), or a nested composition.
#[derive(Debug, Clone, PartialEq)]
pub enum Executable<L> {
    /// A request to a service.
    Request {
        /// The service's topic.
        topic: String,
        /// Merged into the incoming data when it is an object (these keys win).
        message: Option<Map<String, Value>>,
        /// This step's deadline; the composition's default when absent.
        timeout: Option<Duration>,
    },
    /// A local transform of the incoming data.
    Lambda(L),
    /// A composition inside this one.
    Composition(Composition<L>),
}

impl<L> Executable<L> {
    /// A request to `topic`.
    pub fn request(topic: impl Into<String>) -> Self {
        Executable::Request {
            topic: topic.into(),
            message: None,
            timeout: None,
        }
    }

    /// A request to `topic` with `message` merged into its input.
    pub fn request_with(topic: impl Into<String>, message: Map<String, Value>) -> Self {
        Executable::Request {
            topic: topic.into(),
            message: Some(message),
            timeout: None,
        }
    }
}

impl<L> From<Composition<L>> for Executable<L> {
    fn from(composition: Composition<L>) -> Self {
        Executable::Composition(composition)
    }
}

/// A composition: a kind and its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Composition<L> {
    /// What it does with its steps.
    pub kind: Kind,
    /// The steps, in order.
    pub steps: Vec<Executable<L>>,
}

/// What performs a composition's leaves.
pub trait Runner<L>: Sync {
    /// Sends `data` to `topic`, waiting at most `timeout`, and gives the reply as a step.
    fn request<'a>(&'a self, topic: &'a str, data: Value, timeout: Duration)
    -> BoxFuture<'a, Step>;
    /// Runs `lambda` on `data`.
    fn lambda<'a>(&'a self, lambda: &'a L, data: Value) -> BoxFuture<'a, Step>;
}

impl<L> Composition<L> {
    /// How many steps it has, nested ones included (a nested composition counts as one step
    /// besides its own): what a caller bounds before running one it was given.
    pub fn size(&self) -> usize {
        self.steps
            .iter()
            .map(|step| match step {
                Executable::Composition(inner) => 1 + inner.size(),
                _ => 1,
            })
            .sum()
    }

    /// Every request step at any depth: its topic and its own timeout.
    pub fn requests(&self) -> Vec<(&str, Option<Duration>)> {
        let mut out = Vec::new();
        for step in &self.steps {
            match step {
                Executable::Request { topic, timeout, .. } => out.push((topic.as_str(), *timeout)),
                Executable::Lambda(_) => {}
                Executable::Composition(inner) => out.extend(inner.requests()),
            }
        }
        out
    }
}

impl<L: Sync> Composition<L> {
    /// A composition of `kind`.
    pub fn new(kind: Kind, steps: Vec<Executable<L>>) -> Self {
        Composition { kind, steps }
    }

    /// Runs the composition on `input`; request steps without a timeout wait at most `timeout`.
    pub fn run<'a, R: Runner<L>>(
        &'a self,
        input: Value,
        runner: &'a R,
        timeout: Duration,
    ) -> BoxFuture<'a, Composed> {
        Box::pin(async move {
            let mut last = Composed::of(Vec::new());
            match self.kind {
                Kind::Pipe => {
                    let mut data = input;
                    for step in &self.steps {
                        last = step.run(data, runner, timeout).await;
                        if failed(&last) {
                            break;
                        }
                        data = last.as_input();
                    }
                    last
                }
                Kind::AndAnd | Kind::OrOr => {
                    for step in &self.steps {
                        last = step.run(input.clone(), runner, timeout).await;
                        let done = if self.kind == Kind::AndAnd {
                            failed(&last)
                        } else {
                            last.code <= protocol::OK
                        };
                        if done {
                            break;
                        }
                    }
                    last
                }
                Kind::Batch { record } => {
                    let mut kept = Vec::new();
                    for step in &self.steps {
                        last = step.run(input.clone(), runner, timeout).await;
                        if record {
                            kept.extend(last.messages.iter().cloned());
                        }
                    }
                    if record { Composed::of(kept) } else { last }
                }
                Kind::Parallel => {
                    let running = self
                        .steps
                        .iter()
                        .map(|step| step.run(input.clone(), runner, timeout))
                        .collect();
                    let mut kept = Vec::new();
                    for done in in_completion_order(running).await {
                        kept.extend(done.messages);
                    }
                    Composed::of(kept)
                }
            }
        })
    }
}

impl<L: Sync> Executable<L> {
    /// Runs this step on `input`.
    pub fn run<'a, R: Runner<L>>(
        &'a self,
        input: Value,
        runner: &'a R,
        timeout: Duration,
    ) -> BoxFuture<'a, Composed> {
        Box::pin(async move {
            match self {
                Executable::Request {
                    topic,
                    message,
                    timeout: own,
                } => {
                    let data = match message {
                        Some(message) => protocol::merge(&input, message),
                        None => input,
                    };
                    let step = runner.request(topic, data, own.unwrap_or(timeout)).await;
                    Composed::of(vec![step])
                }
                Executable::Lambda(lambda) => {
                    Composed::of(vec![runner.lambda(lambda, input).await])
                }
                Executable::Composition(inner) => inner.run(input, runner, timeout).await,
            }
        })
    }
}

fn failed(composed: &Composed) -> bool {
    protocol::is_failure(composed.code)
}

/// Drives every future at once and gives their outputs in the order they finished.
async fn in_completion_order<T>(futures: Vec<BoxFuture<'_, T>>) -> Vec<T> {
    let mut pending: Vec<Option<BoxFuture<'_, T>>> = futures.into_iter().map(Some).collect();
    let mut done = Vec::with_capacity(pending.len());
    std::future::poll_fn(|cx| {
        for slot in pending.iter_mut() {
            if let Some(future) = slot
                && let Poll::Ready(output) = future.as_mut().poll(cx)
            {
                done.push(output);
                *slot = None;
            }
        }
        if pending.iter().all(Option::is_none) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    done
}

/// Reads a composition given as JSON, as the proxy's `/request/:id` takes it:
/// `{"pipe": [steps]}` (or `andand`, `oror`, `parallel`, `batch` with an optional
/// `"record": true`); a step is `{"topic", "message"?, "timeout"?}`, `{"lambda": "/path"}` or a
/// nested composition. The error says what is wrong, and where.
pub fn from_json(value: &Value) -> Result<Composition<String>, String> {
    composition(value, "composition", 0)
}

const KINDS: [&str; 5] = ["pipe", "andand", "oror", "batch", "parallel"];

fn composition(value: &Value, at: &str, depth: usize) -> Result<Composition<String>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("{at}: compositions nest at most {MAX_DEPTH} deep"));
    }
    let Value::Object(map) = value else {
        return Err(format!(
            "{at}: a composition is an object such as {{\"pipe\": [...]}}"
        ));
    };
    let named: Vec<&str> = KINDS
        .iter()
        .copied()
        .filter(|k| map.contains_key(*k))
        .collect();
    let [name] = named.as_slice() else {
        return Err(format!(
            "{at}: a composition has exactly one of pipe, andand, oror, batch, parallel"
        ));
    };
    let kind = match *name {
        "pipe" => Kind::Pipe,
        "andand" => Kind::AndAnd,
        "oror" => Kind::OrOr,
        "parallel" => Kind::Parallel,
        _ => Kind::Batch {
            record: match map.get("record") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(record)) => *record,
                Some(_) => return Err(format!("{at}: \"record\" is true or false")),
            },
        },
    };
    if let Some(extra) = map
        .keys()
        .find(|k| k.as_str() != *name && !(k.as_str() == "record" && *name == "batch"))
    {
        return Err(format!("{at}: unexpected field {extra:?}"));
    }
    let Some(Value::Array(steps)) = map.get(*name) else {
        return Err(format!("{at}: \"{name}\" is a list of steps"));
    };
    let steps = steps
        .iter()
        .enumerate()
        .map(|(i, step)| executable(step, &format!("{at}.{name}[{i}]"), depth + 1))
        .collect::<Result<_, _>>()?;
    Ok(Composition { kind, steps })
}

fn executable(value: &Value, at: &str, depth: usize) -> Result<Executable<String>, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "{at}: a step is an object: {{\"topic\"}}, {{\"lambda\"}} or a composition"
        ));
    };
    if let Some(topic) = map.get("topic") {
        let Some(topic) = topic.as_str() else {
            return Err(format!("{at}: \"topic\" is a string"));
        };
        protocol::service_topic(topic).map_err(|e| format!("{at}: {e}"))?;
        let message = match map.get("message") {
            None | Some(Value::Null) => None,
            Some(Value::Object(message)) => Some(message.clone()),
            Some(_) => {
                return Err(format!(
                    "{at}: \"message\" is an object, merged into the step's input"
                ));
            }
        };
        let timeout = match map.get("timeout") {
            None | Some(Value::Null) => None,
            Some(seconds) => Some(
                seconds_of(seconds)
                    .ok_or_else(|| format!("{at}: \"timeout\" is a positive number of seconds"))?,
            ),
        };
        if let Some(extra) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "topic" | "message" | "timeout"))
        {
            return Err(format!("{at}: unexpected field {extra:?}"));
        }
        return Ok(Executable::Request {
            topic: topic.to_owned(),
            message,
            timeout,
        });
    }
    if let Some(lambda) = map.get("lambda") {
        return match lambda.as_str() {
            Some(path) if path.starts_with('/') && map.len() == 1 => {
                Ok(Executable::Lambda(path.to_owned()))
            }
            _ => Err(format!(
                "{at}: a lambda is {{\"lambda\": \"/path on the node\"}}"
            )),
        };
    }
    composition(value, at, depth).map(Executable::Composition)
}

/// A positive, finite number of seconds, as the proxy's bodies give timeouts.
pub fn seconds_of(value: &Value) -> Option<Duration> {
    let seconds = value.as_f64()?;
    (seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0 * 365.0)
        .then(|| Duration::from_secs_f64(seconds))
}
