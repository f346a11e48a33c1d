//! Messages of many tasks handed to their socket in bursts, in the order they were given.
//!
//! When many tasks share a socket and each gives it its own message, the socket's connection
//! task is woken by the first one and, scheduled next on the same thread, writes it alone: a
//! client with 100 calls in flight wrote one or two requests per system call, where its server,
//! answering from one loop, wrote twenty-seven answers in one. An [`Outbox`] gathers the
//! messages instead, and they leave together:
//!
//! - the task whose message completes a burst of [`BURST`] hands everything waiting to the
//!   socket at once, without waiting (nothing that a task which gives up could interrupt);
//! - the message that finds the outbox empty starts a flush, a task of its own that goes once
//!   to the back of its thread's run queue (so that the tasks ready to run add theirs) and
//!   hands over what is waiting, so that no message waits for a burst that does not come, and
//!   none is stranded by a task that gives up.
//!
//! Either way the connection task is woken once and writes the burst in one go. Gathering
//! pays only when many messages are in flight: below [`GATHER_FROM`] (the caller says how many
//! it has), a message goes straight to the socket when nothing waits before it, so that a lone
//! call does not wait for a flush (one at a time, the flush cost a call two and a half times
//! its latency).
//!
//! **Order.** Messages reach the socket in the order they were given to the outbox: every
//! hand-over takes what waits and offers it to the socket under one lock, and a message goes
//! straight only when nothing waits and nothing is being handed over. When the socket has no
//! room (every peer's queue full), the outbox stalls: what is left waits, in order, for a task
//! that sends each one as room comes (up to the socket's send timeout each), and everything
//! given meanwhile queues behind it. A message that cannot be sent is reported with its key to
//! the [`Undelivered`] owner, except the giving task's own when it is still there to get the
//! error. The outbox is bounded: with [`LIMIT`] messages waiting, a message is refused with
//! [`Error::Backlog`].

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::{Error, Socket, Unsent};

/// The most messages an outbox holds; beyond, a message is refused ([`Error::Backlog`]).
pub const LIMIT: usize = 1024;
/// How many waiting messages make a burst, which the task of the last one hands over.
pub const BURST: usize = 16;
/// How many messages must be in flight (sent, not yet answered) for a burst to be worth
/// gathering: below, a message goes straight to the socket when nothing waits before it.
pub const GATHER_FROM: usize = 32;

/// Who hears of a message of key `K` that could not be sent, once its task has gone on.
pub trait Undelivered<K>: Send + Sync + 'static {
    /// The message of `key` was not sent, because of `error`.
    fn undelivered(&self, key: K, error: Error);
}

/// One message waiting: its key (what the owner knows it by), its socket and its frames.
struct Queued<K> {
    key: K,
    socket: Socket,
    frames: Vec<Bytes>,
}

/// What waits, and whether the socket had no room (a task then sends what waits, in order).
struct Waiting<K> {
    queue: Vec<Queued<K>>,
    stalled: bool,
}

/// Messages on their way out, gathered into bursts (see the module documentation).
pub struct Outbox<K> {
    waiting: Mutex<Waiting<K>>,
    /// Held while messages are offered to the socket, so that they go in order.
    handing_over: Mutex<()>,
}

impl<K> Default for Outbox<K> {
    fn default() -> Self {
        Outbox {
            waiting: Mutex::new(Waiting {
                queue: Vec::new(),
                stalled: false,
            }),
            handing_over: Mutex::new(()),
        }
    }
}

impl<K> std::fmt::Debug for Outbox<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.waiting.lock().map_or(0, |w| w.queue.len());
        f.debug_struct("Outbox").field("waiting", &waiting).finish()
    }
}

/// What became of a message given to the outbox.
enum Pushed<K> {
    /// Nothing waits before it and it is not worth gathering: it goes now.
    Straight(Queued<K>),
    /// Queued, into an empty outbox: a flush must start.
    Flush,
    /// Queued behind others; a flush (or the stalled sender) will take it.
    Queued,
    /// Queued, completing a burst: the giving task hands over what waits.
    Burst,
    /// The outbox is full.
    Backlog(Queued<K>),
}

impl<K: Copy + PartialEq + Send + 'static> Outbox<K> {
    /// Sends `frames` on `socket` through the outbox (straight when fewer than
    /// [`GATHER_FROM`] messages are `in_flight` and nothing waits). An error returned is this
    /// message's, met before this returns; one met later goes to `owner` with `key`.
    pub async fn send<O: Undelivered<K>>(
        self: &Arc<Self>,
        key: K,
        socket: &Socket,
        frames: Vec<Bytes>,
        owner: &Arc<O>,
        in_flight: usize,
    ) -> Result<(), Error> {
        let queued = Queued {
            key,
            socket: socket.clone(),
            frames,
        };
        match self.push(queued, in_flight >= GATHER_FROM) {
            Pushed::Queued => Ok(()),
            Pushed::Flush => {
                let (outbox, owner) = (self.clone(), owner.clone());
                tokio::spawn(async move {
                    Requeue(false).await;
                    // No task waits on these: every error goes to the owner.
                    let _ = outbox.hand_over(None, &owner);
                });
                Ok(())
            }
            Pushed::Burst => self.hand_over(Some(key), owner),
            Pushed::Straight(queued) => self.straight(queued).await,
            Pushed::Backlog(queued) => Err(Error::Backlog {
                address: queued.socket.address(),
                waiting: LIMIT,
            }),
        }
    }

    fn push(&self, message: Queued<K>, gather: bool) -> Pushed<K> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if !gather && !waiting.stalled && waiting.queue.is_empty() {
            return Pushed::Straight(message);
        }
        if waiting.queue.len() >= LIMIT {
            return Pushed::Backlog(message);
        }
        waiting.queue.push(message);
        if waiting.stalled {
            return Pushed::Queued;
        }
        match waiting.queue.len() {
            1 => Pushed::Flush,
            BURST.. => Pushed::Burst,
            _ => Pushed::Queued,
        }
    }

    /// Sends a message that found nothing waiting before it, after any hand-over in progress;
    /// if the outbox stalled meanwhile, it queues behind what waits.
    async fn straight(&self, message: Queued<K>) -> Result<(), Error> {
        let unsent = {
            let _order = self.handing_over.lock().unwrap_or_else(|e| e.into_inner());
            {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                if waiting.stalled || !waiting.queue.is_empty() {
                    // Behind others: the flush started for the first of them (or the stalled
                    // sender) takes it too.
                    waiting.queue.push(message);
                    return Ok(());
                }
            }
            match message.socket.try_send(message.frames)? {
                None => return Ok(()),
                Some(unsent) => unsent,
            }
        };
        // This task waits for room itself, as a send always did.
        let deadline = message.socket.send_timeout();
        message.socket.send_unsent(unsent, deadline).await
    }

    /// Offers what waits to the socket, in order, without waiting. When the socket has no
    /// room, the outbox stalls and a task sends the rest as room comes. An error for `own` is
    /// returned; others go to `owner`.
    fn hand_over<O: Undelivered<K>>(
        self: &Arc<Self>,
        own: Option<K>,
        owner: &Arc<O>,
    ) -> Result<(), Error> {
        let _order = self.handing_over.lock().unwrap_or_else(|e| e.into_inner());
        let taken = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.stalled {
                // The stalled sender takes it all, in order.
                return Ok(());
            }
            std::mem::take(&mut waiting.queue)
        };
        let mut result = Ok(());
        let mut taken = taken.into_iter();
        while let Some(message) = taken.next() {
            match message.socket.try_send(message.frames) {
                Ok(None) => {}
                Ok(Some(unsent)) => {
                    self.stall(message.key, message.socket, unsent, taken.collect(), owner);
                    break;
                }
                Err(error) if own == Some(message.key) => result = Err(error),
                Err(error) => owner.undelivered(message.key, error),
            }
        }
        result
    }

    /// The socket had no room for `unsent` (of `key`): it and `rest` wait before everything
    /// queued since, and a task sends them all, in order, as room comes.
    fn stall<O: Undelivered<K>>(
        self: &Arc<Self>,
        key: K,
        socket: Socket,
        unsent: Unsent,
        rest: Vec<Queued<K>>,
        owner: &Arc<O>,
    ) {
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.stalled = true;
            let later = std::mem::replace(&mut waiting.queue, rest);
            waiting.queue.extend(later);
        }
        let (outbox, owner) = (self.clone(), owner.clone());
        tokio::spawn(async move {
            let deadline = socket.send_timeout();
            if let Err(error) = socket.send_unsent(unsent, deadline).await {
                owner.undelivered(key, error);
            }
            loop {
                let taken = {
                    let mut waiting = outbox.waiting.lock().unwrap_or_else(|e| e.into_inner());
                    if waiting.queue.is_empty() {
                        waiting.stalled = false;
                        return;
                    }
                    std::mem::take(&mut waiting.queue)
                };
                for message in taken {
                    if let Err(error) = message.socket.send(message.frames).await {
                        owner.undelivered(message.key, error);
                    }
                }
            }
        });
    }
}

/// Goes to the back of its thread's run queue once, behind the tasks ready to run now.
/// (`tokio::task::yield_now` defers the task until the thread has nothing else to do, which
/// can be a wake-up of another thread away: a call that was alone waited a tenth of a
/// millisecond for its flush.)
struct Requeue(bool);

impl std::future::Future for Requeue {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(key: u64, socket: &Socket) -> Queued<u64> {
        Queued {
            key,
            socket: socket.clone(),
            frames: vec![Bytes::from(key.to_string())],
        }
    }

    fn waiting_keys(outbox: &Outbox<u64>) -> Vec<u64> {
        let waiting = outbox.waiting.lock().expect("a lock");
        waiting.queue.iter().map(|q| q.key).collect()
    }

    #[tokio::test]
    async fn the_first_message_starts_a_flush_and_the_sixteenth_a_burst() {
        let socket = Socket::new(crate::Kind::Dealer, &Default::default()).expect("a socket");
        let outbox = Outbox::default();
        assert!(matches!(
            outbox.push(queued(0, &socket), true),
            Pushed::Flush
        ));
        for key in 1..BURST as u64 - 1 {
            assert!(matches!(
                outbox.push(queued(key, &socket), true),
                Pushed::Queued
            ));
        }
        assert!(matches!(
            outbox.push(queued(BURST as u64 - 1, &socket), true),
            Pushed::Burst
        ));
        assert_eq!(waiting_keys(&outbox), (0..BURST as u64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_message_goes_straight_only_when_nothing_waits_before_it() {
        let socket = Socket::new(crate::Kind::Dealer, &Default::default()).expect("a socket");
        let outbox = Outbox::default();
        assert!(matches!(
            outbox.push(queued(0, &socket), false),
            Pushed::Straight(_)
        ));
        assert!(matches!(
            outbox.push(queued(1, &socket), true),
            Pushed::Flush
        ));
        assert!(matches!(
            outbox.push(queued(2, &socket), false),
            Pushed::Queued
        ));
        outbox.waiting.lock().expect("a lock").stalled = true;
        outbox.waiting.lock().expect("a lock").queue.clear();
        assert!(matches!(
            outbox.push(queued(3, &socket), false),
            Pushed::Queued
        ));
        assert_eq!(waiting_keys(&outbox), [3]);
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_a_message() {
        let socket = Socket::new(crate::Kind::Dealer, &Default::default()).expect("a socket");
        let (outbox, owner) = (Arc::new(Outbox::default()), Arc::new(Owner::default()));
        outbox
            .waiting
            .lock()
            .expect("a lock")
            .queue
            .extend((0..LIMIT as u64).map(|key| queued(key, &socket)));
        let refused = outbox
            .send(LIMIT as u64, &socket, vec![Bytes::from("x")], &owner, 0)
            .await;
        assert!(
            matches!(refused, Err(Error::Backlog { waiting: LIMIT, .. })),
            "{refused:?}"
        );
    }

    /// Records what it is told.
    #[derive(Default)]
    struct Owner(Mutex<Vec<u64>>);

    impl Undelivered<u64> for Owner {
        fn undelivered(&self, key: u64, _error: Error) {
            self.0.lock().expect("a lock").push(key);
        }
    }

    #[tokio::test]
    async fn a_message_that_cannot_be_sent_is_reported_to_its_owner_or_its_task() {
        let socket = Socket::new(crate::Kind::Dealer, &Default::default()).expect("a socket");
        let closed = socket.clone();
        socket.close().await;
        let (outbox, owner) = (Arc::new(Outbox::default()), Arc::new(Owner::default()));
        // The first starts a flush; the burst's last task gets its own error back.
        for key in 0..BURST as u64 - 1 {
            outbox
                .send(key, &closed, vec![Bytes::from("x")], &owner, GATHER_FROM)
                .await
                .expect("queued");
        }
        let last = BURST as u64 - 1;
        let own = outbox
            .send(last, &closed, vec![Bytes::from("x")], &owner, GATHER_FROM)
            .await;
        assert!(own.is_err(), "the burst's own message failed: {own:?}");
        assert_eq!(
            *owner.0.lock().expect("a lock"),
            (0..last).collect::<Vec<_>>()
        );
        // One more goes through the flush task, whose errors all go to the owner.
        outbox
            .send(99, &closed, vec![Bytes::from("x")], &owner, GATHER_FROM)
            .await
            .expect("queued");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while owner.0.lock().expect("a lock").last() != Some(&99) {
            assert!(
                std::time::Instant::now() < deadline,
                "the flush reported it"
            );
            tokio::task::yield_now().await;
        }
    }

    /// A peer that reads nothing for a while: the socket's queue fills, the outbox stalls,
    /// messages given meanwhile (gathered or not) queue behind, and once the peer reads, every
    /// message arrives once and in the order it was given.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_arrive_in_order_through_a_stall() {
        use crate::{Kind, Options};
        const SIZE: usize = 64 * 1024;
        const AT_MOST: u64 = 1_000;
        let small = Options {
            send_hwm: 2,
            recv_hwm: 2,
            ..Options::default()
        };
        let server = Socket::new(Kind::Router, &small).expect("a socket");
        let address = server.bind("tcp://127.0.0.1:0").await.expect("binds");
        let client = Socket::new(Kind::Dealer, &small).expect("a socket");
        client.connect(&address).await.expect("connects");
        client.send(vec![Bytes::from("hello")]).await.expect("sent");
        let hello = server.recv().await.expect("hello");
        assert_eq!(hello[1], Bytes::from("hello"));
        let (outbox, owner) = (Arc::new(Outbox::default()), Arc::new(Owner::default()));
        let message = |key: u64| {
            let mut frame = key.to_be_bytes().to_vec();
            frame.resize(SIZE, 0);
            vec![Bytes::from(frame)]
        };
        let stalled = || outbox.waiting.lock().expect("a lock").stalled;
        // Gathered, while the server reads nothing, until the socket has no room.
        let mut given = 0u64;
        while !stalled() {
            assert!(given < AT_MOST, "the socket never filled");
            outbox
                .send(given, &client, message(given), &owner, GATHER_FROM)
                .await
                .expect("given");
            given += 1;
            tokio::task::yield_now().await;
        }
        // Then some that would go straight: they queue behind the stall.
        for _ in 0..50 {
            outbox
                .send(given, &client, message(given), &owner, 0)
                .await
                .expect("given");
            given += 1;
        }
        let mut next = 0u64;
        while next < given {
            let frames = tokio::time::timeout(std::time::Duration::from_secs(10), server.recv())
                .await
                .expect("every message arrives")
                .expect("received");
            let key = frames[1]
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            assert_eq!(key, Some(next), "in order");
            next += 1;
        }
        assert!(owner.0.lock().expect("a lock").is_empty(), "nothing lost");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while stalled() {
            assert!(std::time::Instant::now() < deadline, "the stall ends");
            tokio::task::yield_now().await;
        }
    }
}
