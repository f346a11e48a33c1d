//! Real pylm peers (pylm 0.14.4 from PyPI, in the environment `cargo xtask test` creates) against
//! rylm servers in pylm wire mode.

use std::time::Duration;

use bytes::Bytes;
use rylm_components::{Functions, Server};
use rylm_testkit::free_port;
use serde_json::Value;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pylm_client.py");

fn functions() -> Functions {
    Functions::new()
        .add("upper", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(String::from_utf8_lossy(&p).to_uppercase()))
        })
        .add("reverse", |p: Bytes| async move {
            Ok::<_, String>(Bytes::from(
                String::from_utf8_lossy(&p)
                    .chars()
                    .rev()
                    .collect::<String>(),
            ))
        })
        .add("fail", |_p: Bytes| async move {
            Err::<Bytes, _>("failed on purpose")
        })
}

/// Starts `python` with `args` in the background, its output discarded; killed when dropped.
fn spawn_python(python: &str, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(python)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts")
}

/// Runs `python` with `args` to its end (within a minute) and reads the JSON of the last line
/// it prints; `context` names the case in a failure.
async fn python_prints(python: &str, args: &[&str], context: &str) -> Value {
    let run = tokio::process::Command::new(python)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("pylm finishes")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
        panic!(
            "{context}: pylm printed {stdout:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// A pylm Client calls a rylm Server: eval, a job of many messages, a failing function (pylm's
/// answer `b"0"`), and the cache's set, get and delete, with its raw-bytes replies.
#[tokio::test]
async fn a_pylm_client_calls_a_rylm_server() {
    let Some(python) = rylm_testkit::pylm_python("a_pylm_client_calls_a_rylm_server") else {
        return;
    };
    let server = Server::builder("rylmserver")
        .pylm_wire()
        .functions(functions())
        .start()
        .await
        .expect("starts");
    // A long-lived rylm client (pylm wire) calls the same server all along: the publisher may
    // send its results at once, but must not let that clearance leak to pylm's per-call SUBs.
    let steady = {
        use rylm_components::{Client, ClientOptions};
        let db = server.db_address().to_owned();
        tokio::spawn(async move {
            let client = Client::connect_with(&db, ClientOptions::pylm(Duration::from_secs(30)))
                .await
                .expect("a rylm client connects in pylm mode");
            let mut answered = 0;
            for i in 0..200 {
                let result = tokio::time::timeout(
                    Duration::from_secs(20),
                    client.eval("upper", format!("steady {i}")),
                )
                .await
                .expect("answered in time")
                .expect("answered");
                assert_eq!(&result[..], format!("STEADY {i}").as_bytes());
                answered += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answered
        })
    };
    let got = python_prints(
        &python,
        &[SCRIPT, "rylmserver", server.db_address()],
        "a pylm client of a rylm server",
    )
    .await;
    assert_eq!(got["eval"], "HELLO FROM PYLM");
    let expected: Vec<String> = (0..10).map(|i| format!("{i}{i}")).collect();
    assert_eq!(got["job"], serde_json::json!(expected));
    assert_eq!(
        got["fail"], "0",
        "pylm peers get b\"0\" for a failed function"
    );
    assert_eq!(got["set"], "a-key");
    assert_eq!(got["get"], "a value");
    assert_eq!(
        got["delete"], "a-key",
        "pylm's cache answers a delete with the key"
    );
    assert_eq!(got["missing"], "");
    assert_eq!(got["new_key"], 36, "a set without a key answers a new uuid");
    let expected: Vec<String> = (0..30).map(|i| format!("CALL {i}")).collect();
    assert_eq!(got["evals"], serde_json::json!(expected));
    assert_eq!(steady.await.expect("the steady client"), 200);
    server.shutdown().await.expect("clean");
}

/// A rylm Client calls a real pylm Server: eval, a job, the cache, and pylm's `b"0"` for a failed
/// function (which a pylm server cannot tell apart from a result).
#[tokio::test]
async fn a_rylm_client_calls_a_pylm_server() {
    use rylm_components::{Client, ClientOptions};

    let Some(python) = rylm_testkit::pylm_python("a_rylm_client_calls_a_pylm_server") else {
        return;
    };
    let (pull, publish, db) = (free_port(), free_port(), free_port());
    let address = |p: u16| format!("tcp://127.0.0.1:{p}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pylm_server.py");
    let mut server = spawn_python(
        &python,
        &[
            script,
            "pyserver",
            &address(pull),
            &address(publish),
            &address(db),
        ],
    );

    // Connecting waits (within its deadline) for the server's cache, then makes sure its
    // subscription is live with a round trip, which a pylm server answers too.
    let client = Client::connect_with(&address(db), ClientOptions::pylm(Duration::from_secs(30)))
        .await
        .expect("connects to the pylm server");
    assert_eq!(client.server(), "pyserver");
    assert_eq!(
        &client.eval("upper", "hello pylm").await.expect("answered")[..],
        b"HELLO PYLM"
    );
    assert_eq!(
        &client.eval("fail", "x").await.expect("answered")[..],
        b"0",
        "pylm's answer to a failure"
    );
    let mut results = client.job("upper", (0..10).map(|i| Bytes::from(format!("m{i}"))), 4);
    let mut seen = 0;
    while let Some((index, result)) = tokio::time::timeout(Duration::from_secs(20), results.recv())
        .await
        .expect("in time")
    {
        assert_eq!(result.expect("answered"), Bytes::from(format!("M{index}")));
        seen += 1;
    }
    assert_eq!(seen, 10);
    assert_eq!(client.set(Some("k"), "v").await.expect("set"), "k");
    assert_eq!(client.get("k").await.expect("get"), Some(Bytes::from("v")));
    let _ = server.kill().await;
}

/// A rylm Worker serves a real pylm Master, which a rylm Client in pylm mode calls.
#[tokio::test]
async fn a_rylm_worker_serves_a_pylm_master() {
    use rylm_components::{Client, ClientOptions, Worker};

    let Some(python) = rylm_testkit::pylm_python("a_rylm_worker_serves_a_pylm_master") else {
        return;
    };
    let address = |p: u16| format!("tcp://127.0.0.1:{p}");
    let (pull, publish, worker_pull, worker_push, db) = (
        address(free_port()),
        address(free_port()),
        address(free_port()),
        address(free_port()),
        address(free_port()),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pylm_master.py");
    let mut master = spawn_python(
        &python,
        &[
            script,
            "pymaster",
            &pull,
            &publish,
            &worker_pull,
            &worker_push,
            &db,
        ],
    );

    let worker = Worker::builder(functions())
        .connect_pylm(&db, Duration::from_secs(30))
        .await
        .expect("the rylm worker joins the pylm master");
    let client = Client::connect_with(&db, ClientOptions::pylm(Duration::from_secs(30)))
        .await
        .expect("connects to the pylm master");
    assert_eq!(
        &client
            .eval("upper", "through a pylm master")
            .await
            .expect("answered")[..],
        b"THROUGH A PYLM MASTER"
    );
    assert_eq!(&client.eval("fail", "x").await.expect("answered")[..], b"0");
    let mut results = client.job(
        "reverse",
        (0..20).map(|i| Bytes::from(format!("{i:02}"))),
        5,
    );
    let mut seen = 0;
    while let Some((index, result)) = tokio::time::timeout(Duration::from_secs(20), results.recv())
        .await
        .expect("in time")
    {
        let expected: String = format!("{index:02}").chars().rev().collect();
        assert_eq!(result.expect("answered"), Bytes::from(expected));
        seen += 1;
    }
    assert_eq!(seen, 20);
    worker.shutdown().await;
    let _ = master.kill().await;
}

/// A pylm Client calls a rylm Master in pylm mode whose workers are pylm Workers, rylm Workers,
/// and both at once.
#[tokio::test]
async fn a_pylm_client_calls_a_rylm_master_with_pylm_and_rylm_workers() {
    use rylm_components::{Master, Worker};

    let Some(python) =
        rylm_testkit::pylm_python("a_pylm_client_calls_a_rylm_master_with_pylm_and_rylm_workers")
    else {
        return;
    };
    let worker_script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pylm_worker.py");
    for (pylm_workers, rylm_workers) in [(1, 0), (0, 1), (1, 1)] {
        let master = Master::builder("rylmmaster")
            .pylm_wire()
            .start()
            .await
            .expect("starts");
        let mut python_workers = Vec::new();
        for i in 0..pylm_workers {
            python_workers.push(spawn_python(
                &python,
                &[worker_script, &format!("pyworker{i}"), master.db_address()],
            ));
        }
        let mut workers = Vec::new();
        for _ in 0..rylm_workers {
            workers.push(
                Worker::builder(functions())
                    .connect_pylm(master.db_address(), Duration::from_secs(30))
                    .await
                    .expect("a rylm worker joins"),
            );
        }
        let got = python_prints(
            &python,
            &[SCRIPT, "rylmmaster", master.db_address()],
            &format!("{pylm_workers} pylm and {rylm_workers} rylm workers"),
        )
        .await;
        assert_eq!(
            got["eval"], "HELLO FROM PYLM",
            "{pylm_workers} pylm, {rylm_workers} rylm workers"
        );
        let expected: Vec<String> = (0..10).map(|i| format!("{i}{i}")).collect();
        assert_eq!(got["job"], serde_json::json!(expected));
        assert_eq!(got["fail"], "0");
        assert_eq!(got["get"], "a value");
        for worker in workers {
            worker.shutdown().await;
        }
        for mut process in python_workers {
            let _ = process.kill().await;
        }
        master.shutdown().await.expect("clean");
    }
}

/// A rylm Master in pylm mode runs its `scatter` and `gather` hooks between a real pylm Client
/// and a real pylm Worker: a message dropped, one sent on as two, results reshaped, and a hook
/// that panics loses its message without stopping the master.
#[tokio::test]
async fn a_pylm_mode_masters_hooks_shape_what_pylm_peers_exchange() {
    use rylm_components::Master;
    use rylm_message::Message;

    let Some(python) =
        rylm_testkit::pylm_python("a_pylm_mode_masters_hooks_shape_what_pylm_peers_exchange")
    else {
        return;
    };
    let master = Master::builder("hookmaster")
        .pylm_wire()
        .scatter(|message: Message| match &message.payload[..] {
            b"drop" => Vec::new(),
            b"twice" => vec![message.clone(), message],
            b"boom" => panic!("a scatter hook that panics"),
            _ => vec![message],
        })
        .gather(|mut result: Message| {
            let mut payload = result.payload.to_vec();
            payload.push(b'!');
            result.payload = Bytes::from(payload);
            vec![result]
        })
        .start()
        .await
        .expect("starts");
    let worker_script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pylm_worker.py");
    let _worker = spawn_python(&python, &[worker_script, "pyworker", master.db_address()]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pylm_hooks_client.py");
    let got = python_prints(
        &python,
        &[script, "hookmaster", master.db_address()],
        "a master's hooks",
    )
    .await;
    assert_eq!(got["eval"], "HEY!");
    assert_eq!(got["job"], serde_json::json!(["ba!", "eciwt!", "eciwt!"]));
    assert_eq!(got["after_panic"], serde_json::json!(["OK!"]));
    assert_eq!(got["last"], "STILL HERE!");
    master.shutdown().await.expect("clean");
}

/// A pipeline that mixes pylm and rylm stages: a rylm Server, a real pylm Pipeline, a rylm Sink,
/// all in pylm's wire format; a rylm Client takes the results from the Sink.
#[tokio::test]
async fn a_pipeline_mixes_pylm_and_rylm_stages() {
    use rylm_components::{Client, ClientOptions};

    let Some(python) = rylm_testkit::pylm_python("a_pipeline_mixes_pylm_and_rylm_stages") else {
        return;
    };
    let first = Server::builder("first")
        .pylm_wire()
        .functions(functions())
        .start()
        .await
        .expect("starts");
    let (middle_db, middle_pub) = (
        format!("tcp://127.0.0.1:{}", free_port()),
        format!("tcp://127.0.0.1:{}", free_port()),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pylm_pipeline.py");
    let mut middle = spawn_python(
        &python,
        &[
            script,
            "middle",
            &middle_db,
            first.stream_address(),
            &middle_pub,
            "first",
        ],
    );
    let exclaim = Functions::new().add("exclaim", |p: Bytes| async move {
        let mut v = p.to_vec();
        v.push(b'!');
        Ok::<_, String>(Bytes::from(v))
    });
    let last = Server::sink("last")
        .subscribe_to(&middle_pub, &["middle"])
        .pylm_wire()
        .functions(exclaim)
        .start()
        .await
        .expect("starts");

    let mut options = ClientOptions::pylm(Duration::from_secs(30));
    options.results_from = Some(last.db_address().to_owned());
    let client = Client::connect_with(first.db_address(), options)
        .await
        .expect("connects through the chain");
    let result = client
        .eval_stages(&["first.upper", "middle.reverse", "last.exclaim"], "abc")
        .await
        .expect("through rylm, pylm and rylm stages");
    assert_eq!(&result[..], b"CBA!");
    let _ = middle.kill().await;
    last.shutdown().await.expect("clean");
    first.shutdown().await.expect("clean");
}

/// A rylm MuxWorker behind a rylm Master in pylm mode answers one message of a real pylm Client
/// with several results (pylm's `eval(..., messages=3)`).
#[tokio::test]
async fn a_pylm_client_gets_every_result_of_a_rylm_mux_worker() {
    use rylm_components::{Master, Worker};

    let Some(python) =
        rylm_testkit::pylm_python("a_pylm_client_gets_every_result_of_a_rylm_mux_worker")
    else {
        return;
    };
    let master = Master::builder("muxmaster")
        .pylm_wire()
        .start()
        .await
        .expect("starts");
    let split = Functions::new().add_mux("split", |p: Bytes| async move {
        Ok::<_, String>(
            String::from_utf8_lossy(&p)
                .split(' ')
                .map(|w| Bytes::from(w.to_owned()))
                .collect::<Vec<_>>(),
        )
    });
    let worker = Worker::builder(split)
        .connect_pylm(master.db_address(), Duration::from_secs(30))
        .await
        .expect("joins");
    let code = "import sys, json\nfrom pylm.clients import Client\nc = Client('muxmaster', sys.argv[1])\nprint(json.dumps(sorted(r.decode() for r in c.eval('muxmaster.split', b'one two three', messages=3))))";
    let got = python_prints(
        &python,
        &["-c", code, master.db_address()],
        "a mux worker's results",
    )
    .await;
    assert_eq!(got, serde_json::json!(["one", "three", "two"]));
    worker.shutdown().await;
    master.shutdown().await.expect("clean");
}

/// A rylm Hub in pylm mode farms out a rylm Server's stream to a real pylm Worker, and a rylm
/// Client takes the results from the Hub: the Hub's clients reach an earlier server, so its
/// publisher must hold results for them without the connection news a Master has.
#[tokio::test]
async fn a_rylm_hub_in_pylm_mode_feeds_a_pylm_worker() {
    use rylm_components::{Client, ClientOptions, Master};

    let Some(python) = rylm_testkit::pylm_python("a_rylm_hub_in_pylm_mode_feeds_a_pylm_worker")
    else {
        return;
    };
    let first = Server::builder("first")
        .pylm_wire()
        .functions(functions())
        .start()
        .await
        .expect("starts");
    let hub = Master::builder("hub")
        .pylm_wire()
        .subscribe_to(first.stream_address(), &["first"])
        .start()
        .await
        .expect("starts");
    let worker_script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pylm_worker.py");
    let mut worker = spawn_python(&python, &[worker_script, "pyworker", hub.db_address()]);
    let mut options = ClientOptions::pylm(Duration::from_secs(30));
    options.results_from = Some(hub.db_address().to_owned());
    let client = Client::connect_with(first.db_address(), options)
        .await
        .expect("connects through the hub");
    for word in ["abc", "hub", "pylm"] {
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            client.eval_stages(&["first.upper", "hub.reverse"], word),
        )
        .await
        .expect("answered in time")
        .expect("through a rylm server, a rylm hub and a pylm worker");
        let expected: String = word.to_uppercase().chars().rev().collect();
        assert_eq!(&result[..], expected.as_bytes());
    }
    let _ = worker.kill().await;
    hub.shutdown().await.expect("clean");
    first.shutdown().await.expect("clean");
}
