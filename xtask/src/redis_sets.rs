//! Redis beyond one server, for the tests of Gilmour's topologies: a primary, a replica and
//! three sentinels watching them (service `rylm`), and a three-primary cluster, every process
//! on loopback in the servers' directory, started and stopped with the others.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::provision::{free_ports, redis_ping, spawn, wait_until};

/// The name sentinels know the primary by.
pub const SENTINEL_SERVICE: &str = "rylm";

/// The process names of the Sentinel set and the cluster, in the order they stop.
pub const NAMES: [&str; 8] = [
    "sentinel-3",
    "sentinel-2",
    "sentinel-1",
    "redis-replica",
    "redis-primary",
    "redis-c3",
    "redis-c2",
    "redis-c1",
];

const READY_WITHIN: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(5);

/// One command on a fresh connection, in the inline form, and the first reply (at most 64
/// KiB): enough for readiness checks.
pub fn ask(port: u16, command: &str) -> std::io::Result<String> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut answer = vec![0u8; 64 << 10];
    let n = stream.read(&mut answer)?;
    answer.truncate(n);
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn redis(bin: &Path, dir: &Path, name: &str, port: u16) -> Result<Command> {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let mut command = Command::new(bin);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&data)
        .current_dir(&data);
    Ok(command)
}

/// Starts a primary, its replica and three sentinels; returns the sentinels' ports once they
/// all know the primary, its replica and each other.
pub fn start_sentinel_set(dir: &Path, bin: &Path) -> Result<[u16; 3]> {
    let [primary, replica, s1, s2, s3] = free_ports()?;
    spawn(
        dir,
        "redis-primary",
        redis(bin, dir, "redis-primary", primary)?,
        GRACE,
    )?;
    let mut replica_command = redis(bin, dir, "redis-replica", replica)?;
    replica_command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
    spawn(dir, "redis-replica", replica_command, GRACE)?;
    wait_until(
        "the Redis primary",
        dir,
        "redis-primary",
        READY_WITHIN,
        || redis_ping(primary),
    )?;
    wait_until(
        "the Redis replica",
        dir,
        "redis-replica",
        READY_WITHIN,
        || ask(replica, "INFO replication").is_ok_and(|i| i.contains("master_link_status:up")),
    )?;
    let sentinels = [s1, s2, s3];
    for (port, name) in sentinels
        .iter()
        .zip(["sentinel-1", "sentinel-2", "sentinel-3"])
    {
        let data = dir.join(name);
        std::fs::create_dir_all(&data)?;
        // Sentinel rewrites its file: one per sentinel, in its own directory.
        let conf = data.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n\
                 sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                 sentinel failover-timeout {SENTINEL_SERVICE} 5000\n\
                 sentinel parallel-syncs {SENTINEL_SERVICE} 1\n",
                data.display()
            ),
        )?;
        let mut command = Command::new(bin);
        command.arg(&conf).arg("--sentinel").current_dir(&data);
        spawn(dir, name, command, GRACE)?;
    }
    for (port, name) in sentinels
        .iter()
        .zip(["sentinel-1", "sentinel-2", "sentinel-3"])
    {
        wait_until("a Redis sentinel", dir, name, READY_WITHIN, || {
            ask(*port, "INFO sentinel").is_ok_and(|info| {
                info.contains(&format!("name={SENTINEL_SERVICE},status=ok"))
                    && info.contains("slaves=1,sentinels=3")
            })
        })?;
    }
    Ok(sentinels)
}

/// Starts three cluster-enabled Redis servers and makes them one cluster, each primary
/// serving a third of the slots; returns their ports once the cluster is `ok`.
pub fn start_cluster(dir: &Path, bin: &Path, cli: &Path) -> Result<[u16; 3]> {
    let ports: [u16; 3] = free_ports()?;
    for (port, name) in ports.iter().zip(["redis-c1", "redis-c2", "redis-c3"]) {
        let mut command = redis(bin, dir, name, *port)?;
        command.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]);
        command.args(["--cluster-config-file", "nodes.conf"]);
        spawn(dir, name, command, GRACE)?;
        wait_until("a Redis cluster node", dir, name, READY_WITHIN, || {
            redis_ping(*port)
        })?;
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let created = Command::new(cli)
        .args(["--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .context("running redis-cli --cluster create")?;
    if !created.status.success() {
        bail!(
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
    }
    for (port, name) in ports.iter().zip(["redis-c1", "redis-c2", "redis-c3"]) {
        wait_until("the Redis cluster", dir, name, READY_WITHIN, || {
            ask(*port, "CLUSTER INFO").is_ok_and(|info| {
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
            })
        })?;
    }
    Ok(ports)
}
