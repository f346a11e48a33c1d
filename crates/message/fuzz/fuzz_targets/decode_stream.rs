//! Any byte stream given to the length-delimited decoder yields messages, waits for more, or
//! ends with an error, and never loops without consuming input.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rylm_message::StreamCodec;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = StreamCodec::with_max_size(1 << 20);
    let mut buf = BytesMut::from(data);
    for _ in 0..=data.len() {
        match codec.decode(&mut buf) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});
