//! Options from flags, the environment and a TOML file (`--config`): flags win over the
//! environment, the environment over the file, and a command's own table over the file's top.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whether something answers `/healthz` at `address`.
async fn answers(address: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
        return false;
    };
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer));
    matches!(read.await, Ok(Ok(_))) && answer.starts_with("HTTP/1.1 200")
}

fn address() -> String {
    format!("127.0.0.1:{}", rylm_testkit::free_port())
}

fn tcp() -> String {
    format!("tcp://{}", address())
}

#[tokio::test]
async fn flags_win_over_the_environment_which_wins_over_the_file() {
    let dir = std::env::temp_dir().join(format!("rylm-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let file = dir.join("rylm.toml");
    let (from_file, from_env, from_flag, table) = (address(), address(), address(), address());
    // The file: an admin address at the top, beaten by the server's table (beaten by the
    // environment, beaten by the flag); the ports of the server from the file alone.
    std::fs::write(
        &file,
        format!(
            "admin = \"{from_file}\"\nstream = \"{}\"\ndb = \"{}\"\n[server]\nadmin = \"{table}\"\nclients = \"{}\"\n",
            tcp(),
            tcp(),
            tcp()
        ),
    )
    .expect("writes the file");
    // What the server says, for the message of a failure.
    let log = dir.join("rylm.log");
    let start = |env: Option<&str>, flag: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"));
        command.args(["server", "--config"]).arg(&file);
        if let Some(flag) = flag {
            command.args(["--admin", flag]);
        }
        if let Some(env) = env {
            command.env("RYLM_ADMIN", env);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("rylm starts")
    };
    for (env, flag, want, not) in [
        (None, None, &table, &from_file),
        (Some(from_env.as_str()), None, &from_env, &table),
        (
            Some(from_env.as_str()),
            Some(from_flag.as_str()),
            &from_flag,
            &from_env,
        ),
    ] {
        let mut server = start(env, flag);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !answers(want).await {
            if Instant::now() >= deadline {
                let _ = server.kill().await;
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("nothing answers at the admin listener {want}; the server said:\n{said}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!answers(not).await, "nothing at {not}");
        let _ = server.kill().await;
    }
    // A file that is not TOML stops the command with a message.
    std::fs::write(&file, "admin = ").expect("writes");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_rylm"))
        .args(["server", "--config"])
        .arg(&file)
        .output()
        .await
        .expect("runs");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("TOML"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
