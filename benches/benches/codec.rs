//! Encoding and decoding one message with each codec, beside a plain copy of the same bytes;
//! and what trace context and a call's counting add per message, beside an encoding.
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

/// What observability adds per message, beside the native encoding of a 100 B message (the
/// baseline: every hop encodes its message once): a hop of trace context (continue a
/// `traceparent`, write the one passed on), and counting one call in a table of names.
fn bench_observability(c: &mut Criterion) {
    use rylm_message::stats::{CallTable, Outcome};
    use rylm_message::trace::Hop;
    let message = sample(100);
    let codec = NativeCodec::default();
    let mut group = c.benchmark_group("observability per message");
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline: native encode, 100 B", |b| {
        b.iter(|| codec.encode(black_box(&message)))
    });
    let incoming = Hop::continue_from(None).traceparent();
    group.bench_function("trace: continue a traceparent, write the next", |b| {
        b.iter(|| Hop::continue_from(black_box(Some(incoming.as_str()))).traceparent())
    });
    let table = CallTable::default();
    for name in ["echo", "upper", "reverse", "sleep"] {
        table.record(name, std::time::Duration::ZERO, Outcome::Ok);
    }
    group.bench_function("metrics: count one call", |b| {
        b.iter(|| {
            table.record(
                black_box("upper"),
                black_box(std::time::Duration::from_micros(40)),
                Outcome::Ok,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench_codecs, bench_observability);
criterion_main!(benches);
