//! Encoding and decoding one message with each codec, beside a plain copy of the same bytes.
//!
//! The copy is the baseline: a codec can hardly beat handing over the bytes, so its time over
//! the copy's says what the format itself costs. Run with `cargo xtask bench codec`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rylm_message::{Codec, JsonCodec, Message, NativeCodec, PylmCodec, StreamCodec, new_id};
use tokio_util::codec::{Decoder, Encoder};

fn sample(payload_len: usize) -> Message {
    Message::call("server.function", vec![0x5a_u8; payload_len])
        .with_pipeline(new_id())
        .with_client(new_id())
        .with_cache(new_id())
        .with_header("content-type", "application/octet-stream")
}

fn codecs() -> Vec<(&'static str, Box<dyn Codec>)> {
    vec![
        ("native", Box::new(NativeCodec::default())),
        ("pylm", Box::new(PylmCodec::default())),
        ("json", Box::new(JsonCodec::default())),
    ]
}

fn bench_codecs(c: &mut Criterion) {
    for payload_len in [100usize, 16 * 1024] {
        let message = sample(payload_len);
        let mut encode = c.benchmark_group(format!("encode/{payload_len}B"));
        encode.throughput(Throughput::Elements(1));
        let native_len = NativeCodec::default()
            .encode(&message)
            .map(|b| b.len())
            .unwrap_or(0);
        encode.bench_function("baseline: copy of the encoded bytes", |b| {
            let bytes = vec![0x5a_u8; native_len];
            b.iter(|| black_box(Bytes::copy_from_slice(black_box(&bytes))))
        });
        for (name, codec) in codecs() {
            encode.bench_with_input(BenchmarkId::from_parameter(name), &message, |b, m| {
                b.iter(|| codec.encode(black_box(m)))
            });
        }
        encode.finish();

        let mut decode = c.benchmark_group(format!("decode/{payload_len}B"));
        decode.throughput(Throughput::Elements(1));
        for (name, codec) in codecs() {
            let Ok(body) = codec.encode(&message) else {
                continue;
            };
            decode.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
                b.iter(|| codec.decode(black_box(body.clone())))
            });
        }
        decode.bench_function("native stream frame", |b| {
            let mut codec = StreamCodec::default();
            let mut wire = BytesMut::new();
            let _ = codec.encode(&message, &mut wire);
            b.iter(|| {
                let mut buf = wire.clone();
                codec.decode(black_box(&mut buf))
            })
        });
        decode.finish();
    }
}

criterion_group!(benches, bench_codecs);
criterion_main!(benches);
