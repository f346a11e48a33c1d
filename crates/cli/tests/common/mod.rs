//! Running `rylm` processes in tests: started on free loopback ports, ready when they say so,
//! killed and reaped when dropped (on failure too).

#![allow(dead_code)]

use std::time::{Duration, Instant};

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
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmHWM")
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
        Ports {
            pull: free_address(),
            publish: free_address(),
            db: free_address(),
            workers: free_address(),
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

/// `tcp://127.0.0.1:<a free port>`.
pub fn free_address() -> String {
    format!("tcp://127.0.0.1:{}", rylm_testkit::free_port())
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
