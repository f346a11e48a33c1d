//! From a worker back to its caller: answers settled against the dispatch they belong to
//! (first answer wins, late and foreign ones dropped), workers admitted on `READY`, heard
//! from, and buried when silent, with their work sent elsewhere or failed back.

use std::collections::HashSet;
use std::time::Instant;

use bytes::Bytes;
use rylm_message::Message;
use rylm_transport::{Received, Socket};

use super::batch::Packer;
use super::record::{DispatchId, Queued, WorkerState};
use super::{
    BATCH, BATCH_BYTES, CANCEL_FUNCTION, CREDITS, DISPATCH, FUNCTIONS, HEARTBEAT_FUNCTION, HOLDING,
    MAX_BATCH, ONCE, Pool, READY_FUNCTION, ResultSink, count, failure, run_hook,
};
use crate::MORE;
use crate::functions::PIPELINED;

impl Pool {
    pub(super) async fn on_worker_frame(
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
        let Some((caller, _)) = self.settle(&identity, dispatch, more, now) else {
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
    pub(super) fn settle(
        &mut self,
        identity: &[u8],
        dispatch: &str,
        more: bool,
        now: Instant,
    ) -> Option<(String, bool)> {
        let Some(id) = DispatchId::parse(dispatch) else {
            count(&self.status.counters.dropped_answers);
            tracing::debug!(%dispatch, "dropped an answer whose dispatch id does not read");
            return None;
        };
        self.heard_from(identity, id, !more, now);
        let (client, batches) = match self.in_flight.get(&id) {
            Some(dispatched) if dispatched.holders.contains(identity) => (
                &dispatched.request.message.client,
                dispatched.request.batches,
            ),
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
            return Some((client.clone(), batches));
        }
        let dispatched = self.in_flight.remove(&id)?;
        count(&self.status.counters.answered);
        Some((dispatched.request.message.client, batches))
    }

    /// The worker `identity` was heard from at `now` about dispatch `id`; when it is `done` with
    /// it, the credit the dispatch held comes back, once, and only for what this pool gave it.
    /// Returns whether a credit came back.
    pub(super) fn heard_from(
        &mut self,
        identity: &[u8],
        id: DispatchId,
        done: bool,
        now: Instant,
    ) -> bool {
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
    pub(super) async fn pass_on(
        &mut self,
        received: &Received,
        at: usize,
        sink: &ResultSink,
    ) -> bool {
        let (Some(codec), ResultSink::Answer(results)) = (self.pass_answers, sink) else {
            return false;
        };
        // `[identity, marker, body]`, or one body of a batch (`[identity, marker, body, ...]`);
        // the view checks the marker.
        let (Some(identity), Some(marker), Some(body)) =
            (received.part(0), received.part(1), received.part(at))
        else {
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
        if let Some((caller, batches)) = self.settle(identity, dispatch, more, Instant::now())
            && let Some(body) = received.bytes(at)
        {
            if batches {
                // Sent with the others of this burst to the same caller (see `flush_answers`).
                self.answers_out.push((caller, body));
            } else {
                // The view checked the marker: the static one goes on rather than a copy.
                let marker = Bytes::from_static(&rylm_message::MARKER);
                results.pass_on(&caller, &[marker, body], 1).await;
            }
        }
        true
    }

    /// Sends the answers gathered for callers that read batches: one message per caller,
    /// `[MARKER, body, ...]`, within [`MAX_BATCH`] and [`BATCH_BYTES`].
    pub(super) async fn flush_answers(&mut self, sink: &ResultSink) {
        if self.answers_out.is_empty() {
            return;
        }
        let mut out = std::mem::take(&mut self.answers_out);
        let ResultSink::Answer(results) = sink else {
            return;
        };
        // Stable: each caller's answers keep their order.
        out.sort_by(|a, b| a.0.cmp(&b.0));
        let mut packer = Packer::new(MAX_BATCH, BATCH_BYTES);
        let mut bodies = out.into_iter().peekable();
        while let Some((caller, body)) = bodies.next() {
            let mut ready: Vec<_> = packer.push(body).into_iter().collect();
            // The caller's last answer closes its batch.
            if bodies.peek().is_none_or(|(next, _)| *next != caller) {
                ready.extend(packer.finish());
            }
            for frames in ready {
                let answers = (frames.len() - 1) as u64;
                results.pass_on(&caller, &frames, answers).await;
            }
        }
    }

    pub(super) fn on_ready(&mut self, identity: Bytes, message: &Message, now: Instant) {
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
            batch: 1,
        });
        worker.batch = message
            .header(BATCH)
            .and_then(|b| b.parse().ok())
            .unwrap_or(1usize)
            .clamp(1, MAX_BATCH);
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

    pub(super) async fn bury_the_dead(&mut self, sink: &mut ResultSink) {
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
    pub(super) async fn bury(&mut self, identity: Bytes, sink: &mut ResultSink) {
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
}
