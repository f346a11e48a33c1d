//! Running `rylm` processes in tests: started on free loopback ports, ready when they say so,
//! killed and reaped when dropped (on failure too).

#![allow(dead_code)]

use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running `rylm` process.
pub struct Rylm {
    pub child: Child,
    pub args: Vec<String>,
}

impl Rylm {
    /// Starts `rylm ARGS` and waits (bounded) for the line that says it serves.
    pub async fn start<S: AsRef<str>>(args: &[S]) -> Rylm {
        Rylm::start_in(None, args).await
    }

    /// `rylm ARGS` run as a command of its own: in the network namespace `netns` if given.
    pub fn command<S: AsRef<str>>(netns: Option<&str>, args: &[S]) -> Command {
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new(ip());
                command.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_rylm")]);
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_rylm")),
        };
        command.args(args.iter().map(AsRef::as_ref));
        command
    }

    /// [`Rylm::start`] in the network namespace `netns` (if given).
    pub async fn start_in<S: AsRef<str>>(netns: Option<&str>, args: &[S]) -> Rylm {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut child = Rylm::command(netns, &args)
                .env("RUST_LOG", "warn")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("rylm starts");
            let stderr = child.stderr.take().expect("stderr");
            let mut lines = BufReader::new(stderr).lines();
            let ready = tokio::time::timeout(DEADLINE, async {
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("Ctrl-C stops") {
                        return true;
                    }
                }
                false
            })
            .await;
            if ready == Ok(true) {
                // Keep reading its log, so that it never blocks on a full pipe (and show it
                // with RYLM_TEST_ECHO=1, when looking into a test).
                let echo = std::env::var_os("RYLM_TEST_ECHO").is_some();
                let name = args.first().map(|a| (*a).to_owned()).unwrap_or_default();
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        if echo {
                            eprintln!("[{name}] {line}");
                        }
                    }
                });
                return Rylm {
                    child,
                    args: args.iter().map(|a| (*a).to_owned()).collect(),
                };
            }
            // A port of a process just killed may still be held for a moment: retry, bounded.
            let _ = child.kill().await;
            assert!(
                Instant::now() < deadline,
                "rylm {args:?} did not start within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("killed");
    }

    /// Sends SIGTERM, as systemd, Kubernetes and Docker stop a process, and waits (bounded) for
    /// it to end: its exit status, and how long it took.
    pub async fn terminate(mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let pid = self.child.id().expect("running").to_string();
        let started = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM sent");
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("rylm {:?} did not stop within {within:?}", self.args))
            .expect("reaped");
        (status, started.elapsed())
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its peak resident memory, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Its resident memory now, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to it.
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "SIG{signal} sent");
    }
}

/// The addresses of a server (`pull`, `pub`, `db`) or master (and `workers`) on free ports.
pub struct Ports {
    pub pull: String,
    pub publish: String,
    pub db: String,
    pub workers: String,
}

impl Ports {
    pub fn new() -> Ports {
        let [pull, publish, db, workers] =
            <[String; 4]>::try_from(free_addresses(4)).expect("four addresses");
        Ports {
            pull,
            publish,
            db,
            workers,
        }
    }

    /// `rylm server` named `name` on these ports.
    pub fn server(&self, name: &str) -> Vec<String> {
        [
            "server",
            "--name",
            name,
            "--pull",
            &self.pull,
            "--pub",
            &self.publish,
            "--db",
            &self.db,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// `rylm master` named `name` on these ports.
    pub fn master(&self, name: &str) -> Vec<String> {
        let mut args = self.server(name);
        args[0] = "master".into();
        args.extend(["--workers".to_owned(), self.workers.clone()]);
        args
    }
}

/// The `ip` program (iproute2): `RYLM_IP` when xtask installed it, else from the PATH.
pub fn ip() -> String {
    std::env::var("RYLM_IP").unwrap_or_else(|_| "ip".to_owned())
}

/// `count` different `tcp://127.0.0.1:<a free port>` addresses (different from each other and
/// from every other address of this test process: `free_port` never hands out a port twice).
pub fn free_addresses(count: usize) -> Vec<String> {
    (0..count).map(|_| free_address()).collect()
}

/// `tcp://127.0.0.1:<a free port>`.
pub fn free_address() -> String {
    format!("tcp://127.0.0.1:{}", rylm_testkit::free_port())
}

/// Runs `command` to its end and returns what it wrote; panics with its standard error unless
/// it succeeds.
pub async fn succeeds(command: &mut Command) -> std::process::Output {
    let output = command.output().await.expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Retries `attempt` until it succeeds or `within` passes; the time it took.
pub async fn until_ok<T, E: std::fmt::Debug, F, Fut>(
    within: Duration,
    mut attempt: F,
) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return (value, started.elapsed()),
            Err(error) => {
                assert!(
                    started.elapsed() < within,
                    "no success within {within:?}; last error: {error:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `rylm client ... job` (in `netns`, if given): each `index\tvalue` line it prints, as it prints it.
pub struct Job {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    results: BTreeMap<usize, Vec<String>>,
}

impl Job {
    pub fn start(netns: Option<&str>, db: &str, function: &str, payloads: &[String]) -> Job {
        let mut args = vec![
            "client".to_owned(),
            "--db".into(),
            db.into(),
            "--timeout".into(),
            "60".into(),
            "job".into(),
            function.into(),
        ];
        args.extend(payloads.iter().cloned());
        args.extend(["--in-flight".to_owned(), "8".into()]);
        let mut child = Rylm::command(netns, &args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the client starts");
        let stdout = child.stdout.take().expect("stdout");
        Job {
            child,
            lines: BufReader::new(stdout).lines(),
            results: BTreeMap::new(),
        }
    }

    /// Reads results until `count` have come (true) or the output ends (false), bounded.
    pub async fn until(&mut self, count: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.received() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => self.record(&line),
                Ok(_) => return false,
                Err(_) => panic!("{count} results did not come within {within:?}"),
            }
        }
        true
    }

    fn record(&mut self, line: &str) {
        let (index, value) = line.split_once('\t').expect("index<TAB>value");
        let index = index.parse().expect("an index");
        self.results
            .entry(index)
            .or_default()
            .push(value.to_owned());
    }

    pub fn received(&self) -> usize {
        self.results.values().map(Vec::len).sum()
    }

    pub async fn finish(mut self, within: Duration) -> BTreeMap<usize, Vec<String>> {
        self.until(usize::MAX, within).await;
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the client ends")
            .expect("reaped");
        assert!(status.success(), "the client failed: {status}");
        self.results
    }
}

/// Asserts that call `i` was answered exactly once, with `payloads[i]`.
pub fn exactly_once(payloads: &[String], results: &BTreeMap<usize, Vec<String>>) {
    let mut duplicated = 0;
    for (index, payload) in payloads.iter().enumerate() {
        let values = results.get(&index).map(Vec::as_slice).unwrap_or_default();
        assert!(!values.is_empty(), "call {index} was never answered");
        duplicated += values.len() - 1;
        assert!(
            values.iter().all(|v| v == payload),
            "call {index}: {values:?}"
        );
    }
    assert_eq!(duplicated, 0, "every answer exactly once");
    assert_eq!(
        results.len(),
        payloads.len(),
        "no answer to a call never made"
    );
}

/// Writes `request` (raw HTTP/1.1, `Connection: close`) to `address` and reads the whole
/// answer within 10 s; an answer other than 200 is an error (to retry with [`until_ok`]).
#[allow(dead_code)]
pub async fn http_raw(address: &str, request: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    if answer.starts_with("HTTP/1.1 200") {
        Ok(answer)
    } else {
        Err(answer)
    }
}

/// A ZMTP 3.0 greeting (NULL) and a long-frame header declaring 2^46 bytes: 73 bytes.
pub fn hostile_bytes() -> Vec<u8> {
    let mut bytes = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, 3, 0];
    let mut mechanism = b"NULL".to_vec();
    mechanism.resize(20, 0);
    bytes.extend(mechanism);
    bytes.resize(64, 0);
    bytes.push(0x02);
    bytes.extend((1u64 << 46).to_be_bytes());
    bytes
}

/// Sends the hostile bytes to `address` and waits (bounded) for the peer to close.
pub async fn attack(address: &str) {
    let mut stream = tokio::net::TcpStream::connect(address.trim_start_matches("tcp://"))
        .await
        .expect("the port is open");
    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &hostile_bytes()).await;
    let mut buffer = [0u8; 256];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{address} kept the hostile connection open");
}
