//! Call ids and the pending map's hasher: each call of a client is a number, on the wire the
//! client's random prefix and the number in hex, so that the replay guards of the services see
//! ids unique per client, and the pending map hashes numbers this client counted itself.

use std::sync::atomic::{AtomicU64, Ordering};

/// Hashes call numbers, which this client counts itself (a peer cannot choose the keys of
/// the pending map), by one multiplication.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(super) type BuildIdHasher = std::hash::BuildHasherDefault<IdHasher>;

/// Call ids: unique per client (a random prefix, then a counter), which is what the services'
/// replay guards need; cheaper than a random id per call.
pub(super) struct Ids {
    pub(super) prefix: String,
    pub(super) counter: AtomicU64,
}

/// The longest id [`Ids`] writes: a uuid, a dash and 16 hex digits.
pub(super) const ID_CAPACITY: usize = 64;

/// An id as text, on the stack.
pub(super) struct IdText {
    pub(super) bytes: [u8; ID_CAPACITY],
    pub(super) len: usize,
}

impl IdText {
    pub(super) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl Ids {
    pub(super) fn new() -> Ids {
        let mut prefix = rylm_message::new_id();
        prefix.truncate(ID_CAPACITY - 17);
        Ids {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    /// The next call's number; [`Ids::text`] gives the id on the wire.
    pub(super) fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// The id of call `n`: the prefix, a dash, `n` in hex without leading zeros.
    pub(super) fn text(&self, n: u64) -> IdText {
        let mut text = IdText {
            bytes: [0; ID_CAPACITY],
            len: self.prefix.len() + 1,
        };
        text.bytes[..self.prefix.len()].copy_from_slice(self.prefix.as_bytes());
        text.bytes[self.prefix.len()] = b'-';
        let digits = 16 - (n.leading_zeros() as usize / 4).min(15);
        for shift in (0..digits).rev() {
            text.bytes[text.len] = b"0123456789abcdef"[((n >> (shift * 4)) & 0xf) as usize];
            text.len += 1;
        }
        text
    }

    /// The number of a call of this client from its id on the wire (None for any other id,
    /// and for ids not written as [`Ids::text`] writes them).
    pub(super) fn parse(&self, id: &str) -> Option<u64> {
        let digits = id.strip_prefix(self.prefix.as_str())?.strip_prefix('-')?;
        if digits.is_empty() || digits.len() > 16 || (digits.len() > 1 && digits.starts_with('0')) {
            return None;
        }
        digits.bytes().try_fold(0u64, |n, digit| {
            let value = match digit {
                b'0'..=b'9' => digit - b'0',
                b'a'..=b'f' => digit - b'a' + 10,
                _ => return None,
            };
            Some((n << 4) | u64::from(value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Ids;

    #[test]
    fn ids_are_the_prefix_and_a_hex_counter() {
        let ids = Ids::new();
        let first = ids.next();
        assert_eq!(ids.text(first).as_str(), format!("{}-0", ids.prefix));
        for expected in 1..=300u64 {
            let n = ids.next();
            let text = ids.text(n);
            assert_eq!(text.as_str(), format!("{}-{expected:x}", ids.prefix));
            assert_eq!(ids.parse(text.as_str()), Some(expected));
        }
        ids.counter
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        let last = ids.text(ids.next());
        assert_eq!(last.as_str(), format!("{}-ffffffffffffffff", ids.prefix));
        assert_eq!(ids.parse(last.as_str()), Some(u64::MAX));
        // Two clients never share a prefix.
        assert_ne!(Ids::new().prefix, ids.prefix);
    }

    #[test]
    fn only_this_clients_ids_in_their_own_spelling_parse() {
        let ids = Ids::new();
        let other = Ids::new();
        assert_eq!(ids.parse(other.text(5).as_str()), None);
        for foreign in ["", "-1", "x", "1"] {
            assert_eq!(ids.parse(foreign), None, "{foreign:?}");
        }
        for spelling in ["", "05", "A", "g", "10000000000000000", "+1"] {
            let id = format!("{}-{spelling}", ids.prefix);
            assert_eq!(ids.parse(&id), None, "{id}");
        }
        assert_eq!(ids.parse(&format!("{}-0", ids.prefix)), Some(0));
    }
}
