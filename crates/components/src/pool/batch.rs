//! Bodies packed into batches, `[MARKER, body, body, ...]`, within a number of bodies and a
//! number of bytes: what the pool sends a worker in one pass, what it sends a caller from one
//! burst, and what a worker answers from one burst are all packed the same way.

use bytes::Bytes;

/// A batch being filled.
pub(crate) struct Packer {
    /// The most bodies a batch carries.
    most: usize,
    /// The most bytes of bodies a batch carries (one body larger than that goes alone).
    limit: usize,
    frames: Vec<Bytes>,
    bytes: usize,
}

impl Packer {
    /// Batches of at most `most` bodies and `limit` bytes of bodies.
    pub(crate) fn new(most: usize, limit: usize) -> Packer {
        Packer {
            most,
            limit,
            frames: vec![Bytes::from_static(&rylm_message::MARKER)],
            bytes: 0,
        }
    }

    /// Adds `body`; a batch that is full now, if any: the one before, when `body` would take it
    /// over `limit` (`body` starts the next), or this one, when it reaches `most` with `body`.
    pub(crate) fn push(&mut self, body: Bytes) -> Option<Vec<Bytes>> {
        let over = self.frames.len() > 1 && self.bytes + body.len() > self.limit;
        let full = over.then(|| self.take());
        self.bytes += body.len();
        self.frames.push(body);
        if full.is_some() {
            return full;
        }
        (self.frames.len() > self.most).then(|| self.take())
    }

    /// The batch being filled, if it holds a body; the packer is empty after.
    pub(crate) fn finish(&mut self) -> Option<Vec<Bytes>> {
        (self.frames.len() > 1).then(|| self.take())
    }

    fn take(&mut self) -> Vec<Bytes> {
        self.bytes = 0;
        std::mem::replace(
            &mut self.frames,
            vec![Bytes::from_static(&rylm_message::MARKER)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(batches: &[Vec<Bytes>]) -> Vec<usize> {
        batches.iter().map(|b| b.len() - 1).collect()
    }

    #[test]
    fn batches_close_at_their_number_of_bodies_or_before_their_bytes() {
        let mut packer = Packer::new(3, 10);
        let mut out = Vec::new();
        for size in [2, 2, 2, 2, 5, 4, 9, 1] {
            out.extend(packer.push(Bytes::from(vec![0u8; size])));
        }
        out.extend(packer.finish());
        // 3 bodies; then 2+5 (4 more would pass 10); then 4 (9 more would); then 9+1.
        assert_eq!(sizes(&out), [3, 2, 1, 2]);
        assert!(out.iter().all(|b| b[0][..] == rylm_message::MARKER));
        assert!(packer.finish().is_none(), "empty after");
    }
}
