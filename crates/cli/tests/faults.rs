//! The `rylm` processes against hostile peers and crashes: every bound ZeroMQ port survives a
//! frame header declaring 2^46 bytes, and a master, a server and a service instance killed with
//! SIGKILL and started again on the same addresses are used again by the workers, clients and
//! callers that kept running.

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Ports, Rylm, attack, free_address, until_ok};
use rylm_components::Client;
use rylm_services_mux::{Call, Method, ServiceClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn eval_upper(db: &str) -> Result<String, rylm_components::Error> {
    let client = Client::connect(db, Duration::from_secs(5)).await?;
    let result = client.eval("upper", "still here").await?;
    Ok(String::from_utf8_lossy(&result).into_owned())
}

async fn http_upper(listen: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(listen).await?;
    stream
        .write_all(b"POST /upper HTTP/1.1\r\nHost: rylm\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        .await?;
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
        .await
        .map_err(|_| std::io::Error::other("no HTTP response"))??;
    Ok(response)
}

/// One call of `upper` with a short deadline of its own.
async fn eval_again(client: &Client) -> Result<bytes::Bytes, rylm_components::Error> {
    client
        .eval_within("upper", "again", Duration::from_secs(2))
        .await
}

fn service_client() -> ServiceClient {
    ServiceClient::new()
}

async fn service_upper(client: &ServiceClient) -> Result<u16, rylm_services_mux::Error> {
    let reply = client
        .call(
            "s",
            Call::new("/upper/abc").method(Method::Get),
            Some(Duration::from_secs(2)),
        )
        .await?;
    Ok(reply.response.status)
}

#[tokio::test]
async fn a_frame_declaring_2_to_the_46_bytes_stops_no_rylm_process() {
    // A server, a master with a worker, a gateway with a worker, and a service.
    let server = Ports::new();
    let mut server_process = Rylm::start(&server.server("s")).await;
    let master = Ports::new();
    let mut master_process = Rylm::start(&master.master("m")).await;
    let _master_worker = Rylm::start(&["worker", "--db", &master.db]).await;
    let gateway_workers = free_address();
    let listen = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let mut gateway_process = Rylm::start(&[
        "gateway",
        "--listen",
        &listen,
        "--workers",
        &gateway_workers,
    ])
    .await;
    let _gateway_worker = Rylm::start(&["worker", "--connect", &gateway_workers]).await;
    let service = free_address();
    let mut service_process = Rylm::start(&[
        "service", "--bind", &service, "--secret", "s3cret", "--name", "s",
    ])
    .await;

    let targets = [
        &server.pull,
        &server.publish,
        &server.db,
        &master.pull,
        &master.publish,
        &master.db,
        &master.workers,
        &gateway_workers,
        &service,
    ];
    for address in &targets {
        attack(address).await;
    }

    for (name, process) in [
        ("server", &mut server_process),
        ("master", &mut master_process),
        ("gateway", &mut gateway_process),
        ("service", &mut service_process),
    ] {
        assert!(process.alive(), "rylm {name} died of a hostile frame");
        let rss = process.peak_rss_kib();
        eprintln!("hostile-peer run: rylm {name} peak RSS {rss} KiB");
        assert!(rss < 100 * 1024, "rylm {name} grew to {rss} KiB");
    }
    assert_eq!(
        eval_upper(&server.db).await.expect("server serves"),
        "STILL HERE"
    );
    assert_eq!(
        eval_upper(&master.db).await.expect("master serves"),
        "STILL HERE"
    );
    let response = http_upper(&listen).await.expect("gateway answers");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("HELLO"), "{response}");
    let client = service_client();
    client.register("s", &[service.as_str()], "s3cret");
    assert_eq!(service_upper(&client).await.expect("service serves"), 200);
}

#[tokio::test]
async fn a_master_killed_and_started_again_is_used_again_by_its_worker_and_client() {
    let ports = Ports::new();
    let args = ports.master("m");
    let master = Rylm::start(&args).await;
    let mut worker = Rylm::start(&["worker", "--db", &ports.db, "--credits", "4"]).await;
    let client = Client::connect(&ports.db, DEADLINE)
        .await
        .expect("connects");
    let eval = || eval_again(&client);
    until_ok(DEADLINE, eval).await;

    master.kill().await;
    let restarted = Instant::now();
    let _master = Rylm::start(&args).await;
    let (result, took) = until_ok(Duration::from_secs(15), eval).await;
    assert_eq!(&result[..], b"AGAIN");
    eprintln!(
        "master restart: calls succeed again {:?} after the restart ({took:?} of retries)",
        restarted.elapsed()
    );
    for _ in 0..20 {
        assert_eq!(&eval().await.expect("served")[..], b"AGAIN");
    }
    assert!(worker.alive(), "the worker was not restarted");
}

#[tokio::test]
async fn a_server_killed_and_started_again_is_used_again_by_its_client() {
    let ports = Ports::new();
    let args = ports.server("s");
    let server = Rylm::start(&args).await;
    let client = Client::connect(&ports.db, DEADLINE)
        .await
        .expect("connects");
    let eval = || eval_again(&client);
    until_ok(DEADLINE, eval).await;

    // A call in flight when the server dies fails with a clear error, not a timeout.
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { client.eval_within("sleep:5000", "x", DEADLINE).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill().await;
    let outcome = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("the pending call ends before its deadline")
        .expect("task");
    assert!(
        matches!(outcome, Err(rylm_components::Error::ServerGone { .. })),
        "{outcome:?}"
    );

    let restarted = Instant::now();
    let _server = Rylm::start(&args).await;
    let (result, _) = until_ok(Duration::from_secs(15), eval).await;
    assert_eq!(&result[..], b"AGAIN");
    eprintln!(
        "server restart: calls succeed again {:?} after the restart",
        restarted.elapsed()
    );
}

#[tokio::test]
async fn a_service_instance_killed_and_started_again_is_called_again() {
    let address = free_address();
    let args = [
        "service", "--bind", &address, "--secret", "s3cret", "--name", "s",
    ];
    let instance = Rylm::start(&args).await;
    let client = service_client();
    client.register("s", &[address.as_str()], "s3cret");
    until_ok(DEADLINE, || service_upper(&client)).await;

    instance.kill().await;
    let restarted = Instant::now();
    let _instance = Rylm::start(&args).await;
    let (status, _) = until_ok(Duration::from_secs(15), || service_upper(&client)).await;
    assert_eq!(status, 200);
    eprintln!(
        "service restart: calls succeed again {:?} after the restart",
        restarted.elapsed()
    );
    for _ in 0..20 {
        assert_eq!(service_upper(&client).await.expect("served"), 200);
    }
}
