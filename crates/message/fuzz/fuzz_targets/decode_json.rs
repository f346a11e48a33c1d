//! Any input given to the JSON decoder yields a message or an error; a message it accepts
//! encodes and decodes to itself.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rylm_message::{Codec, JsonCodec};

fuzz_target!(|data: &[u8]| {
    let codec = JsonCodec::default();
    if let Ok(message) = codec.decode(Bytes::copy_from_slice(data)) {
        let again = codec.encode(&message).expect("an accepted message encodes");
        assert_eq!(codec.decode(again).expect("and decodes"), message);
    }
});
