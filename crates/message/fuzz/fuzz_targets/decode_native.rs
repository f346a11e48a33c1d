//! Any body given to the native decoder yields a message or an error; a message it accepts
//! encodes and decodes to itself.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rylm_message::{Codec, NativeCodec};

fuzz_target!(|data: &[u8]| {
    let codec = NativeCodec::default();
    if let Ok(message) = codec.decode(Bytes::copy_from_slice(data)) {
        let again = codec.encode(&message).expect("an accepted message encodes");
        assert_eq!(codec.decode(again).expect("and decodes"), message);
    }
});
