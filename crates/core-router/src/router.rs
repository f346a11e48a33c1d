//! The router's tasks and channels.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use rylm_message::{Forward, Message};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::Instrument;

use crate::Error;
use crate::table::{InboundEntry, Mode, OutboundEntry, Table};

/// A boxed future, as the component traits return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The default capacity of each outbound queue, and the number of messages a non-blocking inbound
/// component may have travelling through the router at once.
pub const DEFAULT_CAPACITY: usize = 1024;

/// An inbound component: takes messages from outside and submits them to the router.
///
/// Any `FnOnce(InboundLink) -> impl Future<Output = Result<(), Error>>` is one. The component
/// should stop taking new messages when [`InboundLink::stopping`] resolves, finish submitting
/// the ones it took, and return.
pub trait Inbound: Send + 'static {
    /// Runs the component until it is done or told to stop.
    fn run(self: Box<Self>, link: InboundLink) -> BoxFuture<Result<(), Error>>;
}

impl<F, Fut> Inbound for F
where
    F: FnOnce(InboundLink) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    fn run(self: Box<Self>, link: InboundLink) -> BoxFuture<Result<(), Error>> {
        Box::pin((*self)(link))
    }
}

/// An outbound component: takes messages from its queue and sends them on; a blocking one
/// answers each with feedback.
///
/// Any `FnOnce(OutboundQueue) -> impl Future<Output = Result<(), Error>>` is one. It should run
/// until [`OutboundQueue::recv`] returns `None` (the router has shut down and the queue is
/// drained), and may handle many messages at once.
pub trait Outbound: Send + 'static {
    /// Runs the component until its queue is closed and drained.
    fn run(self: Box<Self>, queue: OutboundQueue) -> BoxFuture<Result<(), Error>>;
}

impl<F, Fut> Outbound for F
where
    F: FnOnce(OutboundQueue) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    fn run(self: Box<Self>, queue: OutboundQueue) -> BoxFuture<Result<(), Error>> {
        Box::pin((*self)(queue))
    }
}

type Feedback = Result<Option<Message>, Error>;

/// One message handed to an outbound component.
#[derive(Debug)]
pub struct Delivery {
    message: Message,
    /// The message's body as it came, when its inbound component passed it on (see
    /// [`InboundLink::try_submit_forward`]); then `message` holds only what routing needs.
    forward: Option<Forward>,
    responder: Responder,
}

impl Delivery {
    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// True when the router waits for feedback (the component is blocking).
    pub fn expects_feedback(&self) -> bool {
        self.responder.reply.is_some()
    }

    /// The message, and the means to answer it.
    pub fn into_parts(self) -> (Message, Responder) {
        (self.message, self.responder)
    }

    /// The message, its body as it came when its inbound component passed it on, and the
    /// means to answer it.
    pub fn into_forwarded(self) -> (Message, Option<Forward>, Responder) {
        (self.message, self.forward, self.responder)
    }
}

/// Answers one delivered message. Dropping it unanswered fails the message with
/// [`Error::NoFeedback`] (blocking components only; for others it does nothing).
#[derive(Debug)]
pub struct Responder {
    reply: Option<oneshot::Sender<Feedback>>,
}

impl Responder {
    /// Sends the feedback: `Ok(Some(message))` to route on, `Ok(None)` for nothing more, or an
    /// error for the submitter.
    pub fn send(mut self, feedback: Feedback) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(feedback);
        }
    }
}

/// An outbound component's queue.
#[derive(Debug)]
pub struct OutboundQueue {
    name: String,
    receiver: mpsc::Receiver<Delivery>,
}

impl OutboundQueue {
    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next message, or `None` once the router has shut down and the queue is empty.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.receiver.recv().await
    }

    /// The next message if one is queued, without waiting (`None` also once the router has
    /// shut down and the queue is empty: [`OutboundQueue::recv`] tells which).
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.receiver.try_recv().ok()
    }
}

/// What every link and dispatch shares.
struct Shared {
    table: Table,
    /// One sender per outbound queue; emptied at shutdown so that the queues close.
    senders: RwLock<Option<Vec<mpsc::Sender<Delivery>>>>,
    /// Per inbound component: permits for messages travelling on their own (non-blocking).
    detached: Vec<Arc<Semaphore>>,
    capacity: usize,
}

impl Shared {
    fn sender(&self, index: usize) -> Result<mpsc::Sender<Delivery>, Error> {
        let senders = self.senders.read().unwrap_or_else(|e| e.into_inner());
        senders
            .as_ref()
            .and_then(|s| s.get(index).cloned())
            .ok_or(Error::Closed)
    }

    /// Carries `message` from outbound component `first` to the end of its route.
    async fn dispatch(
        &self,
        first: usize,
        mut message: Message,
        mut forward: Option<Forward>,
    ) -> Feedback {
        let mut at = first;
        loop {
            let entry = &self.table.outbound[at];
            let sender = self.sender(at)?;
            match entry.mode {
                Mode::NonBlocking => {
                    let delivery = Delivery {
                        message,
                        forward: forward.take(),
                        responder: Responder { reply: None },
                    };
                    sender
                        .send(delivery)
                        .await
                        .map_err(|_| Error::ComponentGone(entry.name.clone()))?;
                    return Ok(None);
                }
                Mode::Blocking => {
                    let (reply, feedback) = oneshot::channel();
                    let delivery = Delivery {
                        message,
                        forward: forward.take(),
                        responder: Responder { reply: Some(reply) },
                    };
                    sender
                        .send(delivery)
                        .await
                        .map_err(|_| Error::ComponentGone(entry.name.clone()))?;
                    drop(sender);
                    let feedback = feedback
                        .await
                        .map_err(|_| Error::NoFeedback(entry.name.clone()))??;
                    match (feedback, self.table.outbound_route[at]) {
                        (Some(next_message), Some(next)) => {
                            message = next_message;
                            at = next;
                        }
                        (feedback, _) => return Ok(feedback),
                    }
                }
            }
        }
    }
}

/// An inbound component's connection to the router. Cheap to clone, for components that submit
/// many messages at once.
#[derive(Clone)]
pub struct InboundLink {
    shared: Arc<Shared>,
    index: usize,
    stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for InboundLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundLink")
            .field("name", &self.name())
            .finish()
    }
}

impl InboundLink {
    /// The component's name.
    pub fn name(&self) -> &str {
        &self.shared.table.inbound[self.index].name
    }

    /// Routes `message`. A blocking component gets the feedback at the end of the route (`None`
    /// when the route ends at a non-blocking component); a non-blocking one gets `None` as soon
    /// as the router has taken the message, which then travels on its own. Waits while the
    /// queues ahead are full.
    pub async fn submit(&self, message: Message) -> Feedback {
        self.submit_with(message, None).await
    }

    /// [`InboundLink::submit`], with the message's body as it came for the first outbound
    /// component (a feedback message routed on carries none).
    async fn submit_with(&self, message: Message, forward: Option<Forward>) -> Feedback {
        let entry: &InboundEntry = &self.shared.table.inbound[self.index];
        let first = self.shared.table.inbound_route[self.index];
        let span = tracing::debug_span!(
            "message",
            inbound = %entry.name,
            pipeline = %message.pipeline,
            client = %message.client,
            function = %message.function,
        );
        match entry.mode {
            Mode::Blocking => {
                self.shared
                    .dispatch(first, message, forward)
                    .instrument(span)
                    .await
            }
            Mode::NonBlocking => {
                // A route that starts at a non-blocking component with room in its queue: the
                // message is there at once, with no task to carry it.
                let (message, forward) =
                    if self.shared.table.outbound[first].mode == Mode::NonBlocking {
                        let delivery = Delivery {
                            message,
                            forward,
                            responder: Responder { reply: None },
                        };
                        match self.shared.sender(first)?.try_send(delivery) {
                            Ok(()) => return Ok(None),
                            Err(mpsc::error::TrySendError::Full(delivery)) => {
                                (delivery.message, delivery.forward)
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                return Err(Error::ComponentGone(
                                    self.shared.table.outbound[first].name.clone(),
                                ));
                            }
                        }
                    } else {
                        (message, forward)
                    };
                let permit = self.shared.detached[self.index]
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::Closed)?;
                // Refuse here rather than in the task, so the caller knows.
                let _ = self.shared.sender(first)?;
                let shared = self.shared.clone();
                tokio::spawn(
                    async move {
                        match shared.dispatch(first, message, forward).await {
                            Ok(Some(_)) => tracing::debug!(
                                "feedback for a non-blocking inbound component dropped"
                            ),
                            Ok(None) => {}
                            Err(error) => tracing::warn!(%error, "a message could not be routed"),
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
                Ok(None)
            }
        }
    }

    /// [`InboundLink::submit`] for a non-blocking component that must not wait: when the router
    /// already holds its capacity of this component's messages, the message is handed back
    /// (`Ok(Some(message))`) for the component to refuse, e.g. with a `busy` answer. A blocking
    /// component's message is submitted as by `submit`.
    pub async fn try_submit(&self, message: Message) -> Result<Option<Message>, Error> {
        Ok(self
            .try_submit_forward(message, None)
            .await?
            .map(|(message, _)| message))
    }

    /// [`InboundLink::try_submit`] of a message passed on as it came: `forward` is its body,
    /// which the first outbound component gets with it, and `message` holds only what routing
    /// and that component need. A refused message comes back with its body.
    pub async fn try_submit_forward(
        &self,
        message: Message,
        forward: Option<Forward>,
    ) -> Result<Option<(Message, Option<Forward>)>, Error> {
        let entry: &InboundEntry = &self.shared.table.inbound[self.index];
        if entry.mode == Mode::NonBlocking
            && self.shared.detached[self.index].available_permits() == 0
        {
            return Ok(Some((message, forward)));
        }
        self.submit_with(message, forward).await.map(|_| None)
    }

    /// Resolves when the router starts shutting down: stop taking new messages.
    pub async fn stopping(&mut self) {
        while !*self.stop.borrow_and_update() {
            if self.stop.changed().await.is_err() {
                return;
            }
        }
    }

    /// True once the router has started shutting down.
    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

/// Collects components and routes, then starts the router.
#[derive(Default)]
pub struct RouterBuilder {
    inbound: Vec<(InboundEntry, Box<dyn Inbound>)>,
    outbound: Vec<(OutboundEntry, Box<dyn Outbound>)>,
    capacity: Option<usize>,
}

impl std::fmt::Debug for RouterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterBuilder")
            .field(
                "inbound",
                &self.inbound.iter().map(|(e, _)| e).collect::<Vec<_>>(),
            )
            .field(
                "outbound",
                &self.outbound.iter().map(|(e, _)| e).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RouterBuilder {
    /// Adds an inbound component whose messages go to outbound component `route`.
    pub fn inbound(mut self, name: &str, component: impl Inbound, route: &str, mode: Mode) -> Self {
        let entry = InboundEntry {
            name: name.to_owned(),
            route: route.to_owned(),
            mode,
        };
        self.inbound.push((entry, Box::new(component)));
        self
    }

    /// Adds an outbound component; a blocking one's feedback goes to `route`, or back to the
    /// inbound component with `None`.
    pub fn outbound(
        mut self,
        name: &str,
        component: impl Outbound,
        route: Option<&str>,
        mode: Mode,
    ) -> Self {
        let entry = OutboundEntry {
            name: name.to_owned(),
            route: route.map(str::to_owned),
            mode,
        };
        self.outbound.push((entry, Box::new(component)));
        self
    }

    /// Sets the capacity of every queue (default [`DEFAULT_CAPACITY`]).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity.max(1));
        self
    }

    /// Checks the table and starts every component on the current tokio runtime.
    pub fn start(self) -> Result<Router, Error> {
        let capacity = self.capacity.unwrap_or(DEFAULT_CAPACITY);
        let (inbound_entries, inbound_components): (Vec<_>, Vec<_>) =
            self.inbound.into_iter().unzip();
        let (outbound_entries, outbound_components): (Vec<_>, Vec<_>) =
            self.outbound.into_iter().unzip();
        let table = Table::build(inbound_entries, outbound_entries)?;

        let (stop, stopped) = watch::channel(false);
        let (ended, _) = watch::channel(None);
        let mut senders = Vec::new();
        let mut outbound_tasks = Vec::new();
        for (entry, component) in table.outbound.iter().zip(outbound_components) {
            let (sender, receiver) = mpsc::channel(capacity);
            senders.push(sender);
            let queue = OutboundQueue {
                name: entry.name.clone(),
                receiver,
            };
            let task = watched(entry.name.clone(), component.run(queue), &stopped, &ended);
            outbound_tasks.push((entry.name.clone(), task));
        }
        let shared = Arc::new(Shared {
            detached: (0..table.inbound.len())
                .map(|_| Arc::new(Semaphore::new(capacity)))
                .collect(),
            table,
            senders: RwLock::new(Some(senders)),
            capacity,
        });
        let mut inbound_tasks = Vec::new();
        for (index, component) in inbound_components.into_iter().enumerate() {
            let link = InboundLink {
                shared: shared.clone(),
                index,
                stop: stopped.clone(),
            };
            let name = shared.table.inbound[index].name.clone();
            let task = watched(name.clone(), component.run(link), &stopped, &ended);
            inbound_tasks.push((name, task));
        }
        Ok(Router {
            shared,
            stop,
            ended,
            inbound_tasks,
            outbound_tasks,
        })
    }
}

type Tasks = Vec<(String, tokio::task::JoinHandle<Result<(), Error>>)>;

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a component in a task of its own, and reports on `ended` if it ends (returns, fails or
/// panics) before the router was told to stop.
fn watched(
    name: String,
    run: BoxFuture<Result<(), Error>>,
    stopping: &watch::Receiver<bool>,
    ended: &watch::Sender<Option<String>>,
) -> tokio::task::JoinHandle<Result<(), Error>> {
    let (stopping, ended) = (stopping.clone(), ended.clone());
    tokio::spawn(async move {
        let inner = tokio::spawn(run);
        // Aborting this task aborts the component too.
        let _guard = AbortOnDrop(inner.abort_handle());
        let outcome = match inner.await {
            Ok(outcome) => outcome,
            Err(join_error) => Err(Error::ComponentStopped {
                component: name.clone(),
                reason: format!("its task failed: {join_error}"),
            }),
        };
        if !*stopping.borrow() {
            let how = match &outcome {
                Ok(()) => "returned".to_owned(),
                Err(error) => error.to_string(),
            };
            let what = format!("component {name:?} ended while the router was running: {how}");
            tracing::error!("{what}");
            ended.send_replace(Some(what));
        }
        outcome
    })
}

/// A running router.
pub struct Router {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    ended: watch::Sender<Option<String>>,
    inbound_tasks: Tasks,
    outbound_tasks: Tasks,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("table", &self.shared.table)
            .finish()
    }
}

impl Router {
    /// A builder with no components.
    pub fn builder() -> RouterBuilder {
        RouterBuilder::default()
    }

    /// The checked routing table.
    pub fn table(&self) -> &Table {
        &self.shared.table
    }

    /// Resolves when a component ends (returns, fails or panics) while the router runs, with
    /// what happened; never, as long as every component runs. A server that can no longer do its
    /// work should stop (or be restarted) then, not keep running headless.
    pub async fn died(&self) -> String {
        let mut ended = self.ended.subscribe();
        loop {
            if let Some(what) = ended.borrow_and_update().clone() {
                return what;
            }
            if ended.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// [`Router::shutdown`], giving up after `limit`: the components still running then are
    /// stopped where they are, and the result is [`Error::ShutdownTimedOut`].
    pub async fn shutdown_within(self, limit: std::time::Duration) -> Result<(), Error> {
        let handles: Vec<tokio::task::AbortHandle> = self
            .inbound_tasks
            .iter()
            .chain(&self.outbound_tasks)
            .map(|(_, task)| task.abort_handle())
            .collect();
        let shared = self.shared.clone();
        match tokio::time::timeout(limit, self.shutdown()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                for handle in handles {
                    handle.abort();
                }
                shared
                    .senders
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                for permits in &shared.detached {
                    permits.close();
                }
                Err(Error::ShutdownTimedOut(limit))
            }
        }
    }

    /// Stops gracefully: tells the inbound components to stop taking messages, waits for them
    /// and for every message they submitted to reach the end of its route, then closes the
    /// outbound queues and waits for the outbound components to drain them. Returns the first
    /// error a component stopped with, if any. A component that never answers keeps this
    /// waiting: [`Router::shutdown_within`] bounds it.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        let mut first_error = None;
        for (name, task) in self.inbound_tasks {
            record(&mut first_error, &name, task.await);
        }
        // Messages travelling on their own: wait until every permit is back.
        for permits in &self.shared.detached {
            let all = u32::try_from(self.shared.capacity).unwrap_or(u32::MAX);
            if let Ok(taken) = permits.acquire_many(all).await {
                taken.forget();
            }
            permits.close();
        }
        // Closing the queues: the outbound components drain what is left and end.
        self.shared
            .senders
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for (name, task) in self.outbound_tasks {
            record(&mut first_error, &name, task.await);
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn record(
    first: &mut Option<Error>,
    name: &str,
    outcome: Result<Result<(), Error>, tokio::task::JoinError>,
) {
    let error = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(error)) => Error::ComponentStopped {
            component: name.to_owned(),
            reason: error.to_string(),
        },
        Err(join_error) => Error::ComponentStopped {
            component: name.to_owned(),
            reason: format!("its task failed: {join_error}"),
        },
    };
    tracing::error!(%error, "a router component stopped with an error");
    first.get_or_insert(error);
}
