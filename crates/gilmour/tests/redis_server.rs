//! The Redis that `cargo xtask test` provisions is real and reachable through `fred`, and does
//! what the Gilmour protocol will lean on: values with an expiry, and `SET NX` as a lock.

use std::time::Duration;

use fred::prelude::*;

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn provisioned_redis_stores_values_and_refuses_a_taken_lock() {
    let Some(url) =
        rylm_testkit::redis_url("provisioned_redis_stores_values_and_refuses_a_taken_lock")
    else {
        return;
    };
    let config = Config::from_url(&url).expect("xtask gives a valid Redis URL");
    let client = Builder::from_config(config).build().expect("a client");
    tokio::time::timeout(DEADLINE, client.init())
        .await
        .expect("Redis answers within the deadline")
        .expect("connects to Redis");

    let key = format!("rylm-test-lock-{}", std::process::id());
    let first: Option<String> = client
        .set(
            &key,
            "holder-1",
            Some(Expiration::EX(60)),
            Some(SetOptions::NX),
            false,
        )
        .await
        .expect("SET NX");
    assert_eq!(
        first.as_deref(),
        Some("OK"),
        "the first SET NX takes the lock"
    );
    let second: Option<String> = client
        .set(
            &key,
            "holder-2",
            Some(Expiration::EX(60)),
            Some(SetOptions::NX),
            false,
        )
        .await
        .expect("SET NX");
    assert_eq!(second, None, "a second SET NX must not take a held lock");

    let holder: Option<String> = client.get(&key).await.expect("GET");
    assert_eq!(holder.as_deref(), Some("holder-1"));
    let ttl: i64 = client.ttl(&key).await.expect("TTL");
    assert!((1..=60).contains(&ttl), "the lock expires, ttl = {ttl}");
    let missing: Option<String> = client.get(format!("{key}-absent")).await.expect("GET");
    assert_eq!(missing, None);

    let _: i64 = client.del(&key).await.expect("DEL");
    client.quit().await.expect("QUIT");
}
