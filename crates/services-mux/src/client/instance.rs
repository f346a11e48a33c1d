//! One instance of a service as a client sees it: how to reach and authenticate it, its
//! connection and heartbeat task, the calls it holds, and what it sends back (answers, pongs,
//! refusals) routed to the calls waiting for them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use rylm_transport::{Event, Kind, Outbox, Socket, Undelivered};

use super::{Inner, Pending, Waiter};
use crate::protocol::{self, Binding, Decoded, Frame, RequestView, Secret, WireControl};
use crate::{Error, ServiceResponse};

pub(super) struct Instance {
    pub(super) address: String,
    /// What every call and every answer needs (secrets, binding, socket), read without a
    /// lock; replaced whole when any of it changes.
    pub(super) link: ArcSwap<Link>,
    pub(super) live: AtomicBool,
    pub(super) in_flight: AtomicUsize,
    /// When it last sent an authenticated frame, in ms after the client's start plus one (0:
    /// never).
    pub(super) last_seen: AtomicU64,
    /// Why the instance refused our heartbeats (a wrong secret), until it accepts one; the
    /// flag says whether there is a reason, so that answers need not take the lock.
    pub(super) refused: std::sync::Mutex<Option<String>>,
    pub(super) refusing: AtomicBool,
    /// Its connection and heartbeat task, stopped when the instance is removed.
    pub(super) task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Requests on their way to it, handed to its socket in bursts.
    pub(super) outbox: Arc<Outbox<u64>>,
}

/// How to reach and authenticate an instance.
#[derive(Clone)]
pub(super) struct Link {
    /// The shared secret first, then the one it replaced (answers to calls signed with the
    /// previous one may still be on their way); `register` may replace it (rotation).
    pub(super) secrets: Vec<Secret>,
    /// What requests to this instance are bound to, from its last pong; `None` until then.
    pub(super) binding: Option<Arc<Binding>>,
    pub(super) socket: Option<Socket>,
}

impl Instance {
    pub(super) fn new(address: &str, secret: Secret) -> Instance {
        Instance {
            address: address.to_owned(),
            link: ArcSwap::from_pointee(Link {
                secrets: vec![secret],
                binding: None,
                socket: None,
            }),
            live: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_seen: AtomicU64::new(0),
            outbox: Arc::default(),
            refused: std::sync::Mutex::new(None),
            refusing: AtomicBool::new(false),
            task: std::sync::Mutex::new(None),
        }
    }

    /// Changes the link (rare: rotation, a pong, a connection or its loss).
    pub(super) fn relink(&self, change: impl Fn(&mut Link)) {
        self.link.rcu(|link| {
            let mut link = Link::clone(link);
            change(&mut link);
            link
        });
    }

    pub(super) fn rotate(&self, secret: &Secret) {
        self.relink(|link| {
            let current = std::mem::replace(&mut link.secrets[0], secret.clone());
            link.secrets.truncate(1);
            link.secrets.push(current);
        });
    }

    pub(super) fn binding(&self) -> Option<Arc<Binding>> {
        self.link.load().binding.clone()
    }

    pub(super) fn refusal(&self) -> Option<String> {
        if !self.refusing.load(Ordering::Acquire) {
            return None;
        }
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn set_refused(&self, reason: Option<String>) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        self.refusing.store(reason.is_some(), Ordering::Release);
        *refused = reason;
    }

    /// An authenticated frame came from the instance, `now` after the client's start: it was
    /// seen, it accepts us, and it is live (true when it was not until now).
    pub(super) fn heard(&self, now: Duration) -> bool {
        self.last_seen
            .fetch_max(now.as_millis() as u64 + 1, Ordering::Relaxed);
        if self.refusing.load(Ordering::Acquire) {
            self.set_refused(None);
        }
        !self.live.load(Ordering::Acquire) && !self.live.swap(true, Ordering::AcqRel)
    }

    /// How long the instance has been silent at `now` after the client's start; `None` before
    /// it was first heard.
    pub(super) fn silent_for(&self, now: Duration) -> Option<Duration> {
        match self.last_seen.load(Ordering::Relaxed) {
            0 => None,
            seen => Some(now.saturating_sub(Duration::from_millis(seen - 1))),
        }
    }
}

/// One call on `instance` is over.
pub(super) fn release(instance: &Instance) {
    let _ = instance
        .in_flight
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
}

/// Sends call `id`'s request to `instance`, bound to it (it waits for the instance's pong),
/// through the instance's outbox. An error here is the caller's; one met later fails the call
/// through its pending entry.
pub(super) async fn send_request(
    inner: &Arc<Inner>,
    instance: &Arc<Instance>,
    id: u64,
    request: &RequestView<'_>,
) -> Result<(), Error> {
    let (frames, socket) = encoded(instance, |link| {
        let binding = link
            .binding
            .as_deref()
            .ok_or_else(|| not_connected(instance))?;
        protocol::encode_request(request, &link.secrets[0], binding)
    })?;
    let in_flight = instance.in_flight.load(Ordering::Relaxed);
    instance
        .outbox
        .send(id, &socket, frames, inner, in_flight)
        .await?;
    Ok(())
}

impl Undelivered<u64> for Inner {
    /// Call `call`'s request could not be sent: the call fails.
    fn undelivered(&self, call: u64, error: rylm_transport::Error) {
        let failed = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&call);
        if let Some(pending) = failed {
            release(&pending.instance);
            fail(self, call, pending, error.into());
        }
    }
}

/// Sends a control frame (a ping, a discovery request) to `instance`; control frames are not
/// bound to an instance (requests go through [`send_request`]).
pub(super) async fn send_frame(instance: &Instance, frame: &Frame) -> Result<(), Error> {
    send_with(instance, |link| {
        protocol::encode(frame, &link.secrets[0], &Binding::default())
    })
    .await
}

/// Sends what `encode` writes with the instance's current link, on its socket.
pub(super) async fn send_with(
    instance: &Instance,
    encode: impl FnOnce(&Link) -> Result<Vec<Bytes>, Error>,
) -> Result<(), Error> {
    let (frames, socket) = encoded(instance, encode)?;
    Ok(socket.send(frames).await?)
}

/// What `encode` writes with the instance's current link, and the link's socket.
pub(super) fn encoded(
    instance: &Instance,
    encode: impl FnOnce(&Link) -> Result<Vec<Bytes>, Error>,
) -> Result<(Vec<Bytes>, Socket), Error> {
    let link = instance.link.load();
    let Some(socket) = &link.socket else {
        return Err(not_connected(instance));
    };
    Ok((encode(&link)?, socket.clone()))
}

pub(super) fn not_connected(instance: &Instance) -> Error {
    Error::NoLiveInstance {
        service: instance.address.clone(),
        waited: Duration::ZERO,
    }
}

/// Connects to one instance, pings it, and routes what it sends back.
pub(super) async fn run_instance(inner: Weak<Inner>, instance: Arc<Instance>) {
    let Some(config) = inner.upgrade().map(|i| i.config.clone()) else {
        return;
    };
    // The transport dials in the background and again whenever the instance goes away; the
    // instance is live again as soon as it answers a ping.
    let socket = match Socket::new(Kind::Dealer, &config.transport) {
        Ok(socket) => socket,
        Err(error) => {
            tracing::error!(address = %instance.address, %error, "cannot create a socket for the instance");
            return;
        }
    };
    let mut events = socket.events();
    if let Err(error) = socket.connect(&instance.address).await {
        tracing::error!(address = %instance.address, %error, "cannot connect to the instance");
        return;
    }
    instance.relink(|link| link.socket = Some(socket.clone()));
    let dead_after = config.heartbeat_interval * config.heartbeat_misses;
    let mut ticker = tokio::time::interval(config.heartbeat_interval);
    loop {
        tokio::select! {
            message = socket.recv_message() => {
                let Some(inner) = inner.upgrade() else { break };
                match message {
                    Ok(message) => {
                        on_frame(&inner, &instance, &message);
                        // The rest of a burst without waiting again.
                        for _ in 1..rylm_transport::BURST {
                            // Each counts against the task's budget, as a wait would: a long burst
                            // yields to the tasks it woke instead of starving them.
                            tokio::task::coop::consume_budget().await;
                            let Ok(Some(message)) = socket.try_recv_message() else { break };
                            on_frame(&inner, &instance, &message);
                        }
                    }
                    Err(error) if error.is_closed() => break,
                    Err(error) => tracing::warn!(address = %instance.address, %error, "receiving failed"),
                }
            }
            event = events.next() => {
                let Some(inner) = inner.upgrade() else { break };
                // A lost connection fails the calls on it at once, rather than at the deadline.
                if let Some(Event::Disconnected { .. }) = event {
                    mark_dead(&inner, &instance, Duration::ZERO);
                }
            }
            _ = ticker.tick() => {
                let Some(inner) = inner.upgrade() else { break };
                let silent_for = instance.silent_for(inner.started.elapsed());
                if let Some(silent_for) = silent_for.filter(|s| *s > dead_after) {
                    mark_dead(&inner, &instance, silent_for);
                }
                expire_async(&inner, &instance);
                let ping = Frame::Ping(WireControl { id: inner.ids.text(inner.ids.next()).as_str().to_owned(), ts: protocol::now_ms(), ..WireControl::default() });
                if let Err(error) = send_frame(&instance, &ping).await {
                    tracing::debug!(address = %instance.address, %error, "ping failed");
                }
            }
        }
    }
    instance.relink(|link| link.socket = None);
    socket.close().await;
}

pub(super) fn mark_dead(inner: &Inner, instance: &Instance, silent_for: Duration) {
    if !instance.live.swap(false, Ordering::AcqRel) {
        return;
    }
    instance.in_flight.store(0, Ordering::Relaxed);
    // A new start of the instance has a new id: learn it from its next pong.
    instance.relink(|link| link.binding = None);
    tracing::warn!(address = %instance.address, ?silent_for, "instance stopped answering heartbeats");
    let failed: Vec<(u64, Pending)> = {
        let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| std::ptr::eq(&*p.instance, instance))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| pending.remove(&id).map(|p| (id, p)))
            .collect()
    };
    for (id, pending) in failed {
        let error = Error::InstanceDead {
            address: instance.address.clone(),
            silent_for,
        };
        fail(inner, id, pending, error);
    }
}

/// Ends call `id`, already out of the pending map, with `error` (an asynchronous call's
/// handler gets it as a 503 response).
pub(super) fn fail(inner: &Inner, id: u64, pending: Pending, error: Error) {
    match pending.waiter {
        Waiter::Sync(sender) => {
            let _ = sender.send(Err(error));
        }
        Waiter::Discover(sender) => {
            let _ = sender.send(Err(error));
        }
        Waiter::Async => {
            let response = ServiceResponse::new(503, error.to_string());
            let id = inner.ids.text(id).as_str().to_owned();
            deliver_async(inner, id, pending.path, response);
        }
    }
}

/// Asynchronous calls on `address` past their deadline: removed, and their handlers answered
/// 504 (a synchronous call's own timeout removes it).
pub(super) fn expire_async(inner: &Inner, instance: &Instance) {
    let now = Instant::now();
    let expired: Vec<(u64, Pending)> = {
        let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| {
                std::ptr::eq(&*p.instance, instance)
                    && p.expires <= now
                    && matches!(p.waiter, Waiter::Async)
            })
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| pending.remove(&id).map(|p| (id, p)))
            .collect()
    };
    for (id, pending) in expired {
        release(instance);
        let response = ServiceResponse::new(504, "no response within the call's deadline");
        let id = inner.ids.text(id).as_str().to_owned();
        deliver_async(inner, id, pending.path, response);
    }
}

pub(super) fn deliver_async(inner: &Inner, id: String, path: String, response: ServiceResponse) {
    let handler = {
        let handlers = inner.handlers.read().unwrap_or_else(|e| e.into_inner());
        handlers
            .iter()
            .find(|(regex, _)| regex.is_match(&path))
            .map(|(_, h)| h.clone())
    };
    match handler {
        Some(handler) => {
            tokio::spawn(async move {
                let _ = handler(path, response).await;
            });
        }
        None => {
            tracing::debug!(call = %id, %path, "no response handler for an asynchronous call's response")
        }
    }
}

pub(super) fn on_frame(inner: &Inner, instance: &Instance, message: &rylm_transport::Received) {
    // Borrowed: nothing is copied before the MAC is checked.
    let mut parts: [&[u8]; 4] = [&[]; 4];
    if message.len() > parts.len() {
        tracing::warn!(address = %instance.address, frames = message.len(), "dropped a message of too many frames");
        return;
    }
    for (index, part) in parts.iter_mut().enumerate().take(message.len()) {
        *part = message.part(index).unwrap_or_default();
    }
    let frames = &parts[..message.len()];
    let link = instance.link.load();
    let unbound = Binding::default();
    let binding = link.binding.as_deref().unwrap_or(&unbound);
    let frame = match protocol::decode(frames, &link.secrets, binding) {
        Ok(Decoded::Frame(frame, _)) => frame,
        Ok(Decoded::BadMac { id }) => {
            tracing::warn!(address = %instance.address, call = %id, "dropped a response whose MAC does not match");
            return;
        }
        Err(error) => {
            tracing::warn!(address = %instance.address, %error, "dropped a malformed frame");
            return;
        }
    };
    let mut bound = link.binding.is_some();
    drop(link);
    if let Frame::Pong(pong) = &frame {
        let learned = Binding {
            service: pong.service.clone(),
            instance: pong.instance.clone(),
        };
        if instance.binding().as_deref() != Some(&learned) {
            tracing::debug!(address = %instance.address, instance = %learned.instance, "bound to the instance");
            let learned = Arc::new(learned);
            instance.relink(|link| link.binding = Some(learned.clone()));
        }
        bound = true;
    }
    // Live once it answers a ping (and so is bound); any other authenticated frame is news too.
    if !matches!(frame, Frame::Refusal(_)) && bound && instance.heard(inner.started.elapsed()) {
        tracing::debug!(address = %instance.address, "instance is live");
        inner.live_changed.notify_waiters();
    }
    let key = inner.ids.parse(frame.id());
    let pending = key.and_then(|key| {
        inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key)
    });
    let (Some(key), Some(pending)) = (key, pending) else {
        if let Frame::Refusal(refusal) = &frame {
            // A refused heartbeat: this instance does not accept our secret.
            tracing::warn!(address = %instance.address, reason = %refusal.reason, "the instance refuses this client");
            instance.set_refused(Some(refusal.reason.clone()));
            inner.live_changed.notify_waiters();
            return;
        }
        if !matches!(frame, Frame::Pong(_)) {
            tracing::debug!(call = %frame.id(), "dropped an answer nobody waits for (late, or replayed)");
        }
        return;
    };
    if !std::ptr::eq(&*pending.instance, instance) {
        // An answer for a call made elsewhere: not this instance's to settle.
        inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, pending);
        return;
    }
    release(instance);
    match (frame, pending.waiter) {
        (Frame::Response(response), Waiter::Sync(sender)) => {
            let _ = sender.send(Ok(response));
        }
        (Frame::Response(response), Waiter::Async) => {
            deliver_async(
                inner,
                response.id.clone(),
                pending.path,
                ServiceResponse::from_wire(response),
            );
        }
        (Frame::Routes(routes), Waiter::Discover(sender)) => {
            let _ = sender.send(Ok(routes.routes));
        }
        (Frame::Refusal(refusal), waiter) => {
            tracing::warn!(address = %instance.address, reason = %refusal.reason, "the service refused a call");
            let error = || Error::Refused {
                address: instance.address.clone(),
                reason: refusal.reason.clone(),
            };
            match waiter {
                Waiter::Sync(sender) => {
                    let _ = sender.send(Err(error()));
                }
                Waiter::Discover(sender) => {
                    let _ = sender.send(Err(error()));
                }
                Waiter::Async => deliver_async(
                    inner,
                    refusal.id,
                    pending.path,
                    ServiceResponse::new(401, refusal.reason),
                ),
            }
        }
        (other, _) => tracing::warn!(frame = ?other, "an answer of the wrong kind"),
    }
}
