//! From a caller to a worker: a request admitted or refused, lined up for a credit, dispatched
//! to a worker with its dispatch id and deadline, or withdrawn, expired or failed back.

use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use rylm_message::{Forward, Message, NativeCodec};
use rylm_transport::Socket;

use super::batch::Packer;
use super::record::{DispatchId, Dispatched, Holders, Queued, Request, stamped};
use super::{
    BATCH_BYTES, CANCEL, CANCEL_FUNCTION, Pool, ResultSink, WITHDRAW_FUNCTION, count, failure,
    run_hook,
};
use crate::functions::{SYNC_FUNCTION, deadline_of};
use crate::parts::answer_frames;

impl Pool {
    /// Takes a message from the router: answers a client's handshake, refuses it when the line
    /// is full, else lines up its parts.
    pub(super) async fn admit(
        &mut self,
        message: Message,
        forward: Option<Forward>,
        sink: &mut ResultSink,
    ) {
        if let Some(forward) = forward {
            // Passed on as it came: the callers' part took it for a plain call.
            let now = Instant::now();
            let deadline = forward
                .header(crate::DEADLINE)
                .and_then(|value| crate::functions::deadline_in(value, now))
                .unwrap_or(now + self.admission.default_deadline);
            let batches = forward.header(super::BATCH).is_some();
            let request = Request {
                message,
                forward: Some(forward),
                batches,
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
            let batches = part.header(super::BATCH).is_some();
            let request = Request {
                message: part,
                forward: None,
                batches,
            };
            self.line_up(request, deadline, sink).await;
        }
    }

    /// Lines `request` up for a credit, or answers it `busy` when the line is full.
    pub(super) async fn line_up(
        &mut self,
        request: Request,
        deadline: Instant,
        sink: &mut ResultSink,
    ) {
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
    pub(super) fn withdraw(&mut self, client: &str) {
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

    pub(super) async fn fail_everything(&mut self, sink: &mut ResultSink) {
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

    pub(super) async fn publish(&self, sink: &mut ResultSink, message: Message) {
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

    /// Answers `deadline` for what waited or ran past its deadline, and gives the credits of
    /// overdue dispatches back.
    pub(super) async fn expire(&mut self, sink: &mut ResultSink) {
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

    pub(super) async fn send_to(&self, workers: &Socket, identity: Bytes, message: &Message) {
        match self.codec.encode_frames(message) {
            Ok(frames) => {
                if let Err(error) = workers.send(routed(identity, frames)).await {
                    tracing::debug!(%error, "could not reach a worker");
                }
            }
            Err(error) => tracing::error!(%error, "could not encode a message for a worker"),
        }
    }

    /// A new dispatch id: unique in this pool, and not to be guessed from the others.
    pub(super) fn next_dispatch(&mut self) -> DispatchId {
        self.dispatched += 1;
        DispatchId {
            number: self.dispatched,
            tag: self.keys.hash_one(self.dispatched),
        }
    }

    pub(super) async fn dispatch(&mut self, to_workers: &Socket, sink: &mut ResultSink) {
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
        // What goes to workers that take batches, one batch per worker being filled.
        let mut batches = Batches::default();
        while !self.waiting.is_empty() {
            let Some(identity) = self
                .workers
                .iter()
                .filter(|(_, w)| w.credits > 0)
                .max_by_key(|(_, w)| w.credits)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            let Some(queued) = self.waiting.pop_front() else {
                break;
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
            let mut batch = 1;
            if let Some(worker) = self.workers.get_mut(&identity) {
                worker.credits -= 1;
                worker.holds.insert(id);
                batch = if self.batching { worker.batch } else { 1 };
            }
            count(&self.status.counters.dispatched);
            let frames = match batches.add(&identity, batch, frames) {
                Some(full) => full,
                None => continue,
            };
            send_to_worker(to_workers, identity, frames).await;
        }
        for (identity, frames) in batches.take() {
            send_to_worker(to_workers, identity, frames).await;
        }
    }
}

/// `frames` after the routing identity of the worker they go to.
fn routed(identity: Bytes, frames: Vec<Bytes>) -> Vec<Bytes> {
    let mut with_identity = Vec::with_capacity(frames.len() + 1);
    with_identity.push(identity);
    with_identity.extend(frames);
    with_identity
}

/// `frames` (`[MARKER, body, ...]` or a message of another codec) to worker `identity`.
async fn send_to_worker(to_workers: &Socket, identity: Bytes, frames: Vec<Bytes>) {
    if let Err(error) = to_workers.send(routed(identity, frames)).await {
        tracing::warn!(%error, "could not reach a worker; it will be taken for dead");
    }
}

/// Native messages gathered per worker during one pass of dispatching: each worker's batch
/// (`[MARKER, body, body, ...]`) goes out when it is full, the rest at the end of the pass.
#[derive(Default)]
struct Batches {
    /// A worker and its batch.
    filling: Vec<(Bytes, Packer)>,
}

impl Batches {
    /// Adds `frames` to worker `identity`'s batch (of at most `batch` messages); what is to be
    /// sent now, if anything: `frames` themselves when they cannot go in a batch, or a batch
    /// made full by them.
    fn add(&mut self, identity: &Bytes, batch: usize, frames: Vec<Bytes>) -> Option<Vec<Bytes>> {
        let body = match frames.as_slice() {
            [marker, body] if batch > 1 && marker[..] == rylm_message::MARKER => body.clone(),
            _ => return Some(frames),
        };
        if body.len() > BATCH_BYTES / 2 {
            return Some(frames);
        }
        let at = match self.filling.iter().position(|(id, _)| id == identity) {
            Some(at) => at,
            None => {
                let packer = Packer::new(batch, BATCH_BYTES);
                self.filling.push((identity.clone(), packer));
                self.filling.len() - 1
            }
        };
        self.filling[at].1.push(body)
    }

    /// The batches not yet sent, emptied.
    fn take(&mut self) -> impl Iterator<Item = (Bytes, Vec<Bytes>)> {
        std::mem::take(&mut self.filling)
            .into_iter()
            .filter_map(|(identity, mut packer)| Some((identity, packer.finish()?)))
    }
}
