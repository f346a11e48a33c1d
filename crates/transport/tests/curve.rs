//! CURVE on real sockets: allowed clients work, unknown or keyless ones never deliver a
//! message, and the handshake interoperates with libzmq (pyzmq) both ways.

use std::time::Duration;

use bytes::Bytes;
use rylm_transport::{Keypair, Kind, Options, Security, Socket};

const DEADLINE: Duration = Duration::from_secs(20);

fn server_options(server: &Keypair, allowed: Option<Vec<rylm_transport::PublicKey>>) -> Options {
    Options::default().security(Security::CurveServer {
        keypair: server.clone(),
        allowed,
    })
}

fn client_options(client: &Keypair, server: &Keypair) -> Options {
    Options::default().security(Security::CurveClient {
        keypair: client.clone(),
        server: server.public,
    })
}

#[tokio::test]
async fn only_allowed_client_keys_reach_the_server() {
    let server_keys = Keypair::generate();
    let allowed = Keypair::generate();
    let stranger = Keypair::generate();
    let server = Socket::new(
        Kind::Router,
        &server_options(&server_keys, Some(vec![allowed.public])),
    )
    .expect("router");
    let address = server.bind("tcp://127.0.0.1:0").await.expect("bind");

    // A stranger with a valid CURVE handshake but an unknown key, a NULL client, and a client
    // that has the wrong server key: each sends first.
    let intruders = [
        Socket::new(Kind::Dealer, &client_options(&stranger, &server_keys)),
        Socket::new(Kind::Dealer, &Options::default()),
        Socket::new(Kind::Dealer, &client_options(&allowed, &stranger)),
    ];
    for intruder in &intruders {
        let intruder = intruder.as_ref().expect("dealer");
        intruder.connect(&address).await.expect("connect");
        let _ = intruder
            .send_within(vec!["intrusion".into()], Duration::from_millis(300))
            .await;
    }
    let friend =
        Socket::new(Kind::Dealer, &client_options(&allowed, &server_keys)).expect("dealer");
    friend.connect(&address).await.expect("connect");
    friend.send(vec!["friend".into()]).await.expect("send");

    let first = tokio::time::timeout(DEADLINE, server.recv())
        .await
        .expect("the friend's message")
        .expect("receive");
    assert_eq!(first.last(), Some(&Bytes::from("friend")));
    server
        .send(vec![first[0].clone(), "welcome".into()])
        .await
        .expect("reply");
    let reply = tokio::time::timeout(DEADLINE, friend.recv())
        .await
        .expect("reply in time")
        .expect("receive");
    assert_eq!(reply, vec![Bytes::from("welcome")]);
    // Nothing else ever arrives.
    let more = tokio::time::timeout(Duration::from_secs(2), server.recv()).await;
    assert!(more.is_err(), "an intruder got through: {more:?}");
    assert!(server.stats().handshake_failed >= 2, "{:?}", server.stats());
}

/// Runs `script` in the Python that has pyzmq (from pylm's environment), with `args`.
async fn python(test: &str, script: &str, args: &[String]) -> Option<tokio::process::Child> {
    let python = rylm_testkit::pylm_python(test)?;
    Some(
        tokio::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python starts"),
    )
}

const PY_SERVER: &str = r#"
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.curve_server = True
s.curve_secretkey = sys.argv[1].encode()
s.curve_publickey = zmq.curve_public(sys.argv[1].encode())
s.bind("tcp://127.0.0.1:" + sys.argv[2])
print("ready", flush=True)
s.RCVTIMEO = 20000
for _ in range(3):
    ident, body = s.recv_multipart()
    s.send_multipart([ident, b"py:" + body])
"#;

const PY_CLIENT: &str = r#"
import sys, zmq
ctx = zmq.Context()
c = ctx.socket(zmq.DEALER)
c.curve_serverkey = sys.argv[1].encode()
c.curve_secretkey = sys.argv[2].encode()
c.curve_publickey = zmq.curve_public(sys.argv[2].encode())
c.RCVTIMEO = 20000
c.LINGER = 0
c.connect(sys.argv[3])
for i in range(3):
    c.send(b"from-python-%d" % i)
    assert c.recv() == b"rust:from-python-%d" % i
print("done", flush=True)
"#;

#[tokio::test]
async fn curve_interoperates_with_libzmq_both_ways() {
    use tokio::io::AsyncBufReadExt;
    // rylm client, libzmq server.
    let server_keys = Keypair::generate();
    let port = rylm_testkit::free_port();
    let Some(mut child) = python(
        "curve_interoperates_with_libzmq_both_ways",
        PY_SERVER,
        &[secret_z85(&server_keys), port.to_string()],
    )
    .await
    else {
        return;
    };
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(DEADLINE, lines.next_line()).await;
    assert!(
        matches!(ready, Ok(Ok(Some(ref l))) if l == "ready"),
        "{ready:?}"
    );
    let client_keys = Keypair::generate();
    let client =
        Socket::new(Kind::Dealer, &client_options(&client_keys, &server_keys)).expect("dealer");
    client
        .connect(&format!("tcp://127.0.0.1:{port}"))
        .await
        .expect("connect");
    for i in 0..3 {
        client
            .send(vec![Bytes::from(format!("from-rust-{i}"))])
            .await
            .expect("send");
        let reply = tokio::time::timeout(DEADLINE, client.recv())
            .await
            .expect("libzmq answers")
            .expect("receive");
        assert_eq!(reply, vec![Bytes::from(format!("py:from-rust-{i}"))]);
    }
    let status = tokio::time::timeout(DEADLINE, child.wait()).await;
    assert!(matches!(status, Ok(Ok(s)) if s.success()), "{status:?}");

    // libzmq client, rylm server with an allow-list holding the Python client's key.
    let python_keys = Keypair::generate();
    let server = Socket::new(
        Kind::Router,
        &server_options(&server_keys, Some(vec![python_keys.public])),
    )
    .expect("router");
    let address = server.bind("tcp://127.0.0.1:0").await.expect("bind");
    let echo = {
        let server = server.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                let Ok(frames) = server.recv().await else {
                    return;
                };
                let reply = [b"rust:".as_slice(), &frames[1]].concat();
                let _ = server.send(vec![frames[0].clone(), reply.into()]).await;
            }
        })
    };
    let mut child = python(
        "curve_interoperates_with_libzmq_both_ways",
        PY_CLIENT,
        &[
            server_keys.public.to_z85(),
            secret_z85(&python_keys),
            address,
        ],
    )
    .await
    .expect("python was there a moment ago");
    let status = tokio::time::timeout(DEADLINE, child.wait()).await;
    assert!(matches!(status, Ok(Ok(s)) if s.success()), "{status:?}");
    echo.await.expect("echo task");
}

/// The secret key as Z85, through a certificate written and read back (the only way the API
/// shows a secret).
fn secret_z85(pair: &Keypair) -> String {
    let dir = std::env::temp_dir().join(format!(
        "rylm-curve-{}-{}",
        std::process::id(),
        pair.public.to_z85().replace(['/', '.', '#', '?', '*'], "_")
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let (_, secret) = pair.write(&dir.join("key")).expect("write");
    let text = std::fs::read_to_string(&secret).expect("read");
    std::fs::remove_dir_all(&dir).expect("cleanup");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("secret-key = "))
        .expect("secret line")
        .trim_matches('"')
        .to_owned()
}

#[tokio::test]
async fn plain_admits_the_right_password_only() {
    let server = Socket::new(
        Kind::Pull,
        &Options::default().security(Security::PlainServer {
            users: vec![("worker".into(), "right".into())],
        }),
    )
    .expect("pull");
    let address = server.bind("tcp://127.0.0.1:0").await.expect("bind");
    let client = |password: &str| {
        Socket::new(
            Kind::Push,
            &Options::default().security(Security::PlainClient {
                user: "worker".into(),
                password: password.into(),
            }),
        )
        .expect("push")
    };
    let wrong = client("wrong");
    wrong.connect(&address).await.expect("connect");
    let _ = wrong
        .send_within(vec!["intrusion".into()], Duration::from_millis(300))
        .await;
    let right = client("right");
    right.connect(&address).await.expect("connect");
    right.send(vec!["welcome".into()]).await.expect("send");
    let first = tokio::time::timeout(DEADLINE, server.recv())
        .await
        .expect("the right password's message")
        .expect("receive");
    assert_eq!(first, vec![Bytes::from("welcome")]);
    let more = tokio::time::timeout(Duration::from_secs(1), server.recv()).await;
    assert!(more.is_err(), "a wrong password got through: {more:?}");
}
