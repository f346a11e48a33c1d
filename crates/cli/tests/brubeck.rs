//! `rylm service --wire brubeck` answers a Brubeck caller, and `rylm call --wire brubeck`
//! calls it.

mod common;

use common::{DEADLINE, Rylm, free_addresses};
use rylm_components::rylm_transport::Options;
use rylm_services_mux::{BrubeckCaller, Method};

#[tokio::test]
async fn rylm_service_serves_a_brubeck_caller_and_rylm_call_calls_one() {
    let caller = BrubeckCaller::bind(
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        "s3cret",
        &Options::default(),
    )
    .await
    .expect("binds");
    let _service = Rylm::start(&[
        "service",
        "--wire",
        "brubeck",
        "--secret",
        "s3cret",
        "--brubeck-requests",
        caller.requests_address(),
        "--brubeck-responses",
        caller.responses_address(),
    ])
    .await;
    caller
        .wait_for_services(1, DEADLINE)
        .await
        .expect("the service connects");
    let response = caller
        .call("/upper/brubeck", Method::Get, Default::default(), DEADLINE)
        .await
        .expect("answered");
    assert_eq!(response.status_code, serde_json::json!(200));
    assert_eq!(response.body["text"], "BRUBECK");
    drop(caller);

    // The other way: `rylm call` binds, a Brubeck-wire service connects to it.
    let [requests, responses] = <[String; 2]>::try_from(free_addresses(2)).expect("two addresses");
    let call = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
        .args([
            "call",
            "--wire",
            "brubeck",
            "--secret",
            "s3cret",
            "--method",
            "get",
            "--brubeck-requests",
            &requests,
            "--brubeck-responses",
            &responses,
            "/upper/both",
        ])
        .kill_on_drop(true)
        .output();
    let service = async {
        // Start the service once the caller has bound its sockets.
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(responses.trim_start_matches("tcp://")).is_err() {
            assert!(started.elapsed() < DEADLINE, "rylm call did not bind");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Rylm::start(&[
            "service",
            "--wire",
            "brubeck",
            "--secret",
            "s3cret",
            "--brubeck-requests",
            &requests,
            "--brubeck-responses",
            &responses,
        ])
        .await
    };
    let (output, _service) = tokio::join!(call, service);
    let output = output.expect("rylm call ran");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(printed.contains("BOTH"), "{printed}");
}
