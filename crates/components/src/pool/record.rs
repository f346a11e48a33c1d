//! The pool's records: what it keeps of each worker, each dispatch and each request waiting
//! for a credit, and the dispatch id that ties a worker's answer to its request.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rylm_message::{Codec, Forward, Message};

use super::DISPATCH;

pub(super) struct WorkerState {
    pub(super) credits: usize,
    pub(super) holds: HashSet<DispatchId>,
    pub(super) once: HashSet<String>,
    pub(super) last_seen: Instant,
    /// How many messages it takes in one batch (1: one at a time).
    pub(super) batch: usize,
}

/// A dispatch's id: its number in the pool that made it and a keyed hash of that number, so
/// that a peer cannot guess another's. On the wire (header [`DISPATCH`]) `{number:x}.{tag:016x}`;
/// kept as two numbers, so that the pool's bookkeeping hashes and copies no string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct DispatchId {
    pub(super) number: u64,
    pub(super) tag: u64,
}

impl DispatchId {
    /// Reads an id as it came back from a worker; `None` for what no pool writes.
    pub(super) fn parse(text: &str) -> Option<DispatchId> {
        let (number, tag) = text.split_once('.')?;
        Some(DispatchId {
            number: u64::from_str_radix(number, 16).ok()?,
            tag: u64::from_str_radix(tag, 16).ok()?,
        })
    }

    /// Writes the id as it goes on the wire into `out`.
    pub(super) fn write(self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(out, "{:x}.{:016x}", self.number, self.tag);
    }
}

/// Sets header `name` to what `write` writes, in place when the message has it already (a
/// caller's deadline, a re-dispatch's stamp): no allocation then.
pub(super) fn set_header(message: &mut Message, name: &str, write: impl FnOnce(&mut String)) {
    match message.headers.get_mut(name) {
        Some(value) => {
            value.clear();
            write(value);
        }
        None => {
            let mut value = String::new();
            write(&mut value);
            message.headers.insert(name.to_owned(), value);
        }
    }
}

/// The workers a dispatch was sent to, in turn (at most two: one that dies holding it makes it
/// go to one other). The first is kept in place, so a dispatch allocates nothing for it.
#[derive(Default)]
pub(super) struct Holders {
    pub(super) first: Option<Bytes>,
    pub(super) others: Vec<Bytes>,
}

impl Holders {
    pub(super) fn push(&mut self, worker: Bytes) {
        match self.first {
            None => self.first = Some(worker),
            Some(_) => self.others.push(worker),
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.first.iter().chain(&self.others)
    }

    pub(super) fn contains(&self, worker: &[u8]) -> bool {
        self.iter().any(|w| w == worker)
    }

    pub(super) fn len(&self) -> usize {
        self.iter().count()
    }
}

/// A caller's request as the pool keeps it: decoded, or (passed on as it came) its body and a
/// message that holds only its caller.
pub(super) struct Request {
    pub(super) message: Message,
    pub(super) forward: Option<Forward>,
    /// Its caller reads answers in batches (the request carries [`BATCH`](super::BATCH)).
    pub(super) batches: bool,
}

impl Request {
    /// The whole message: an error answer to it is made from this (rare: a request passed on
    /// as it came is decoded only then).
    pub(super) fn full(&self) -> Message {
        let Some(forward) = &self.forward else {
            return self.message.clone();
        };
        match forward.decode() {
            Ok(mut message) => {
                message.client.clone_from(&self.message.client);
                message
            }
            Err(_) => self.message.clone(),
        }
    }
}

/// A message some worker holds (or held, and will be sent to another).
pub(super) struct Dispatched {
    pub(super) request: Request,
    /// The workers it was sent to, in turn: an answer from any of them is taken.
    pub(super) holders: Holders,
    pub(super) deadline: Instant,
}

/// A message waiting for a credit.
#[expect(
    clippy::large_enum_variant,
    reason = "the line holds fresh requests mostly; a box for each would cost an allocation per call"
)]
pub(super) enum Queued {
    /// Not sent yet.
    Fresh(Request, Instant),
    /// Sent to a worker that was buried; to go to another.
    Again(DispatchId),
}

/// The frames of `request` for a worker: stamped with dispatch `id` and the `remaining` time.
/// A request kept as it came goes on with its body's headers set; a decoded one is stamped in
/// place (no copy of the message: a re-dispatch stamps it again, and answers made from it drop
/// the stamp, see `failure`) and encoded.
pub(super) fn stamped(
    codec: &dyn Codec,
    request: &mut Request,
    id: DispatchId,
    remaining: Duration,
) -> Result<Vec<Bytes>, rylm_message::Error> {
    use std::fmt::Write;
    let millis = remaining.as_millis().max(1);
    if let Some(forward) = &request.forward {
        let mut dispatch = String::with_capacity(36);
        id.write(&mut dispatch);
        let deadline = millis.to_string();
        let body = forward.with_headers(&[
            (DISPATCH, dispatch.as_str()),
            (crate::DEADLINE, deadline.as_str()),
        ])?;
        return Ok(vec![Bytes::from_static(&rylm_message::MARKER), body]);
    }
    let message = &mut request.message;
    set_header(message, DISPATCH, |value| id.write(value));
    set_header(message, crate::DEADLINE, |value| {
        let _ = write!(value, "{millis}");
    });
    codec.encode_frames(message)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rylm_message::NativeCodec;

    use super::*;
    use crate::pool::{Heartbeat, Pool};

    #[test]
    fn a_dispatch_id_reads_back_as_written_and_nothing_else_reads() {
        let mut pool = Pool::new(
            Arc::new(NativeCodec::default()),
            Heartbeat::default(),
            Arc::new(|_: &Message| String::new()),
        );
        let (first, second) = (pool.next_dispatch(), pool.next_dispatch());
        assert_ne!(
            first.tag, second.tag,
            "the tags are keyed hashes, not a count"
        );
        let mut text = String::new();
        second.write(&mut text);
        assert_eq!(text, format!("2.{:016x}", second.tag));
        assert_eq!(DispatchId::parse(&text), Some(second));
        for garbage in ["", "2", "2.", ".1", "x.1", "2.1.1", "ffffffffffffffffff.1"] {
            assert_eq!(DispatchId::parse(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn a_stamp_overwrites_a_header_in_place_or_adds_it() {
        let mut message = Message::call("f", Bytes::new()).with_header(crate::DEADLINE, "30000");
        set_header(&mut message, crate::DEADLINE, |v| v.push_str("29998"));
        set_header(&mut message, DISPATCH, |v| v.push_str("1.00"));
        assert_eq!(message.header(crate::DEADLINE), Some("29998"));
        assert_eq!(message.header(DISPATCH), Some("1.00"));
        assert_eq!(message.headers.len(), 2);
    }
}
