//! Many hosts: a master, two workers and a client, each in a network namespace of its own that
//! this test creates (root; `ip netns`), reaching each other by their namespace addresses. One
//! worker's link goes down under a steady stream: its unfinished work is re-dispatched, the
//! client receives every answer exactly once; the link comes back: the worker is readmitted.
//! Every namespace is removed at the end, on failure too.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Job, Rylm, ip};

/// Addresses of this test's own: 10.231.<n>.0/24 exist only inside its namespaces.
const NET: &str = "10.231";

/// The namespaces of one run, removed when dropped.
struct Hosts {
    prefix: String,
    names: Vec<String>,
}

fn run_ip(args: &[&str]) {
    let status = std::process::Command::new(ip())
        .args(args)
        .status()
        .expect("ip runs");
    assert!(status.success(), "ip {args:?}: {status}");
}

impl Hosts {
    /// A master namespace and one namespace per peer, each peer linked to the master's by a
    /// veth pair: peer `n` is `10.231.<n>.2`, and reaches every address of the master's
    /// namespace (`10.231.<n>.1` for each `n`) through its link.
    fn build(peers: &[&str]) -> Hosts {
        let prefix = format!("rylm{}", std::process::id() % 100_000);
        let mut hosts = Hosts {
            prefix: prefix.clone(),
            names: Vec::new(),
        };
        let master = hosts.name("m");
        run_ip(&["netns", "add", &master]);
        hosts.names.push(master.clone());
        run_ip(&["-n", &master, "link", "set", "lo", "up"]);
        for (i, peer) in peers.iter().enumerate() {
            let n = i + 1;
            let namespace = hosts.name(peer);
            run_ip(&["netns", "add", &namespace]);
            hosts.names.push(namespace.clone());
            let (outer, inner) = (format!("{prefix}m{n}"), format!("{prefix}p{n}"));
            run_ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            run_ip(&["link", "set", &outer, "netns", &master]);
            run_ip(&["link", "set", &inner, "netns", &namespace]);
            run_ip(&[
                "-n",
                &master,
                "addr",
                "add",
                &format!("{NET}.{n}.1/24"),
                "dev",
                &outer,
            ]);
            run_ip(&["-n", &master, "link", "set", &outer, "up"]);
            run_ip(&[
                "-n",
                &namespace,
                "addr",
                "add",
                &format!("{NET}.{n}.2/24"),
                "dev",
                &inner,
            ]);
            run_ip(&["-n", &namespace, "link", "set", &inner, "up"]);
            run_ip(&["-n", &namespace, "link", "set", "lo", "up"]);
            run_ip(&[
                "-n",
                &namespace,
                "route",
                "add",
                "default",
                "via",
                &format!("{NET}.{n}.1"),
            ]);
        }
        hosts
    }

    fn name(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    /// Takes peer `n`'s link down or up.
    fn link(&self, role: &str, n: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        let device = format!("{}p{n}", self.prefix);
        run_ip(&["-n", &self.name(role), "link", "set", &device, state]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Removing a namespace removes its end of each veth pair, and so the pair.
        for name in self.names.iter().rev() {
            let _ = std::process::Command::new(ip())
                .args(["netns", "del", name])
                .status();
        }
    }
}

#[tokio::test]
async fn a_workers_link_goes_down_and_up_under_a_steady_stream() {
    let hosts = Hosts::build(&["w1", "w2", "c"]);
    let ports = ["5555", "5556", "5557", "5559"].map(|p| format!("tcp://0.0.0.0:{p}"));
    let advertise = format!("{NET}.1.1");
    let _master = Rylm::start_in(
        Some(&hosts.name("m")),
        &[
            "master",
            "--name",
            "m",
            "--clients",
            &ports[0],
            "--stream",
            &ports[1],
            "--workers",
            &ports[2],
            "--db",
            &ports[3],
            "--advertise",
            &advertise,
        ],
    )
    .await;
    // Each peer dials the master's address on its own link; the cache gives out another.
    let db = |n: usize| format!("tcp://{NET}.{n}.1:5559");
    let worker = |n: usize| {
        let (netns, db) = (hosts.name(&format!("w{n}")), db(n));
        async move { Rylm::start_in(Some(&netns), &["worker", "--db", &db, "--credits", "4"]).await }
    };
    let (_w1, _w2) = (worker(1).await, worker(2).await);

    let total = 4000;
    let payloads: Vec<String> = (0..total).map(|i| format!("p{i}")).collect();
    let mut job = Job::start(Some(&hosts.name("c")), &db(3), "sleep:20", &payloads);
    assert!(
        job.until(200, Duration::from_secs(60)).await,
        "the stream runs"
    );
    hosts.link("w1", 1, false);
    let down = Instant::now();
    // Longer than the master's grace (3 heartbeats of 1 s): w1 is buried, its work re-sent.
    let more = job.received() + 200;
    assert!(
        job.until(more, Duration::from_secs(60)).await,
        "w2 carries on"
    );
    let outage = Duration::from_secs(5);
    tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
    hosts.link("w1", 1, true);
    let results = job.finish(Duration::from_secs(120)).await;

    common::exactly_once(&payloads, &results);

    // w1 is readmitted: both workers serve again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pids = HashSet::new();
    while pids.len() < 2 {
        assert!(Instant::now() < deadline, "w1 was not readmitted");
        let calls: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let job = Job::start(Some(&hosts.name("c")), &db(3), "pid", &calls);
        pids.extend(
            job.finish(Duration::from_secs(60))
                .await
                .into_values()
                .flatten(),
        );
    }
}
