//! W3C trace context (`traceparent`) as plain data: the header that lets the spans of one
//! request join up across processes and protocols. rylm carries it under the header name
//! [`TRACEPARENT`] in every envelope it forwards; this module reads, checks, writes and derives
//! it. No I/O.
//!
//! The format (version `00`): `00-<trace id: 32 hex>-<parent id: 16 hex>-<flags: 2 hex>`,
//! lower case; an all-zero trace or parent id is invalid, and so is version `ff`. A later
//! version is read by its first four fields, as the specification asks.
//!
//! [`Hop`] is one process's part of a traced request: the trace it continues (or starts), its
//! own span id, and the `traceparent` it passes on; [`Hop::span`] opens the one span shape every
//! rylm server records (fields `trace_id`, `span_id`, `parent_id`, `otel.name`), which the
//! exporter of `rylm-admin` sends on as OpenTelemetry spans. Ids come from a per-thread
//! generator seeded from the operating system's randomness, so a hop costs no system call.

/// The header (and envelope header) name.
pub const TRACEPARENT: &str = "traceparent";

/// One `traceparent`: the trace a request belongs to, the span that sent it, and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace, the same in every process the request goes through.
    pub trace_id: [u8; 16],
    /// The span of the sender.
    pub parent_id: [u8; 8],
    /// Bit 0: sampled.
    pub flags: u8,
}

fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Appends `bytes` as lower-case hex digits to `out`.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

impl TraceParent {
    /// Reads a `traceparent` value; `None` when it is not a valid one (a caller then starts a
    /// new trace rather than failing the request).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let value = value.trim();
        let mut fields = value.split('-');
        let version = fields.next()?;
        let version = hex_bytes::<1>(version)?[0];
        if version == 0xff {
            return None;
        }
        let trace_id = hex_bytes::<16>(fields.next()?)?;
        let parent_id = hex_bytes::<8>(fields.next()?)?;
        let flags = hex_bytes::<1>(fields.next()?)?[0];
        // Version 00 has exactly four fields; a later version may add more.
        if version == 0 && fields.next().is_some() {
            return None;
        }
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// A new trace, sampled, with `trace` and `span` (random bytes: a uuid's, and half of
    /// another's) as its ids; an all-zero id is made non-zero.
    pub fn root(trace: [u8; 16], span: [u8; 8]) -> TraceParent {
        let mut parent = TraceParent {
            trace_id: trace,
            parent_id: span,
            flags: 1,
        };
        if parent.trace_id == [0; 16] {
            parent.trace_id[15] = 1;
        }
        if parent.parent_id == [0; 8] {
            parent.parent_id[7] = 1;
        }
        parent
    }

    /// The `traceparent` of a span of this process under this one: the same trace and flags,
    /// `span` as the parent id of what it sends on.
    pub fn child(&self, span: [u8; 8]) -> TraceParent {
        TraceParent {
            parent_id: if span == [0; 8] {
                [0, 0, 0, 0, 0, 0, 0, 1]
            } else {
                span
            },
            ..*self
        }
    }

    /// The trace id as 32 lower-case hex digits, as log lines and span fields show it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Whether the sender sampled it.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl TraceParent {
    /// The header value, `00-<trace>-<parent>-<flags>`, in one string of its final length
    /// (this runs for every traced message).
    pub fn header(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.parent_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.header())
    }
}

thread_local! {
    /// SplitMix64 state, seeded from a fresh uuid v4 (the operating system's randomness).
    static IDS: std::cell::Cell<u64> = std::cell::Cell::new({
        let seed = uuid::Uuid::new_v4().as_u64_pair();
        seed.0 ^ seed.1.rotate_left(32)
    });
}

/// The next 64 random bits of this thread's generator (SplitMix64: fast, well mixed, not for
/// secrets; trace ids need only be unlikely to collide).
fn next_u64() -> u64 {
    IDS.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A fresh random span id (never all zero).
pub fn new_span_id() -> [u8; 8] {
    let id = next_u64().max(1);
    id.to_be_bytes()
}

/// A new sampled trace with fresh random ids.
pub fn new_trace() -> TraceParent {
    let mut trace = [0u8; 16];
    trace[..8].copy_from_slice(&next_u64().to_be_bytes());
    trace[8..].copy_from_slice(&next_u64().to_be_bytes());
    TraceParent::root(trace, new_span_id())
}

/// One process's part of a traced request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The span of the sender, when the request came with a valid `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// This hop's trace and own span: what it passes on (its `parent_id` is this hop's span).
    pub own: TraceParent,
}

impl Hop {
    /// Continues the trace of `incoming` (a `traceparent` value) with a new span of this
    /// process, or starts a new trace when there is none or it is not valid.
    pub fn continue_from(incoming: Option<&str>) -> Hop {
        match incoming.and_then(TraceParent::parse) {
            Some(caller) => Hop {
                parent: Some(caller.parent_id),
                own: caller.child(new_span_id()),
            },
            None => Hop {
                parent: None,
                own: new_trace(),
            },
        }
    }

    /// Continues `incoming` under a span of this process only when spans of this kind are
    /// recorded here (a subscriber wants target `rylm::trace`, as the OTLP exporter does);
    /// otherwise `None`, and the caller passes `incoming` on unchanged: a process that records
    /// no span adds none to the chain, and costs nothing but carrying the header.
    pub fn continue_if_recorded(incoming: &str) -> Option<Hop> {
        if tracing::span_enabled!(target: "rylm::trace", tracing::Level::INFO) {
            Some(Hop::continue_from(Some(incoming)))
        } else {
            None
        }
    }

    /// The `traceparent` this hop passes on.
    pub fn traceparent(&self) -> String {
        self.own.header()
    }

    /// The span of this hop, named `name` (as OpenTelemetry shows it), at level INFO under the
    /// target `rylm::trace`; work done within it belongs to the request's trace.
    pub fn span(&self, name: &str) -> tracing::Span {
        tracing::info_span!(
            target: "rylm::trace",
            "rylm",
            otel.name = name,
            trace_id = %hex(&self.own.trace_id),
            span_id = %hex(&self.own.parent_id),
            parent_id = %self.parent.map(|id| hex(&id)).unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the W3C recommendation.
    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_recommendations_example_reads_and_writes_back() {
        let parent = TraceParent::parse(EXAMPLE).expect("valid");
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(parent.sampled());
        assert_eq!(parent.to_string(), EXAMPLE);
    }

    #[test]
    fn invalid_values_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        let parent = TraceParent::parse(later).expect("read");
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_and_a_new_trace_is_valid() {
        let parent = TraceParent::parse(EXAMPLE).expect("valid");
        let child = parent.child([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            (child.trace_id, child.flags),
            (parent.trace_id, parent.flags)
        );
        assert_eq!(
            child.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
        let fresh = new_trace();
        assert_eq!(TraceParent::parse(&fresh.to_string()), Some(fresh));
        assert_ne!(new_trace().trace_id, fresh.trace_id);
        let zero = TraceParent::root([0; 16], [0; 8]);
        assert_eq!(TraceParent::parse(&zero.to_string()), Some(zero));
    }

    proptest::proptest! {
        #[test]
        fn any_text_reads_or_is_refused_without_a_panic(text in ".{0,80}") {
            let _ = TraceParent::parse(&text);
        }
    }

    #[test]
    fn a_hop_continues_a_valid_caller_and_starts_a_trace_otherwise() {
        let hop = Hop::continue_from(Some(EXAMPLE));
        let caller = TraceParent::parse(EXAMPLE).expect("valid");
        assert_eq!(hop.own.trace_id, caller.trace_id);
        assert_eq!(hop.parent, Some(caller.parent_id));
        assert_ne!(hop.own.parent_id, caller.parent_id);
        let passed = TraceParent::parse(&hop.traceparent()).expect("valid");
        assert_eq!(passed, hop.own);
        for incoming in [None, Some("garbage")] {
            let fresh = Hop::continue_from(incoming);
            assert_eq!(fresh.parent, None);
            assert_ne!(fresh.own.trace_id, caller.trace_id);
            assert!(TraceParent::parse(&fresh.traceparent()).is_some());
        }
        let ids: std::collections::HashSet<[u8; 8]> = (0..10_000).map(|_| new_span_id()).collect();
        assert_eq!(ids.len(), 10_000, "span ids repeat");
    }

    /// A subscriber that wants every span, as the OTLP exporter's layer wants `rylm::trace`.
    struct Recording;

    impl tracing::Subscriber for Recording {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {}
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn a_hop_is_made_only_where_spans_are_recorded() {
        assert_eq!(
            Hop::continue_if_recorded(EXAMPLE),
            None,
            "nobody records spans"
        );
        let hop =
            tracing::subscriber::with_default(Recording, || Hop::continue_if_recorded(EXAMPLE));
        let hop = hop.expect("recorded here");
        assert_eq!(
            hop.own.trace_id,
            TraceParent::parse(EXAMPLE).expect("valid").trace_id
        );
    }
}
