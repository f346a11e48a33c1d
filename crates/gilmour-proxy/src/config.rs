//! How the proxy runs: [`ProxyConfig`] for a program, [`ProxyArgs`] for the command line (the
//! same options for `rylm gilmour-proxy` and the crate's own binary, each also read from the
//! environment where it says so).

use std::net::SocketAddr;
use std::time::Duration;

use rylm_gilmour::node::NodeOptions;

use crate::Error;
use crate::api::Limits;

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The Redis every node's subscriptions go through (`redis://`, `redis-sentinel://` or
    /// `redis-cluster://`).
    pub redis_url: String,
    /// Where the control and publish API listen. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Between two health checks of a node. Default 10 s.
    pub health_interval: Duration,
    /// A health check not answered within this has failed. Default 3 s.
    pub health_timeout: Duration,
    /// Failed health checks in a row before a node is `unavailable`. Default 2.
    pub failure_threshold: u32,
    /// Health checks in a row whose connection is refused before a node is `dirty`. Default 6.
    pub dirty_after: u32,
    /// The operator's token: when set, every route but `/healthz` and `/metrics` needs
    /// `Authorization: Bearer <token>`, or, for a node's own routes, that node's token.
    pub token: Option<String>,
    /// With an operator token: a second token that may register nodes (`POST /nodes`) and
    /// nothing else, for the nodes to hold instead of the operator's.
    pub register_token: Option<String>,
    /// The deadline of a `/request` that gives none. Default 60 s.
    pub request_timeout: Duration,
    /// The largest body read, from callers and from nodes. Default 1 MiB.
    pub max_body: usize,
    /// Compositions and timeouts the proxy accepts.
    pub limits: Limits,
    /// Calls to one node at once; past it a call waits, within its timeout. Default 64.
    pub node_concurrency: usize,
    /// Nodes registered at once; past it `POST /nodes` is a 503. Default 10,000.
    pub max_nodes: usize,
    /// HTTP connections at once; past it a connection is answered 503 and closed. Default 4,096.
    pub max_connections: usize,
    /// A request's headers, and a keep-alive connection's next request, within this.
    /// Default 30 s.
    pub header_timeout: Duration,
    /// A request's body within this, or 408. Default 30 s.
    pub body_timeout: Duration,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (Redis connected) apart from the
    /// API; none by default (the API serves `/metrics` and `/healthz` too).
    pub admin: Option<SocketAddr>,
    /// The Gilmour settings of the proxy's one Redis connection pair, which every node shares:
    /// `concurrency` bounds the handlers running for all nodes together (default 1,024),
    /// `max_queued` those waiting.
    pub node_options: NodeOptions,
}

impl ProxyConfig {
    /// The defaults, with the Redis at `redis_url`.
    pub fn new(redis_url: impl Into<String>) -> Self {
        ProxyConfig {
            redis_url: redis_url.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            health_interval: Duration::from_secs(10),
            health_timeout: Duration::from_secs(3),
            failure_threshold: 2,
            dirty_after: 6,
            token: None,
            register_token: None,
            request_timeout: Duration::from_secs(60),
            max_body: 1 << 20,
            limits: Limits::default(),
            node_concurrency: 64,
            max_nodes: 10_000,
            max_connections: 4096,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            admin: None,
            node_options: NodeOptions {
                concurrency: 1024,
                max_queued: 4096,
                ..NodeOptions::default()
            },
        }
    }
}

fn seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("a positive number of seconds, at most a day, not {text:?}"))
}

fn positive(text: &str) -> Result<usize, String> {
    text.parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("a positive whole number, not {text:?}"))
}

/// The command line of the proxy: `rylm gilmour-proxy` and `rylm-gilmour-proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Redis to use: redis://, redis-sentinel://H:P/0?sentinelServiceName=S&node=H2:P2,
    /// redis-cluster://H:P?node=H2:P2.
    #[arg(long, env = "RYLM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// The control and publish API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The operator's token: every route but /healthz and /metrics needs it (or, for a
    /// node's routes, that node's own token).
    #[arg(long, env = "GILMOUR_PROXY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A token that may only register nodes (needs --token).
    #[arg(long, env = "GILMOUR_PROXY_REGISTER_TOKEN", hide_env_values = true)]
    pub register_token: Option<String>,
    /// Seconds between two health checks of a node.
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub health_interval: Duration,
    /// Seconds a health check may take.
    #[arg(long, default_value = "3", value_parser = seconds)]
    pub health_timeout: Duration,
    /// Failed checks in a row before a node is `unavailable`.
    #[arg(long, default_value = "2", value_parser = positive)]
    pub failure_threshold: usize,
    /// Refused checks in a row before a node is `dirty` (and forgotten).
    #[arg(long, default_value = "6", value_parser = positive)]
    pub dirty_after: usize,
    /// Seconds a /request may take when it says nothing.
    #[arg(long, default_value = "60", value_parser = seconds)]
    pub request_timeout: Duration,
    /// Calls to one node at once.
    #[arg(long, default_value = "64", value_parser = positive)]
    pub concurrency: usize,
    /// Handlers running at once, all nodes together.
    #[arg(long, default_value = "1024", value_parser = positive)]
    pub max_running: usize,
    /// Handlers waiting for a place, all nodes together; past it a request is answered 503.
    #[arg(long, default_value = "4096", value_parser = positive)]
    pub max_queued: usize,
    /// The largest body read, in bytes.
    #[arg(long, default_value = "1048576", value_parser = positive)]
    pub max_body: usize,
    /// The steps of one composition, nested ones included.
    #[arg(long, default_value = "1000", value_parser = positive)]
    pub max_steps: usize,
    /// The longest timeout, in seconds, that a request or a handler may ask for.
    #[arg(long, default_value = "3600", value_parser = seconds)]
    pub max_timeout: Duration,
    /// Nodes registered at once.
    #[arg(long, default_value = "10000", value_parser = positive)]
    pub max_nodes: usize,
    /// HTTP connections at once.
    #[arg(long, default_value = "4096", value_parser = positive)]
    pub max_connections: usize,
    /// Seconds for a request's headers, and for a kept-alive connection's next request.
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub header_timeout: Duration,
    /// Where to serve /metrics, /healthz and /readyz (Redis connected), apart from the API.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
}

impl ProxyArgs {
    /// The configuration these options describe.
    pub fn config(&self) -> Result<ProxyConfig, Error> {
        let token = self.token.clone().filter(|t| !t.is_empty());
        let register_token = self.register_token.clone().filter(|t| !t.is_empty());
        if register_token.is_some() && token.is_none() {
            return Err(Error::Config(
                "--register-token needs --token: without an operator token every route is open"
                    .to_owned(),
            ));
        }
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let mut config = ProxyConfig::new(self.redis.clone());
        config.listen = self.listen;
        config.token = token;
        config.register_token = register_token;
        config.health_interval = self.health_interval;
        config.health_timeout = self.health_timeout;
        config.failure_threshold = count(self.failure_threshold);
        config.dirty_after = count(self.dirty_after);
        config.request_timeout = self.request_timeout;
        config.node_concurrency = self.concurrency;
        config.node_options.concurrency = self.max_running;
        config.node_options.max_queued = self.max_queued;
        config.max_body = self.max_body;
        config.limits = Limits {
            max_steps: self.max_steps,
            max_timeout: self.max_timeout,
        };
        config.max_nodes = self.max_nodes;
        config.max_connections = self.max_connections;
        config.header_timeout = self.header_timeout;
        config.admin = self.admin;
        Ok(config)
    }
}
