//! What the Gilmour tests share: reading `redis-cli MONITOR` lines.
#![allow(dead_code)]

/// One MONITOR line's command and arguments, unquoted.
pub fn command(line: &str) -> Option<Vec<String>> {
    let rest = line.split_once("] ")?.1;
    let mut args = Vec::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut arg = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => arg.push(chars.next()?),
                other => arg.push(other),
            }
        }
        args.push(arg);
    }
    Some(args)
}

/// `host:port` of a `redis://[user:pass@]host:port[/db]` URL.
pub fn redis_address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// A raw `MONITOR` connection that records every command Redis runs until it is stopped.
pub struct Monitor {
    stop: tokio::sync::oneshot::Sender<()>,
    lines: tokio::task::JoinHandle<Vec<String>>,
}

impl Monitor {
    /// Starts monitoring the Redis at `url`; returns once Redis has said `+OK`.
    pub async fn start(url: &str) -> Monitor {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let stream = tokio::net::TcpStream::connect(redis_address(url))
            .await
            .expect("connects to Redis");
        let (read, mut write) = stream.into_split();
        write.write_all(b"MONITOR\r\n").await.expect("MONITOR");
        let mut reader = tokio::io::BufReader::new(read).lines();
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), reader.next_line())
            .await
            .expect("Redis answers MONITOR")
            .expect("reads")
            .expect("a line");
        assert_eq!(first, "+OK", "MONITOR is accepted");
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let lines = tokio::spawn(async move {
            let _write = write;
            let mut lines = Vec::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => return lines,
                    line = reader.next_line() => match line {
                        Ok(Some(line)) => lines.push(line),
                        _ => return lines,
                    },
                }
            }
        });
        Monitor { stop, lines }
    }

    /// Stops, and gives every command seen, parsed.
    pub async fn stop(self) -> Vec<Vec<String>> {
        let _ = self.stop.send(());
        self.lines
            .await
            .expect("the monitor task")
            .iter()
            .filter_map(|l| command(l.trim_start_matches('+')))
            .collect()
    }
}
