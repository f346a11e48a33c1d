//! Private Redis and RabbitMQ servers for tests, demos and benches.
//!
//! Each run gets its own instances on free 127.0.0.1 ports, with every file (data, logs, the
//! Erlang cookie, crash dumps) in one temporary directory, and touches no system configuration,
//! so two runs can go side by side. Every process is started in a process group of its own
//! (its pid is the group id) and its pid is written to `<dir>/<name>.pid`, so that it can be
//! stopped exactly: by [`Servers`]'s `Drop`, by the Ctrl-C handler, or later by
//! `cargo xtask servers stop <dir>` when `--keep-servers` left them up.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where Debian's package puts the real server script. The `/usr/sbin` wrapper switches to the
/// `rabbitmq` user when run as root, whose HOME holds another Erlang cookie.
const DEBIAN_RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const INSTALL_COMMAND: &str = "apt-get install -y redis-server redis-tools rabbitmq-server";

const REDIS_READY_WITHIN: Duration = Duration::from_secs(20);
const EPMD_READY_WITHIN: Duration = Duration::from_secs(10);
/// RabbitMQ takes 8-12 s to start on two cores; the first start after an install is slower.
const RABBITMQ_READY_WITHIN: Duration = Duration::from_secs(120);

/// The process groups started by this xtask and not yet stopped, for the signal handler.
static STARTED: Mutex<Vec<Started>> = Mutex::new(Vec::new());
/// The directory of the servers in `STARTED`, removed once they are stopped.
static STARTED_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

#[derive(Debug)]
struct Started {
    name: &'static str,
    pid: u32,
    grace: Duration,
    child: Option<Child>,
}

/// Running servers. Dropping this stops them and deletes their directory, unless
/// [`Servers::keep`] was called.
#[derive(Debug)]
pub struct Servers {
    pub dir: PathBuf,
    pub redis_url: String,
    pub amqp_url: String,
    /// A script that runs `rabbitmqctl` against the private node (for restart tests).
    pub rabbitmqctl: PathBuf,
    /// The `redis-server` program, for tests that run and restart a Redis of their own.
    pub redis_server: PathBuf,
    /// A three-node RabbitMQ cluster: each node's AMQP URL, comma-separated.
    pub cluster_urls: String,
    /// Each cluster node's `rabbitmqctl` script, comma-separated, in the order of the URLs.
    pub cluster_ctls: String,
    /// Three sentinels watching a primary and its replica (service `rylm`): `host:port`,
    /// comma-separated; empty without the cluster servers.
    pub redis_sentinels: String,
    /// A three-primary Redis Cluster: `host:port`, comma-separated; empty without the cluster
    /// servers.
    pub redis_cluster: String,
    keep: bool,
}

impl Servers {
    /// Environment variables that point tests and examples at the servers.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RYLM_REDIS_URL", self.redis_url.clone()),
            ("RYLM_AMQP_URL", self.amqp_url.clone()),
            ("RYLM_RABBITMQCTL", self.rabbitmqctl.display().to_string()),
            ("RYLM_REDIS_SERVER", self.redis_server.display().to_string()),
            ("RYLM_AMQP_CLUSTER_URLS", self.cluster_urls.clone()),
            ("RYLM_AMQP_CLUSTER_CTLS", self.cluster_ctls.clone()),
            ("RYLM_REDIS_SENTINELS", self.redis_sentinels.clone()),
            (
                "RYLM_REDIS_SENTINEL_SERVICE",
                crate::redis_sets::SENTINEL_SERVICE.to_owned(),
            ),
            ("RYLM_REDIS_CLUSTER", self.redis_cluster.clone()),
        ]
    }

    /// Leaves the servers running when this value is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
        STARTED.lock().unwrap_or_else(|e| e.into_inner()).clear();
        STARTED_DIR.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if !self.keep {
            stop_started();
        }
    }
}

/// Stops whatever this process started and has not stopped yet. Safe to call from the signal
/// handler thread.
pub fn stop_started() {
    let mut started = STARTED.lock().unwrap_or_else(|e| e.into_inner());
    // Last started first: RabbitMQ before its epmd.
    while let Some(mut process) = started.pop() {
        stop_group(
            process.name,
            process.pid,
            process.grace,
            process.child.as_mut(),
        );
    }
    if let Some(dir) = STARTED_DIR.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Peak resident memory (VmHWM, KiB) of every process in the groups this run started, by
/// program name (RabbitMQ's beam.smp, epmd, redis-server...).
pub fn peak_rss() -> Vec<(String, u64)> {
    let groups: Vec<u32> = STARTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|p| p.pid)
        .collect();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised name: state, ppid, pgrp, ...
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let pgrp = rest
            .split_whitespace()
            .nth(2)
            .and_then(|f| f.parse::<u32>().ok());
        if !pgrp.is_some_and(|g| groups.contains(&g)) {
            continue;
        }
        let name = head
            .split_once('(')
            .map(|(_, n)| n.to_owned())
            .unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(kib) = kib {
            found.push((format!("{name} (pid {pid})"), kib));
        }
    }
    found.sort();
    found
}

/// Starts a private Redis and RabbitMQ (and, with `cluster`, a three-node RabbitMQ cluster)
/// and waits until all answer.
pub fn start(cluster: bool) -> Result<Servers> {
    let binaries = find_or_install()?;
    let dir = make_dir()?;
    *STARTED_DIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.clone());
    let started_at = Instant::now();
    let started = start_in(&dir, &binaries).and_then(|(redis_url, amqp_url, epmd_port)| {
        let (nodes, redis_sets) = if cluster {
            let sentinels = crate::redis_sets::start_sentinel_set(&dir, &binaries.redis)?;
            let redis_cluster =
                crate::redis_sets::start_cluster(&dir, &binaries.redis, &binaries.redis_cli)?;
            let list = |ports: &[u16]| {
                ports
                    .iter()
                    .map(|p| format!("127.0.0.1:{p}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            (
                start_cluster(&dir, &binaries, epmd_port)?,
                (list(&sentinels), list(&redis_cluster)),
            )
        } else {
            (Vec::new(), (String::new(), String::new()))
        };
        Ok((redis_url, amqp_url, nodes, redis_sets))
    });
    match started {
        Ok((redis_url, amqp_url, cluster, (redis_sentinels, redis_cluster))) => {
            eprintln!(
                "xtask: Redis and RabbitMQ{} ready in {:.1} s ({})",
                if cluster.is_empty() {
                    ""
                } else {
                    ", a Redis Sentinel set, a Redis Cluster and a three-node RabbitMQ cluster"
                },
                started_at.elapsed().as_secs_f64(),
                dir.display()
            );
            Ok(Servers {
                rabbitmqctl: dir.join("rabbitmqctl"),
                redis_server: binaries.redis.clone(),
                dir,
                redis_url,
                amqp_url,
                cluster_urls: cluster
                    .iter()
                    .map(|(url, _)| url.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                cluster_ctls: cluster
                    .iter()
                    .map(|(_, ctl)| ctl.display().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                redis_sentinels,
                redis_cluster,
                keep: false,
            })
        }
        Err(error) => {
            stop_started();
            Err(error)
        }
    }
}

/// Stops servers left running by `--keep-servers`, from the pid files in their directory.
pub fn stop_dir(dir: &Path) -> Result<()> {
    if !dir.join("redis.pid").exists() && !dir.join("rabbit.pid").exists() {
        bail!("{} holds no rylm server pid files", dir.display());
    }
    for (name, grace) in [
        ("rabbit-c3", Duration::from_secs(30)),
        ("rabbit-c2", Duration::from_secs(30)),
        ("rabbit-c1", Duration::from_secs(30)),
        ("rabbit", Duration::from_secs(30)),
        ("epmd", Duration::from_secs(2)),
        ("redis", Duration::from_secs(5)),
    ]
    .into_iter()
    .chain(
        crate::redis_sets::NAMES
            .iter()
            .map(|name| (*name, Duration::from_secs(5))),
    ) {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{name}.pid"))) else {
            continue;
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            continue;
        };
        // A pid may have been reused by a stranger since: only stop what is still ours.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy())
            || String::from_utf8_lossy(&cmdline).contains(expected_command(name));
        if ours {
            stop_group(name, pid, grace, None);
        }
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

fn expected_command(name: &str) -> &'static str {
    match name {
        "rabbit" | "rabbit-c1" | "rabbit-c2" | "rabbit-c3" => "rabbitmq-server",
        "epmd" => "epmd",
        _ => "redis-server",
    }
}

struct Binaries {
    redis: PathBuf,
    /// `redis-cli` (Debian's redis-tools, which redis-server brings), to create a cluster.
    redis_cli: PathBuf,
    rabbitmq: PathBuf,
    epmd: PathBuf,
}

fn find_or_install() -> Result<Binaries> {
    if let Some(found) = find_binaries() {
        return Ok(found);
    }
    if !may_install() {
        bail!(
            "redis-server and rabbitmq-server are needed and not installed.\n\
             Install them, then run this again. On Debian or Ubuntu:\n    sudo {INSTALL_COMMAND}"
        );
    }
    eprintln!(
        "xtask: redis-server or rabbitmq-server is missing; installing them with apt-get (root on Debian)"
    );
    apt_install(&["redis-server", "redis-tools", "rabbitmq-server"])?;
    find_binaries().context(
        "apt-get installed redis-server and rabbitmq-server, but their programs are still not found",
    )
}

/// True when this process may install system packages itself: root on Debian or Ubuntu.
pub fn may_install() -> bool {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0");
    is_root && Path::new("/etc/debian_version").exists() && which("apt-get").is_some()
}

/// `apt-get update`, then `apt-get install -y` of `packages`, non-interactively.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q"];
    install.extend_from_slice(packages);
    apt(&install)
}

fn find_binaries() -> Option<Binaries> {
    let rabbitmq = if Path::new(DEBIAN_RABBITMQ_SERVER).exists() {
        PathBuf::from(DEBIAN_RABBITMQ_SERVER)
    } else {
        which("rabbitmq-server")?
    };
    Some(Binaries {
        redis: which("redis-server")?,
        redis_cli: which("redis-cli")?,
        rabbitmq,
        epmd: which("epmd").or_else(|| {
            let debian = Path::new("/usr/lib/erlang/bin/epmd");
            debian.exists().then(|| debian.to_path_buf())
        })?,
    })
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn make_dir() -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("rylm-svc.{}.{nanos}", std::process::id()));
    std::fs::create_dir_all(dir.join("redis"))
        .and_then(|()| std::fs::create_dir_all(dir.join("rabbit/mnesia")))
        .and_then(|()| std::fs::create_dir_all(dir.join("rabbit/log")))
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub(crate) fn free_ports<const N: usize>() -> Result<[u16; N]> {
    // Hold all listeners at once so that the ports differ, then release them.
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free loopback ports")?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

fn start_in(dir: &Path, bin: &Binaries) -> Result<(String, String, u16)> {
    let [redis_port, amqp_port, dist_port, epmd_port] = free_ports()?;

    let redis_dir = dir.join("redis");
    let mut redis = Command::new(&bin.redis);
    redis
        .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&redis_dir)
        .arg("--logfile")
        .arg(redis_dir.join("redis.log"))
        .current_dir(&redis_dir);
    spawn(dir, "redis", redis, Duration::from_secs(5))?;

    let rabbit = dir.join("rabbit");
    std::fs::write(rabbit.join("enabled_plugins"), "[].\n")?;
    std::fs::write(rabbit.join("rabbitmq.conf"), "")?;
    let node = format!("rylm-{}-{amqp_port}@localhost", std::process::id());
    let erlang_env = node_env(&rabbit, &rabbit, &node, amqp_port, dist_port, epmd_port);

    // Our own epmd, so that RabbitMQ neither joins the shared one nor daemonizes one.
    let mut epmd = Command::new(&bin.epmd);
    epmd.args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
        .current_dir(&rabbit)
        .envs(erlang_env.iter().map(|(k, v)| (*k, v.as_str())));
    spawn(dir, "epmd", epmd, Duration::from_secs(2))?;

    write_rabbitmqctl(&dir.join("rabbitmqctl"), &bin.rabbitmq, &erlang_env)?;
    let mut rabbitmq = Command::new(&bin.rabbitmq);
    rabbitmq
        .current_dir(&rabbit)
        .envs(erlang_env.iter().map(|(k, v)| (*k, v.as_str())));

    wait_until("Redis", dir, "redis", REDIS_READY_WITHIN, || {
        redis_ping(redis_port)
    })?;
    wait_until("epmd", dir, "epmd", EPMD_READY_WITHIN, || {
        Command::new(&bin.epmd)
            .args(["-port", &epmd_port.to_string(), "-names"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })?;
    spawn(dir, "rabbit", rabbitmq, Duration::from_secs(30))?;
    wait_until("RabbitMQ", dir, "rabbit", RABBITMQ_READY_WITHIN, || {
        amqp_handshake(amqp_port)
    })?;

    Ok((
        format!("redis://127.0.0.1:{redis_port}/0"),
        format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2F"),
        epmd_port,
    ))
}

/// The environment of one RabbitMQ node whose files are under `files` and whose Erlang
/// cookie is in `home`.
fn node_env(
    home: &Path,
    files: &Path,
    node: &str,
    amqp_port: u16,
    dist_port: u16,
    epmd_port: u16,
) -> Vec<(&'static str, String)> {
    let dist_args = "-kernel inet_dist_use_interface {127,0,0,1}";
    let path = |name: &str| files.join(name).display().to_string();
    vec![
        ("HOME", home.display().to_string()),
        ("ERL_EPMD_PORT", epmd_port.to_string()),
        ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        ("ERL_CRASH_DUMP", path("erl_crash.dump")),
        ("RABBITMQ_NODENAME", node.to_owned()),
        ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
        ("RABBITMQ_NODE_PORT", amqp_port.to_string()),
        ("RABBITMQ_DIST_PORT", dist_port.to_string()),
        // A path that does not exist, so that /etc/rabbitmq/rabbitmq-env.conf is not read.
        ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
        ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
        ("RABBITMQ_CONFIG_FILES", path("conf.d")),
        ("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config")),
        ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
        ("RABBITMQ_MNESIA_BASE", path("mnesia")),
        ("RABBITMQ_LOG_BASE", path("log")),
        ("RABBITMQ_PID_FILE", path("rabbit.pid")),
        // No scheduler busy-waiting: four brokers (the node and the cluster) spinning on two
        // cores would slow every one of them, and the benches with them.
        (
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            format!("{dist_args} +sbwt none +sbwtdcpu none +sbwtdio none"),
        ),
        ("RABBITMQ_CTL_ERL_ARGS", dist_args.into()),
    ]
}

/// The cluster's nodes, named for the process groups they run in.
const CLUSTER_NODES: [&str; 3] = ["rabbit-c1", "rabbit-c2", "rabbit-c3"];

/// A three-node RabbitMQ cluster on loopback beside the single node: its own node names and
/// ports, one Erlang cookie shared by the three (and their `rabbitmqctl` scripts), every file
/// under `<dir>/cluster`. The first node starts alone; the other two find it through the
/// classic-config peer discovery and join it. Returns each node's AMQP URL and `rabbitmqctl`.
fn start_cluster(dir: &Path, bin: &Binaries, epmd_port: u16) -> Result<Vec<(String, PathBuf)>> {
    let home = dir.join("cluster");
    std::fs::create_dir_all(&home)?;
    // The shared cookie, readable by its owner only, as Erlang demands.
    let cookie_path = home.join(".erlang.cookie");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::fs::write(
        &cookie_path,
        format!("RYLMCLUSTER{nanos}{}", std::process::id()),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cookie_path, std::fs::Permissions::from_mode(0o400))?;

    let ports: [u16; 6] = free_ports()?;
    let names: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "rylm-c{}-{}-{}@localhost",
                i + 1,
                std::process::id(),
                ports[i]
            )
        })
        .collect();
    let mut config = String::from("cluster_formation.peer_discovery_backend = classic_config\n");
    for (i, name) in names.iter().enumerate() {
        config.push_str(&format!(
            "cluster_formation.classic_config.nodes.{} = {name}\n",
            i + 1
        ));
    }
    let mut nodes = Vec::new();
    for (i, group) in CLUSTER_NODES.iter().enumerate() {
        let files = home.join(group);
        std::fs::create_dir_all(files.join("mnesia"))?;
        std::fs::create_dir_all(files.join("log"))?;
        std::fs::write(files.join("enabled_plugins"), "[].\n")?;
        std::fs::write(files.join("rabbitmq.conf"), &config)?;
        let env = node_env(&home, &files, &names[i], ports[i], ports[i + 3], epmd_port);
        let ctl = home.join(format!("{group}.rabbitmqctl"));
        write_rabbitmqctl(&ctl, &bin.rabbitmq, &env)?;
        let mut command = Command::new(&bin.rabbitmq);
        command
            .current_dir(&files)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        nodes.push((group, command, ports[i], ctl));
    }
    let mut urls = Vec::new();
    let mut ready = Vec::new();
    // The first alone, so that the others have someone to join; then the two together.
    for (i, (group, command, port, ctl)) in nodes.into_iter().enumerate() {
        spawn(dir, group, command, Duration::from_secs(30))?;
        ready.push((group, port));
        if i == 0 {
            wait_until(
                "RabbitMQ cluster node 1",
                dir,
                group,
                RABBITMQ_READY_WITHIN,
                || amqp_handshake(port),
            )?;
        }
        urls.push((format!("amqp://guest:guest@127.0.0.1:{port}/%2F"), ctl));
    }
    for (group, port) in ready {
        wait_until(
            "RabbitMQ cluster node",
            dir,
            group,
            RABBITMQ_READY_WITHIN,
            || amqp_handshake(port),
        )?;
    }
    // Joined: every node sees three running nodes.
    let first_ctl = &urls[0].1;
    wait_until(
        "the RabbitMQ cluster",
        dir,
        CLUSTER_NODES[0],
        RABBITMQ_READY_WITHIN,
        || {
            Command::new(first_ctl)
                .args(["cluster_status", "--formatter", "json"])
                .output()
                .is_ok_and(|out| {
                    let text = String::from_utf8_lossy(&out.stdout);
                    names
                        .iter()
                        .all(|name| text.matches(name.as_str()).count() >= 2)
                        && text.contains("running_nodes")
                })
        },
    )?;
    Ok(urls)
}

/// `<dir>/rabbitmqctl`: the broker's own CLI with the private node's environment (its cookie,
/// epmd and node name), so that tests can stop and start the broker's application.
fn write_rabbitmqctl(path: &Path, server: &Path, env: &[(&str, String)]) -> Result<()> {
    let ctl = server.with_file_name("rabbitmqctl");
    let mut script = String::from(
        "#!/bin/sh\n# Written by cargo xtask: rabbitmqctl for this private RabbitMQ node.\n",
    );
    for (name, value) in env {
        script.push_str(&format!(
            "export {name}='{}'\n",
            value.replace('\'', "'\\''")
        ));
    }
    script.push_str(&format!("exec '{}' \"$@\"\n", ctl.display()));
    std::fs::write(path, script)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

pub(crate) fn spawn(
    dir: &Path,
    name: &'static str,
    mut command: Command,
    grace: Duration,
) -> Result<()> {
    let log = std::fs::File::create(dir.join(format!("{name}.out")))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
    let pid = child.id();
    std::fs::write(dir.join(format!("{name}.pid")), format!("{pid}\n"))?;
    STARTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Started {
            name,
            pid,
            grace,
            child: Some(child),
        });
    Ok(())
}

/// Polls `ready` until it holds, the process dies, or `within` passes.
pub(crate) fn wait_until(
    what: &str,
    dir: &Path,
    name: &str,
    within: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = exited(name) {
            bail!(
                "{what} exited during start-up ({status}){}",
                log_tail(dir, name)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{what} did not become ready within {within:?}{}",
                log_tail(dir, name)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exited(name: &str) -> Option<std::process::ExitStatus> {
    let mut started = STARTED.lock().unwrap_or_else(|e| e.into_inner());
    let process = started.iter_mut().find(|p| p.name == name)?;
    process.child.as_mut()?.try_wait().ok().flatten()
}

fn log_tail(dir: &Path, name: &str) -> String {
    let mut tail = String::new();
    for file in [format!("{name}.out"), "redis/redis.log".into()] {
        if file.starts_with("redis/") && name != "redis" {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(dir.join(&file)) {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(20);
            tail.push_str(&format!(
                "\n--- last lines of {file} ---\n{}",
                lines[start..].join("\n")
            ));
        }
    }
    tail
}

pub(crate) fn redis_ping(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"PING\r\n")?;
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer)?;
        Ok(&answer == b"+PONG\r\n")
    };
    attempt().unwrap_or(false)
}

/// A real AMQP 0-9-1 handshake: RabbitMQ opens its listener last, and answers the protocol
/// header with a method frame (type 1), `connection.start`, only when it is ready.
fn amqp_handshake(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        let mut frame_type = [0u8; 1];
        stream.read_exact(&mut frame_type)?;
        Ok(frame_type[0] == 1)
    };
    attempt().unwrap_or(false)
}

/// SIGTERM to the leader, a grace period, then SIGKILL to whatever is left of its group.
fn stop_group(name: &str, pid: u32, grace: Duration, mut child: Option<&mut Child>) {
    let deadline = Instant::now() + grace;
    if alive(pid, child.as_deref_mut()) {
        signal("-TERM", &pid.to_string());
        while alive(pid, child.as_deref_mut()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(pid, child.as_deref_mut()) {
            eprintln!("xtask: {name} (pid {pid}) did not stop within {grace:?}; killing it");
        }
    }
    // The group id is the leader's pid (process_group(0)); children such as beam.smp may be
    // left in it after the leader is gone.
    signal("-KILL", &format!("-{pid}"));
    if let Some(child) = child {
        let _ = child.wait();
    }
}

fn alive(pid: u32, child: Option<&mut Child>) -> bool {
    if let Some(child) = child {
        return matches!(child.try_wait(), Ok(None));
    }
    // Not our child: a zombie has exited; only its parent can reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

fn signal(which: &str, target: &str) {
    let _ = Command::new("kill")
        .args([which, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
