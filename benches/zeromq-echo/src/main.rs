//! `rylm-zeromq-echo serve ADDRESS`: a ROUTER that echoes every message.
//! `rylm-zeromq-echo load ADDRESS TOTAL IN_FLIGHT SIZE`: a DEALER that sends TOTAL messages of
//! SIZE bytes, IN_FLIGHT at a time, each matched to its echo by an id frame, and prints
//! `count elapsed_s p50_s p99_s peak_rss_kib`.
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

async fn load(address: &str, total: usize, in_flight: usize, size: usize) -> Result<(), Error> {
    let mut dealer = DealerSocket::new();
    dealer.connect(address).await?;
    let (mut sender, mut receiver) = dealer.split();
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let payload = Bytes::from(vec![b'x'; size]);
    let collector = {
        let (sent, slots) = (sent.clone(), slots.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total);
            while latencies.len() < total {
                let Ok(message) = receiver.recv().await else { break };
                let Some(id) = message.get(0).and_then(|f| <[u8; 8]>::try_from(f.as_ref()).ok())
                else {
                    continue;
                };
                let started = sent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&u64::from_be_bytes(id));
                if let Some(started) = started {
                    latencies.push(started.elapsed());
                    slots.add_permits(1);
                }
            }
            latencies
        })
    };
    let started = Instant::now();
    for id in 0..total as u64 {
        slots.acquire().await?.forget();
        sent.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Instant::now());
        let mut message = ZmqMessage::from(Bytes::copy_from_slice(&id.to_be_bytes()));
        message.push_back(payload.clone());
        sender.send(message).await?;
    }
    let mut latencies = tokio::time::timeout(Duration::from_secs(120), collector).await??;
    let elapsed = started.elapsed();
    if latencies.len() < total {
        return Err(format!("{} of {total} echoes came back", latencies.len()).into());
    }
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
