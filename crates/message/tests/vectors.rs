//! Every golden vector in `vectors/` decodes to its sample, and encodes back to the same bytes.
//!
//! The vectors are written by `cargo xtask codegen`; `cargo xtask codegen --check` (part of
//! `cargo xtask test`) fails when they are stale. This test makes sure that what is committed
//! is still readable by the codecs as they are now.

use std::path::Path;

use bytes::Bytes;
#[cfg(feature = "pylm")]
use rylm_message::PylmCodec;
use rylm_message::samples;
use rylm_message::{Codec, JsonCodec, NativeCodec};

fn check_codec(codec: &dyn Codec, folder: &str, extension: &str, expect_headers: bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("vectors")
        .join(folder);
    let mut seen = 0;
    for sample in samples::all() {
        let path = dir.join(format!("{}.{extension}", sample.name));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}); run `cargo xtask codegen`",
                path.display()
            )
        });
        let decoded = codec
            .decode(Bytes::from(bytes.clone()))
            .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
        let mut expected = sample.message.clone();
        if !expect_headers {
            expected.headers.clear();
        }
        assert_eq!(
            decoded,
            expected,
            "{} decodes to another message",
            path.display()
        );
        let again = codec.encode(&decoded).expect("re-encodes");
        assert_eq!(
            &again[..],
            &bytes[..],
            "{} does not re-encode to itself",
            path.display()
        );
        seen += 1;
    }
    let on_disk = std::fs::read_dir(&dir).expect("vector folder").count();
    assert_eq!(
        on_disk,
        seen,
        "{} holds vectors of no sample",
        dir.display()
    );
}

#[test]
fn native_vectors_decode() {
    check_codec(&NativeCodec::default(), "native", "msgpack", true);
}

#[test]
fn json_vectors_decode() {
    check_codec(&JsonCodec::default(), "json", "json", true);
}

#[test]
#[cfg(feature = "pylm")]
fn pylm_vectors_decode() {
    check_codec(&PylmCodec::default(), "pylm", "pb", false);
}
