//! Messages of many tasks handed to their socket in bursts.
//!
//! When many tasks share a socket and each gives it its own message, the socket's connection
//! task is woken by the first one and, scheduled next on the same thread, writes it alone: a
//! client with 100 calls in flight wrote one or two requests per system call, where its server,
//! answering from one loop, wrote twenty-seven answers in one. An [`Outbox`] gathers the
//! messages instead, and they leave together:
//!
//! - the task whose message completes a burst of [`BURST`] hands the whole burst to the socket
//!   at once, without waiting (nothing that a task which gives up could interrupt);
//! - the message that finds the outbox empty starts a flush, a task of its own that yields
//!   once (so that the tasks ready to run add theirs) and hands over what is left, so that no
//!   message waits for a burst that does not come, and none is stranded by a task that gives up;
//! - a message that finds no room in the socket's queue goes on in a task that waits for room
//!   up to the socket's send timeout.
//!
//! Either way the connection task is woken once and writes the burst in one go. Gathering
//! pays only when many messages are in flight: below [`GATHER_FROM`] (the caller says how many
//! it has), a message goes straight to the socket, so that a lone call does not wait for a
//! flush (one at a time, the flush cost a call two and a half times its latency). A message that
//! cannot be sent is reported with its key to the [`Undelivered`] owner, except the sending
//! task's own when it is still there to get the error. The outbox is bounded: past [`LIMIT`]
//! waiting messages, a task sends its own directly.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::{Error, Socket, Unsent};

/// The most messages an outbox holds; beyond, tasks send their own.
pub const LIMIT: usize = 1024;
/// How many waiting messages the task of the last one hands to the socket itself.
pub const BURST: usize = 16;
/// How many messages must be in flight (sent, not yet answered) for a burst to be worth
/// gathering: below, a message goes straight to the socket.
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

/// Messages on their way out, gathered into bursts (see the module documentation).
pub struct Outbox<K> {
    queue: Mutex<Vec<Queued<K>>>,
}

impl<K> Default for Outbox<K> {
    fn default() -> Self {
        Outbox {
            queue: Mutex::new(Vec::new()),
        }
    }
}

impl<K> std::fmt::Debug for Outbox<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.queue.lock().map_or(0, |queue| queue.len());
        f.debug_struct("Outbox").field("waiting", &waiting).finish()
    }
}

/// What became of a message given to the outbox.
enum Pushed<K> {
    /// Queued, into an empty outbox: a flush must start.
    Flush,
    /// Queued behind others; a flush is on its way.
    Queued,
    /// Queued, completing a burst: these (the message among them) go now.
    Burst(Vec<Queued<K>>),
    /// The outbox is full: the message goes on its own.
    Full(Queued<K>),
}

impl<K: Copy + PartialEq + Send + 'static> Outbox<K> {
    /// Sends `frames` on `socket` through the outbox, or straight when fewer than
    /// [`GATHER_FROM`] messages are `in_flight`. An error returned is this message's, met
    /// before this returns; one met later goes to `owner` with `key`.
    pub async fn send<O: Undelivered<K>>(
        self: &Arc<Self>,
        key: K,
        socket: &Socket,
        frames: Vec<Bytes>,
        owner: &Arc<O>,
        in_flight: usize,
    ) -> Result<(), Error> {
        if in_flight < GATHER_FROM {
            return socket.send(frames).await;
        }
        let queued = Queued {
            key,
            socket: socket.clone(),
            frames,
        };
        match self.push(queued) {
            Pushed::Queued => Ok(()),
            Pushed::Flush => {
                let (outbox, owner) = (self.clone(), owner.clone());
                tokio::spawn(async move {
                    Requeue(false).await;
                    let left = outbox.take();
                    // No task waits on these: every error goes to the owner.
                    let _ = hand_over(left, None, &owner);
                });
                Ok(())
            }
            Pushed::Burst(burst) => hand_over(burst, Some(key), owner),
            Pushed::Full(queued) => queued.socket.send(queued.frames).await,
        }
    }

    fn push(&self, message: Queued<K>) -> Pushed<K> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= LIMIT {
            return Pushed::Full(message);
        }
        queue.push(message);
        match queue.len() {
            1 => Pushed::Flush,
            BURST.. => Pushed::Burst(std::mem::take(&mut *queue)),
            _ => Pushed::Queued,
        }
    }

    fn take(&self) -> Vec<Queued<K>> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
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

/// Hands `messages` to their sockets without waiting. One that finds no room goes on in a task
/// that waits for it; one that cannot be sent is reported to `owner`, or, for key `own`,
/// returned.
fn hand_over<K: Copy + PartialEq + Send + 'static, O: Undelivered<K>>(
    messages: Vec<Queued<K>>,
    own: Option<K>,
    owner: &Arc<O>,
) -> Result<(), Error> {
    let mut result = Ok(());
    let mut waiting: Vec<(K, Socket, Unsent)> = Vec::new();
    for message in messages {
        match message.socket.try_send(message.frames) {
            Ok(None) => {}
            Ok(Some(unsent)) => waiting.push((message.key, message.socket, unsent)),
            Err(error) if own == Some(message.key) => result = Err(error),
            Err(error) => owner.undelivered(message.key, error),
        }
    }
    if !waiting.is_empty() {
        let owner = owner.clone();
        tokio::spawn(async move {
            for (key, socket, unsent) in waiting {
                let deadline = socket.send_timeout();
                if let Err(error) = socket.send_unsent(unsent, deadline).await {
                    owner.undelivered(key, error);
                }
            }
        });
    }
    result
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

    fn keys(queued: &[Queued<u64>]) -> Vec<u64> {
        queued.iter().map(|q| q.key).collect()
    }

    #[tokio::test]
    async fn the_first_message_starts_a_flush_and_a_burst_goes_with_its_last() {
        let socket = Socket::new(crate::Kind::Dealer, &Default::default()).expect("a socket");
        let outbox = Outbox::default();
        assert!(matches!(outbox.push(queued(0, &socket)), Pushed::Flush));
        for key in 1..BURST as u64 - 1 {
            assert!(matches!(outbox.push(queued(key, &socket)), Pushed::Queued));
        }
        match outbox.push(queued(BURST as u64 - 1, &socket)) {
            Pushed::Burst(burst) => {
                assert_eq!(
                    keys(&burst),
                    (0..BURST as u64).collect::<Vec<_>>(),
                    "in order"
                )
            }
            _ => panic!("the last of a burst sends it"),
        }
        assert!(outbox.take().is_empty());
        assert!(matches!(outbox.push(queued(7, &socket)), Pushed::Flush));
        assert!(matches!(outbox.push(queued(8, &socket)), Pushed::Queued));
        assert_eq!(keys(&outbox.take()), [7, 8]);
    }

    #[tokio::test]
    async fn a_full_outbox_gives_the_message_back() {
        let socket = Socket::new(crate::Kind::Dealer, &Default::default()).expect("a socket");
        let outbox = Outbox::default();
        outbox
            .queue
            .lock()
            .expect("a lock")
            .extend((0..LIMIT as u64).map(|key| queued(key, &socket)));
        match outbox.push(queued(LIMIT as u64, &socket)) {
            Pushed::Full(back) => assert_eq!(back.key, LIMIT as u64),
            _ => panic!("a full outbox takes no more"),
        }
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
}
