//! Any multipart message (frames split from the input at 0xff bytes) given to the native
//! frame decoder yields a message or an error.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rylm_message::{Codec, NativeCodec};

fuzz_target!(|data: &[u8]| {
    let frames: Vec<Bytes> = data
        .split(|b| *b == 0xff)
        .map(Bytes::copy_from_slice)
        .collect();
    let _ = NativeCodec::default().decode_frames(&frames);
});
