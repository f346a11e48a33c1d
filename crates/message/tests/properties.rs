//! Property tests: every codec round-trips every message it can carry, and no input, however
//! broken, makes a decoder panic.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use rylm_message::{Codec, Error, Function, JsonCodec, Message, NativeCodec, StreamCodec};
use tokio_util::codec::{Decoder, Encoder};

fn arb_function() -> impl Strategy<Value = Function> {
    prop_oneof![
        ".{0,24}".prop_map(Function::Single),
        vec(".{0,12}", 0..5).prop_map(Function::Stages),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    (
        ".{0,40}",
        ".{0,40}",
        any::<u32>(),
        arb_function(),
        ".{0,40}",
        btree_map(".{0,10}", ".{0,20}", 0..5),
        vec(any::<u8>(), 0..400),
    )
        .prop_map(
            |(pipeline, client, stage, function, cache, headers, payload)| Message {
                pipeline,
                client,
                stage,
                function,
                cache,
                headers: headers.into_iter().collect::<BTreeMap<_, _>>(),
                payload: Bytes::from(payload),
            },
        )
}

/// Inputs that look almost right: a valid encoding, truncated and with bytes overwritten.
fn mutated(valid: Bytes, cut: usize, flips: &[(usize, u8)]) -> Bytes {
    let mut bytes = valid.to_vec();
    bytes.truncate(bytes.len().saturating_sub(cut % 8));
    for (at, value) in flips {
        if !bytes.is_empty() {
            let len = bytes.len();
            bytes[at % len] = *value;
        }
    }
    Bytes::from(bytes)
}

proptest! {
    #[test]
    fn native_round_trips(msg in arb_message()) {
        let codec = NativeCodec::default();
        prop_assert_eq!(codec.decode(codec.encode(&msg)?)?, msg.clone());
        prop_assert_eq!(codec.decode_frames(&codec.encode_frames(&msg)?)?, msg);
    }

    #[test]
    fn json_round_trips(msg in arb_message()) {
        let codec = JsonCodec::default();
        prop_assert_eq!(codec.decode(codec.encode(&msg)?)?, msg);
    }

    #[test]
    fn stream_round_trips_in_any_chunking(msgs in vec(arb_message(), 1..5), chunk in 1usize..64) {
        let mut codec = StreamCodec::default();
        let mut wire = BytesMut::new();
        for msg in &msgs {
            codec.encode(msg, &mut wire)?;
        }
        let mut buf = BytesMut::new();
        let mut received = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(msg) = codec.decode(&mut buf)? {
                received.push(msg);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(received, msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..600)) {
        let body = Bytes::from(bytes);
        let _ = NativeCodec::default().decode(body.clone());
        let _ = JsonCodec::default().decode(body.clone());
        let _ = NativeCodec::default().decode_frames(&[Bytes::from_static(&rylm_message::MARKER), body.clone()]);
        let mut stream = StreamCodec::with_max_size(1 << 16);
        let mut buf = BytesMut::from(&body[..]);
        // Each call consumes input or stops: bounded by the input's length.
        for _ in 0..=body.len() {
            match stream.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn arbitrary_frames_never_panic(frames in vec(vec(any::<u8>(), 0..64), 0..4)) {
        let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
        let _ = NativeCodec::default().decode_frames(&frames);
        let _ = JsonCodec::default().decode_frames(&frames);
    }

    #[test]
    fn damaged_encodings_never_panic(
        msg in arb_message(),
        cut in any::<usize>(),
        flips in vec((any::<usize>(), any::<u8>()), 0..6),
    ) {
        let native = NativeCodec::default();
        let json = JsonCodec::default();
        let _ = native.decode(mutated(native.encode(&msg)?, cut, &flips));
        let _ = json.decode(mutated(json.encode(&msg)?, cut, &flips));
    }

    #[test]
    fn oversized_inputs_are_refused_by_size(extra in 1usize..64, limit in 0usize..256) {
        let body = Bytes::from(vec![0x80u8; limit + extra]);
        let refused = |r: Result<Message, Error>| matches!(r, Err(Error::TooLarge { .. }));
        prop_assert!(refused(NativeCodec::with_max_size(limit).decode(body.clone())));
        prop_assert!(refused(JsonCodec::with_max_size(limit).decode(body)));
    }
}

#[cfg(feature = "pylm")]
mod pylm {
    use super::*;
    use rylm_message::PylmCodec;

    /// What a message looks like after a trip through pylm's format.
    fn as_pylm_keeps_it(msg: &Message) -> Message {
        let function = match &msg.function {
            Function::Stages(names) if names.len() < 2 => Function::Single(names.join(" ")),
            other => other.clone(),
        };
        Message {
            headers: BTreeMap::new(),
            function,
            ..msg.clone()
        }
    }

    fn arb_pylm_function() -> impl Strategy<Value = Function> {
        prop_oneof![
            "[a-z_.]{0,20}".prop_map(Function::Single),
            vec("[a-z_.]{1,12}", 0..5).prop_map(Function::Stages),
        ]
    }

    proptest! {
        #[test]
        fn pylm_round_trips_what_pylm_can_carry(msg in arb_message(), function in arb_pylm_function()) {
            let msg = Message { function, ..msg };
            let codec = PylmCodec::default();
            prop_assert_eq!(codec.decode(codec.encode(&msg)?)?, as_pylm_keeps_it(&msg));
        }

        #[test]
        fn pylm_never_panics(bytes in vec(any::<u8>(), 0..600), msg in arb_message(),
                             cut in any::<usize>(), flips in vec((any::<usize>(), any::<u8>()), 0..6)) {
            let codec = PylmCodec::default();
            let _ = codec.decode(Bytes::from(bytes));
            if let Ok(valid) = codec.encode(&msg) {
                let _ = codec.decode(mutated(valid, cut, &flips));
            }
        }
    }
}
