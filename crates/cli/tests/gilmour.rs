//! `rylm gilmour status`: the nodes of the health registry, each pinged as the engines'
//! monitors do.

mod common;

use std::time::Duration;

use common::succeeds;
use rylm_gilmour::node::Node;

#[tokio::test]
async fn gilmour_status_lists_and_pings_the_registered_nodes() {
    let Some(redis) =
        rylm_testkit::redis_url("gilmour_status_lists_and_pings_the_registered_nodes")
    else {
        return;
    };
    let node = Node::connect(&redis).await.expect("connects");
    let topic = format!("status.{}", uuid_like());
    node.reply_to(
        &topic,
        "g",
        Duration::from_secs(5),
        |v| async move { Ok(v) },
    )
    .await
    .expect("serves");
    let ident = node.enable_health().await.expect("joins");
    let output = succeeds(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
            .args(["gilmour", "status", "--json", "--redis", &redis]),
    )
    .await;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let ours = report["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["ident"] == ident.as_str()))
        .unwrap_or_else(|| panic!("{ident} in {report}"));
    assert_eq!(ours["code"], 200);
    assert_eq!(ours["registered"], "true");
    assert_eq!(
        ours["answer"],
        serde_json::json!([format!("gilmour.request.{topic}")])
    );
    node.shutdown().await;
}

fn uuid_like() -> String {
    format!("{}-{:?}", std::process::id(), std::time::SystemTime::now())
        .replace(|c: char| !c.is_ascii_alphanumeric(), "")
}
