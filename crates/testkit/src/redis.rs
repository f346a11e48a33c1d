//! A private `redis-server` on a free loopback port, that a test can kill and start again on
//! the same port (its data directory removed when dropped).

use std::time::{Duration, Instant};

/// A Redis of the test's own.
#[derive(Debug)]
pub struct PrivateRedis {
    program: String,
    password: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// Starts `program` (from [`crate::redis_server`]) with `password` (none when empty) and
    /// waits, at most 10 s, until it listens.
    ///
    /// # Panics
    ///
    /// When it cannot start or does not listen in time.
    pub fn start(program: &str, password: &str) -> PrivateRedis {
        let port = crate::free_port();
        let dir = std::env::temp_dir().join(format!("rylm-test-redis-{port}"));
        std::fs::create_dir_all(&dir).expect("a directory");
        let mut redis = PrivateRedis {
            program: program.to_owned(),
            password: password.to_owned(),
            port,
            dir,
            child: None,
        };
        redis.run();
        redis
    }

    /// Starts it again on the same port, after [`PrivateRedis::kill`].
    ///
    /// # Panics
    ///
    /// As [`PrivateRedis::start`].
    pub fn run(&mut self) {
        let mut command = std::process::Command::new(&self.program);
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        if !self.password.is_empty() {
            command.args(["--requirepass", &self.password]);
        }
        let child = command
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starts redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server listens within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis://[:password@]127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        if self.password.is_empty() {
            format!("redis://127.0.0.1:{}", self.port)
        } else {
            format!("redis://:{}@127.0.0.1:{}", self.password, self.port)
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
