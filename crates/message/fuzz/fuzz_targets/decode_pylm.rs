//! Any input given to the pylm decoder yields a message or an error; a message it accepts
//! encodes (when pylm can carry it) and decodes to itself.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rylm_message::{Codec, PylmCodec};

fuzz_target!(|data: &[u8]| {
    let codec = PylmCodec::default();
    if let Ok(message) = codec.decode(Bytes::copy_from_slice(data)) {
        if let Ok(again) = codec.encode(&message) {
            assert_eq!(
                codec.decode(again).expect("a re-encoded message decodes"),
                message
            );
        }
    }
});
