//! A broker under a memory alarm, alone in its binary: the alarm blocks every publisher of the
//! broker, which would stall any test running beside it.

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, rabbitmqctl, settings};
use rylm_syrpc::{Client, Error};
use serde_json::json;

/// With the broker's memory alarm raised, publishers are blocked: `put_request` fails with
/// its deadline instead of hanging, and works again once the alarm is cleared.
#[tokio::test]
async fn a_blocked_broker_fails_puts_at_their_deadline() {
    let Some(settings) = settings("alarm") else {
        return;
    };
    let Some(ctl) = rylm_testkit::rabbitmqctl("a_blocked_broker_fails_puts_at_their_deadline")
    else {
        return;
    };
    let limit = Duration::from_secs(2);
    let client = Client::connect(settings.with_timeout(Some(limit)))
        .await
        .expect("client");
    client
        .put_request("echo", &"before")
        .await
        .expect("put before the alarm");

    rabbitmqctl(&ctl, &["set_vm_memory_high_watermark", "absolute", "1"]).await;
    let started = Instant::now();
    let blocked = client.put_request("echo", &"during").await;
    let waited = started.elapsed();
    rabbitmqctl(&ctl, &["set_vm_memory_high_watermark", "0.4"]).await;
    assert!(
        matches!(blocked, Err(Error::PublishTimeout { .. })),
        "{blocked:?}"
    );
    assert!(waited < limit + Duration::from_secs(2), "waited {waited:?}");

    // The alarm cleared, the same client publishes again.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match client.put_request("echo", &json!("after")).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("still blocked after the alarm: {error}"),
        }
    }
}
