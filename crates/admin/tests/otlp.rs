//! The span exporter never holds up the program: with a collector that refuses every
//! connection, 10,000 spans (more than its queue holds) are opened and closed at once, and
//! every one is dropped and counted, none exported.
#![cfg(feature = "otlp")]

use std::sync::atomic::Ordering;
use std::time::Duration;

use rylm_admin::otlp::{Otlp, QUEUE, TARGET, start};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;

#[test]
fn spans_past_the_queue_or_a_refusing_collector_are_dropped_and_counted() {
    // A port that nothing listens on: bound, then let go.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port");
    let (layer, exporter) = start(Otlp {
        endpoint: format!("http://{closed}"),
        service: "test".into(),
        interval: Duration::from_millis(50),
    })
    .expect("starts");
    let counters = exporter.counters();
    let subscriber = tracing_subscriber::registry().with(layer.with_filter(
        tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::INFO),
    ));
    const SPANS: u64 = 10_000;
    assert!(SPANS > QUEUE as u64, "more than the queue holds");
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..SPANS {
            let span = tracing::info_span!(
                target: "rylm::trace",
                "rylm",
                otel.name = "work",
                trace_id = "4bf92f3577b34da6a3ce929d0e0e4736",
                span_id = "00f067aa0ba902b7",
                parent_id = "",
            );
            drop(span.entered());
        }
    });
    // Dropping the exporter sends what is left (refused at once) and stops its thread.
    drop(exporter);
    assert_eq!(counters.exported.load(Ordering::Relaxed), 0);
    assert_eq!(counters.dropped.load(Ordering::Relaxed), SPANS);
}
