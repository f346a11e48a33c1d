//! `--admin` of the long-running commands: a master's `/metrics` parses as Prometheus text and
//! its counters move as calls are made, its `/readyz` turns ready when a worker comes and
//! unready when it goes; a server's counters move too.

mod common;

use std::time::Duration;

use common::{Job, Ports, Rylm, succeeds, until_ok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use rylm_testkit::{http_get as get, metric_sample, metric_sample_with};

/// The value of the sample `name` in a scrape of `address`.
async fn metric(address: &str, name: &str) -> f64 {
    let (status, body) = get(address, "/metrics").await.expect("scraped");
    assert_eq!(status, 200, "{body}");
    metric_sample(&body, name, None)
}

/// The value of the sample `name` whose label `function` is `function`.
async fn of_function(address: &str, name: &str, function: &str) -> f64 {
    let (_, body) = get(address, "/metrics").await.expect("scraped");
    metric_sample(&body, name, Some(("function", function)))
}

/// The value of the sample `name` with every label of `labels`.
async fn labelled(address: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, body) = get(address, "/metrics").await.expect("scraped");
    metric_sample_with(&body, name, labels)
}

/// Polls `/readyz` until it answers `want`.
async fn readiness(address: &str, want: u16) -> String {
    let (body, _) = until_ok(Duration::from_secs(30), || async {
        match get(address, "/readyz").await {
            Ok((status, body)) if status == want => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    body
}

#[tokio::test]
async fn a_masters_admin_shows_its_pool_and_turns_ready_with_its_workers() {
    let ports = Ports::new();
    let admin = rylm_testkit::free_port();
    let admin = format!("127.0.0.1:{admin}");
    let mut args = ports.master("m");
    args.extend(["--admin".to_owned(), admin.clone()]);
    let _master = Rylm::start(&args).await;
    let (status, _) = until_ok(Duration::from_secs(30), || get(&admin, "/healthz"))
        .await
        .0;
    assert_eq!(status, 200);
    let why = readiness(&admin, 503).await;
    assert!(why.contains("no worker"), "{why}");
    assert_eq!(metric(&admin, "rylm_pool_workers").await, 0.0);

    let worker_admin = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let worker = Rylm::start(&[
        "worker",
        "--db",
        &ports.db,
        "--credits",
        "4",
        "--admin",
        &worker_admin,
    ])
    .await;
    readiness(&admin, 200).await;
    assert_eq!(metric(&admin, "rylm_pool_workers").await, 1.0);
    assert_eq!(metric(&admin, "rylm_pool_free_credits").await, 4.0);
    let before = metric(&admin, "rylm_pool_answered_total").await;
    let payloads: Vec<String> = (0..25).map(|i| format!("p{i}")).collect();
    let results = Job::start(None, &ports.db, "echo", &payloads)
        .finish(Duration::from_secs(60))
        .await;
    assert_eq!(results.len(), 25);
    assert_eq!(
        metric(&admin, "rylm_pool_answered_total").await - before,
        25.0
    );
    assert!(metric(&admin, "rylm_pool_dispatched_total").await >= 25.0);
    assert!(metric(&admin, "rylm_pool_workers_admitted_total").await >= 1.0);
    // The worker ran them: its own metrics, by function.
    assert_eq!(
        of_function(&worker_admin, "rylm_function_calls_total", "echo").await,
        25.0
    );
    assert_eq!(
        of_function(&worker_admin, "rylm_function_duration_seconds", "echo").await,
        25.0
    );

    worker.kill().await;
    let why = readiness(&admin, 503).await;
    assert!(why.contains("no worker"), "{why}");
    assert!(metric(&admin, "rylm_pool_workers_buried_total").await >= 1.0);
}

#[tokio::test]
async fn a_servers_admin_counts_its_answers() {
    let ports = Ports::new();
    let admin = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let mut args = ports.server("s");
    args.extend(["--admin".to_owned(), admin.clone()]);
    let _server = Rylm::start(&args).await;
    until_ok(Duration::from_secs(30), || get(&admin, "/readyz")).await;
    assert_eq!(readiness(&admin, 200).await.trim(), "ready");
    let before = metric(&admin, "rylm_results_answered_total").await;
    let payloads: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    let results = Job::start(None, &ports.db, "upper", &payloads)
        .finish(Duration::from_secs(60))
        .await;
    assert_eq!(results.len(), 10);
    // The calls, and the client's handshake.
    let answered = metric(&admin, "rylm_results_answered_total").await - before;
    assert!((10.0..=11.0).contains(&answered), "{answered}");
    // A hostile peer (a frame header of 2^46 bytes in its handshake): its connection closed,
    // and counted.
    let refused = || async {
        metric(&admin, "rylm_transport_dropped_total").await
            + metric(&admin, "rylm_transport_handshake_failed_total").await
    };
    assert_eq!(refused().await, 0.0);
    common::attack(&ports.pull).await;
    until_ok(Duration::from_secs(10), || async {
        match refused().await {
            n if n >= 1.0 => Ok(()),
            n => Err(n),
        }
    })
    .await;
    assert!(metric(&admin, "rylm_transport_accepted_total").await >= 2.0);
    assert_eq!(metric(&admin, "rylm_results_malformed_total").await, 0.0);
    assert_eq!(
        of_function(&admin, "rylm_function_calls_total", "upper").await,
        10.0
    );
    let (_, body) = get(&admin, "/metrics").await.expect("scraped");
    assert!(
        !body.contains("rylm_function_errors_total{function=\"upper\""),
        "no error series for a function without errors: {body}"
    );
    // Three calls of `fail`: the client reports them and exits non-zero.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
        .args(["client", "--db", &ports.db, "job", "fail", "a", "b", "c"])
        .env("RUST_LOG", "off")
        .output()
        .await
        .expect("runs");
    assert!(!output.status.success());
    let failed = [("function", "fail"), ("kind", "failed")];
    assert_eq!(
        labelled(&admin, "rylm_function_errors_total", &failed).await,
        3.0
    );
}

#[tokio::test]
async fn rylm_status_shows_a_masters_workers_and_a_servers_functions() {
    let ports = Ports::new();
    let _master = Rylm::start(&ports.master("m")).await;
    let _worker = Rylm::start(&["worker", "--db", &ports.db, "--credits", "3"]).await;
    let status = || async {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
            .args(["status", "--json", &ports.db])
            .output()
            .await
            .map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
        if report["workers"]["live"] == 1 {
            Ok(report)
        } else {
            Err(format!("{report}"))
        }
    };
    let (report, _) = until_ok(Duration::from_secs(30), status).await;
    assert_eq!(report["name"], "m");
    assert_eq!(report["kind"], "master");
    assert_eq!(report["workers"]["free_credits"], 3);
    let functions = report["functions"].as_array().expect("functions");
    assert!(functions.iter().any(|f| f == "echo"), "{report}");
    // As a table.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
        .args(["status", &ports.db])
        .output()
        .await
        .expect("runs");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("workers.live") && l.ends_with(" 1")),
        "{table}"
    );

    let server_ports = Ports::new();
    let _server = Rylm::start(&server_ports.server("s")).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
        .args(["status", "--json", &server_ports.db])
        .output()
        .await
        .expect("runs");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        (report["name"].clone(), report["kind"].clone()),
        ("s".into(), "server".into())
    );
    assert!(
        report["functions"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "upper"))
    );
}

/// `rylm client job` shows a progress bar on a terminal only: piped, its standard error has no
/// bar and its standard output only the results.
#[tokio::test]
async fn a_piped_job_prints_results_and_no_progress_bar() {
    let ports = Ports::new();
    let _server = Rylm::start(&ports.server("s")).await;
    let mut args = vec![
        "client".to_owned(),
        "--db".into(),
        ports.db.clone(),
        "job".into(),
        "upper".into(),
    ];
    args.extend((0..50).map(|i| format!("p{i}")));
    let output = succeeds(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
            .args(&args)
            .env("RUST_LOG", "warn"),
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 50, "{stdout}");
    assert!(stdout.lines().all(|l| l.contains("\tP")), "{stdout}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains('\r') && !stderr.contains('\u{1b}'),
        "{stderr:?}"
    );
}

#[tokio::test]
async fn a_gateways_admin_shows_its_pool_and_readiness() {
    let http = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let admin = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let workers = common::free_address();
    let _gateway = Rylm::start(&[
        "gateway",
        "--listen",
        &http,
        "--workers",
        &workers,
        "--admin",
        &admin,
    ])
    .await;
    let why = readiness(&admin, 503).await;
    assert!(why.contains("no worker"), "{why}");
    let _worker = Rylm::start(&["worker", "--connect", &workers, "--credits", "2"]).await;
    readiness(&admin, 200).await;
    let before = metric(&admin, "rylm_pool_answered_total").await;
    let mut stream = tokio::net::TcpStream::connect(&http)
        .await
        .expect("connects");
    stream
        .write_all(b"POST /upper HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        .await
        .expect("writes");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("answered")
        .expect("reads");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("HELLO"),
        "{answer}"
    );
    assert_eq!(
        metric(&admin, "rylm_pool_answered_total").await - before,
        1.0
    );
    assert_eq!(metric(&admin, "rylm_pool_workers").await, 1.0);
    // By route: the call, and one of a function nobody has (under `_unknown`).
    let route = [("route", "upper")];
    assert_eq!(
        labelled(&admin, "rylm_gateway_route_calls_total", &route).await,
        1.0
    );
    assert_eq!(
        labelled(&admin, "rylm_gateway_route_duration_seconds", &route).await,
        1.0
    );
    let missing =
        "POST /nothing-here HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert!(common::http_raw(&http, missing).await.is_err(), "a 404");
    let unknown = [("route", "_unknown"), ("kind", "unknown")];
    assert_eq!(
        labelled(&admin, "rylm_gateway_route_errors_total", &unknown).await,
        1.0
    );
}

#[tokio::test]
async fn a_syrpc_servers_admin_counts_its_results_and_is_ready_while_consuming() {
    let Some(amqp) = rylm_testkit::amqp_url("a_syrpc_servers_admin_counts_its_results") else {
        return;
    };
    let admin = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let app = format!("admin-{}", std::process::id());
    let _server = Rylm::start(&[
        "syrpc", "serve", "--url", &amqp, "--app", &app, "--admin", &admin,
    ])
    .await;
    readiness(&admin, 200).await;
    let call = |type_: &'static str| {
        let (amqp, app) = (amqp.clone(), app.clone());
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
                .args(["syrpc", "call", "--url", &amqp, "--app", &app, type_, "hi"])
                .env("RUST_LOG", "off")
                .output()
                .await
                .expect("runs")
        }
    };
    assert!(call("upper").await.status.success());
    call("fail").await;
    assert_eq!(metric(&admin, "rylm_syrpc_answered_total").await, 2.0);
    assert_eq!(metric(&admin, "rylm_syrpc_exceptions_total").await, 1.0);
    assert_eq!(metric(&admin, "rylm_syrpc_consuming").await, 1.0);
    assert_eq!(metric(&admin, "rylm_syrpc_malformed_total").await, 0.0);
    assert_eq!(
        metric(&admin, "rylm_syrpc_unconfirmed_retried_total").await,
        0.0
    );
    // By type.
    let upper = [("type", "upper")];
    assert_eq!(
        labelled(&admin, "rylm_syrpc_type_calls_total", &upper).await,
        1.0
    );
    let failed = [("type", "fail"), ("kind", "failed")];
    assert_eq!(
        labelled(&admin, "rylm_syrpc_type_errors_total", &failed).await,
        1.0
    );
}

#[tokio::test]
async fn a_services_admin_counts_its_answers_and_refusals() {
    let service = common::free_address();
    let admin = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let _service = Rylm::start(&[
        "service", "--bind", &service, "--secret", "s3cret", "--name", "s", "--admin", &admin,
    ])
    .await;
    readiness(&admin, 200).await;
    let call = |secret: &'static str, path: &'static str| {
        let service = service.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
                .args([
                    "call",
                    "--connect",
                    &service,
                    "--secret",
                    secret,
                    "--timeout",
                    "5",
                    path,
                ])
                .env("RUST_LOG", "off")
                .output()
                .await
                .expect("runs")
        }
    };
    assert!(call("s3cret", "/echo").await.status.success());
    call("s3cret", "/fail").await;
    assert!(!call("wrong", "/echo").await.status.success());
    assert_eq!(metric(&admin, "rylm_service_answered_total").await, 2.0);
    assert_eq!(metric(&admin, "rylm_service_errors_total").await, 1.0);
    assert!(metric(&admin, "rylm_service_refused_total").await >= 1.0);
    assert_eq!(metric(&admin, "rylm_service_malformed_total").await, 0.0);
    // By route pattern.
    let echo = [("route", "^/echo$")];
    assert_eq!(
        labelled(&admin, "rylm_service_route_calls_total", &echo).await,
        1.0
    );
    let failed = [("route", "^/fail$"), ("kind", "failed")];
    assert_eq!(
        labelled(&admin, "rylm_service_route_errors_total", &failed).await,
        1.0
    );
}

/// `rylm client ARGS` run to its end: its standard output, or its standard error on failure.
async fn client(args: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
        .arg("client")
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[tokio::test]
async fn a_pipelines_a_sinks_and_a_hubs_admin_count_what_flows_through_them() {
    // first (server) -> second (pipeline) -> sink, and a hub fed by the sink, with a worker.
    let first = Ports::new();
    let second = Ports::new();
    let sink = Ports::new();
    let hub = Ports::new();
    let admins: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", rylm_testkit::free_port()))
        .collect();
    let _first = Rylm::start(&first.server("first")).await;
    let _second = Rylm::start(&[
        "pipeline",
        "--name",
        "second",
        "--pub",
        &second.publish,
        "--db",
        &second.db,
        "--previous",
        &first.publish,
        "--previous-name",
        "first",
        "--admin",
        &admins[0],
    ])
    .await;
    let _sink = Rylm::start(&[
        "sink",
        "--name",
        "sink",
        "--pub",
        &sink.publish,
        "--db",
        &sink.db,
        "--previous",
        &format!("{}=second", second.publish),
        "--admin",
        &admins[1],
    ])
    .await;
    let _hub = Rylm::start(&[
        "hub",
        "--name",
        "hub",
        "--pub",
        &hub.publish,
        "--db",
        &hub.db,
        "--workers",
        &hub.workers,
        "--previous",
        &sink.publish,
        "--previous-name",
        "sink",
        "--admin",
        &admins[2],
    ])
    .await;
    for admin in &admins {
        let (status, _) = until_ok(Duration::from_secs(30), || get(admin, "/healthz"))
            .await
            .0;
        assert_eq!(status, 200);
    }
    // A hub is ready with a worker, as a master is.
    let why = readiness(&admins[2], 503).await;
    assert!(why.contains("no worker"), "{why}");
    let _worker = Rylm::start(&["worker", "--db", &hub.db]).await;
    readiness(&admins[2], 200).await;
    readiness(&admins[0], 200).await;
    readiness(&admins[1], 200).await;

    // Through the first two stages; the answer comes from the second.
    let stages = "first.upper,second.reverse";
    let args = [
        "--db",
        &first.db,
        "--results-from",
        &second.db,
        "stages",
        stages,
        "abc",
    ];
    let (answer, _) = until_ok(Duration::from_secs(30), || client(&args)).await;
    assert_eq!(answer, "CBA");
    let reverse = [("function", "reverse")];
    assert!(labelled(&admins[0], "rylm_function_calls_total", &reverse).await >= 1.0);
    assert!(metric(&admins[0], "rylm_results_answered_total").await >= 1.0);
    // Each command's scrape parses as Prometheus text and shows its own families.
    for (admin, family) in [
        (&admins[1], "rylm_results_streamed_total"),
        (&admins[2], "rylm_pool_workers"),
    ] {
        metric(admin, family).await;
    }
    assert_eq!(metric(&admins[2], "rylm_pool_workers").await, 1.0);
}

#[tokio::test]
async fn a_gilmour_proxys_admin_is_unready_while_its_redis_is_down() {
    let test = "a_gilmour_proxys_admin_is_unready_while_its_redis_is_down";
    let Some(program) = rylm_testkit::redis_server(test) else {
        return;
    };
    let mut redis = rylm_testkit::PrivateRedis::start(&program, "");
    let listen = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let admin = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let _proxy = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
        .args([
            "gilmour-proxy",
            "--redis",
            &redis.url(),
            "--listen",
            &listen,
        ])
        .args(["--admin", &admin])
        .env("RUST_LOG", "off")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the proxy starts");
    readiness(&admin, 200).await;
    redis.kill();
    let why = readiness(&admin, 503).await;
    assert!(why.to_lowercase().contains("redis"), "{why}");
    redis.run();
    readiness(&admin, 200).await;
}

/// Starts a stopped RabbitMQ node's app again when dropped, so that a failing test does not
/// leave the cluster short of a node.
struct Restart<'a>(&'a str);

impl Drop for Restart<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new(self.0)
            .arg("start_app")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[tokio::test]
async fn a_syrpc_servers_admin_is_unready_while_its_broker_is_down() {
    let test = "a_syrpc_servers_admin_is_unready_while_its_broker_is_down";
    let Some(cluster) = rylm_testkit::amqp_cluster(test) else {
        return;
    };
    // The cluster's third node: the cluster tests of rylm-syrpc run in another test binary.
    let (url, ctl) = &cluster[2];
    let admin = format!("127.0.0.1:{}", rylm_testkit::free_port());
    let app = format!("unready-{}", std::process::id());
    let _server = Rylm::start(&[
        "syrpc", "serve", "--url", url, "--app", &app, "--admin", &admin,
    ])
    .await;
    readiness(&admin, 200).await;
    let restart = Restart(ctl);
    let stopped = tokio::process::Command::new(ctl)
        .arg("stop_app")
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(stopped.status.success(), "{stopped:?}");
    let why = readiness(&admin, 503).await;
    assert!(why.contains("broker"), "{why}");
    drop(restart);
    readiness(&admin, 200).await;
}
