//! `rylm-zeromq-echo serve ADDRESS`: a ROUTER that echoes every message.
//! `rylm-zeromq-echo load ADDRESS TOTAL IN_FLIGHT SIZE`: a DEALER that sends TOTAL messages of
//! SIZE bytes, IN_FLIGHT at a time (each of IN_FLIGHT tasks awaits its echo before its next),
//! each matched to its echo by an id frame, and prints `count elapsed_s p50_s p99_s
//! peak_rss_kib`.
//!
//! The same protocol as rylm's own raw echo (`rylm_benches::RawEcho`), on `zeromq` 0.7.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(args.get(2).ok_or("serve ADDRESS")?).await,
        Some("load") => {
            let number = |i: usize| -> Result<usize, Error> {
                Ok(args.get(i).ok_or("load ADDRESS TOTAL IN_FLIGHT SIZE")?.parse()?)
            };
            load(args.get(2).ok_or("load ADDRESS")?, number(3)?, number(4)?, number(5)?).await
        }
        _ => Err("usage: rylm-zeromq-echo serve ADDRESS | load ADDRESS TOTAL IN_FLIGHT SIZE".into()),
    }
}

async fn serve(address: &str) -> Result<(), Error> {
    let mut router = RouterSocket::new();
    router.bind(address).await?;
    println!("ready");
    while let Ok(message) = router.recv().await {
        router.send(message).await?;
    }
    Ok(())
}

/// The same shape as `rylm_benches::measure` over `RawEcho`: `in_flight` tasks, each sending
/// one call and awaiting its echo (matched by id through a map of oneshots) before the next.
async fn load(address: &str, total: usize, in_flight: usize, size: usize) -> Result<(), Error> {
    let mut dealer = DealerSocket::new();
    dealer.connect(address).await?;
    let (sender, mut receiver) = dealer.split();
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let waiting: Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>> = Arc::default();
    let dispatch = waiting.clone();
    tokio::spawn(async move {
        while let Ok(message) = receiver.recv().await {
            let Some(id) = message.get(0).and_then(|f| <[u8; 8]>::try_from(f.as_ref()).ok()) else {
                continue;
            };
            let waiter = dispatch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&u64::from_be_bytes(id));
            if let Some(waiter) = waiter {
                let _ = waiter.send(());
            }
        }
    });
    let payload = Bytes::from(vec![b'x'; size]);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let (sender, waiting, next, payload) =
            (sender.clone(), waiting.clone(), next.clone(), payload.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return Ok::<_, Error>(latencies);
                }
                let sent = Instant::now();
                let (done, answered) = tokio::sync::oneshot::channel();
                waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(n as u64, done);
                let mut message = ZmqMessage::from(Bytes::copy_from_slice(&(n as u64).to_be_bytes()));
                message.push_back(payload.clone());
                sender.lock().await.send(message).await?;
                tokio::time::timeout(Duration::from_secs(30), answered).await??;
                latencies.push(sent.elapsed());
            }
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{} {} {} {} {}",
        latencies.len(),
        elapsed.as_secs_f64(),
        at(0.5).as_secs_f64(),
        at(0.99).as_secs_f64(),
        peak_rss_kib()
    );
    Ok(())
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
