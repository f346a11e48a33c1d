//! Requests on their way to an instance, handed to the socket in bursts.
//!
//! Every call runs in its caller's task, and each used to give its request to the socket
//! itself. The socket's connection task, woken by the first request, is scheduled next on the
//! same thread and writes that one alone: with 100 calls in flight, a write to the instance
//! carried about two requests, where one of the instance's answers carried twenty-seven. Here
//! a request joins its instance's outbox instead, and leaves with others: the caller whose
//! request makes [`BURST`] hands them all to the socket at once, without waiting (nothing a
//! caller that gives up could interrupt); the request that finds the outbox empty starts a
//! flush, a task that yields once (so that the callers ready to run queue theirs) and then
//! hands over what is left, so that no request waits for a burst that does not come. Either
//! way the connection task is woken once and writes the burst in one go.
//!
//! The outbox is bounded: past [`LIMIT`] queued requests a caller sends its own directly.

use std::sync::Mutex;

use bytes::Bytes;
use rylm_transport::Socket;

/// The most requests an outbox holds; beyond, callers send their own.
pub(crate) const LIMIT: usize = 1024;
/// How many queued requests the caller of the last one hands to the socket itself.
pub(crate) const BURST: usize = 16;

/// One request waiting: the call it belongs to, the socket it goes on and its frames.
pub(crate) struct Queued {
    pub call: u64,
    pub socket: Socket,
    pub frames: Vec<Bytes>,
}

/// The requests waiting for one instance's next flush.
#[derive(Default)]
pub(crate) struct Outbox {
    queue: Mutex<Vec<Queued>>,
}

/// What became of a request given to [`Outbox::push`].
pub(crate) enum Pushed {
    /// Queued; the caller must start a flush (the outbox was empty).
    Flush,
    /// Queued behind others; a flush is on its way.
    Queued,
    /// Queued, and the outbox held a burst: the caller sends these (its own among them) now.
    Burst(Vec<Queued>),
    /// The outbox is full: the caller sends this itself.
    Full(Queued),
}

impl Outbox {
    /// Queues `request`.
    pub(crate) fn push(&self, request: Queued) -> Pushed {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= LIMIT {
            return Pushed::Full(request);
        }
        queue.push(request);
        match queue.len() {
            1 => Pushed::Flush,
            BURST.. => Pushed::Burst(std::mem::take(&mut *queue)),
            _ => Pushed::Queued,
        }
    }

    /// Everything queued, oldest first; the outbox is empty after.
    pub(crate) fn take(&self) -> Vec<Queued> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(call: u64, socket: &Socket) -> Queued {
        Queued {
            call,
            socket: socket.clone(),
            frames: vec![Bytes::from(call.to_string())],
        }
    }

    fn calls(queued: &[Queued]) -> Vec<u64> {
        queued.iter().map(|q| q.call).collect()
    }

    #[tokio::test]
    async fn the_first_request_starts_a_flush_and_a_burst_goes_with_its_last() {
        let socket =
            Socket::new(rylm_transport::Kind::Dealer, &Default::default()).expect("a socket");
        let outbox = Outbox::default();
        assert!(matches!(outbox.push(request(0, &socket)), Pushed::Flush));
        for call in 1..BURST as u64 - 1 {
            assert!(matches!(
                outbox.push(request(call, &socket)),
                Pushed::Queued
            ));
        }
        match outbox.push(request(BURST as u64 - 1, &socket)) {
            Pushed::Burst(burst) => {
                assert_eq!(
                    calls(&burst),
                    (0..BURST as u64).collect::<Vec<_>>(),
                    "in order"
                )
            }
            _ => panic!("the last of a burst sends it"),
        }
        assert!(outbox.take().is_empty());
        assert!(matches!(outbox.push(request(7, &socket)), Pushed::Flush));
        assert!(matches!(outbox.push(request(8, &socket)), Pushed::Queued));
        assert_eq!(calls(&outbox.take()), [7, 8]);
    }

    #[tokio::test]
    async fn a_full_outbox_gives_the_request_back() {
        let socket =
            Socket::new(rylm_transport::Kind::Dealer, &Default::default()).expect("a socket");
        let outbox = Outbox::default();
        outbox
            .queue
            .lock()
            .expect("a lock")
            .extend((0..LIMIT as u64).map(|call| request(call, &socket)));
        match outbox.push(request(LIMIT as u64, &socket)) {
            Pushed::Full(back) => assert_eq!(back.call, LIMIT as u64),
            _ => panic!("a full outbox takes no more"),
        }
    }
}
