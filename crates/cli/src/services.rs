//! `rylm service` and `rylm call`: services by path and METHOD from the command line.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use rylm_services_mux::{Call, Method, Service, ServiceClient, ServiceResponse};
use serde_json::Value;

use crate::security::SecurityArgs;

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Where to listen.
    #[arg(long, default_value = "tcp://127.0.0.1:9998")]
    bind: String,
    /// The shared secret callers must hold.
    #[arg(long, env = "RYLM_SERVICE_SECRET")]
    secret: String,
    /// The service's name, as discovery reports it.
    #[arg(long, default_value = "rylm")]
    name: String,
    /// How many handlers run at once; beyond them (and the queue), `503 busy` at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How many requests may wait for a handler slot.
    #[arg(long, default_value_t = 0)]
    queue: usize,
    #[command(flatten)]
    brubeck: BrubeckArgs,
    /// Where to serve /metrics, /healthz and /readyz over HTTP (none by default).
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    #[command(flatten)]
    security: SecurityArgs,
}

#[derive(Args, Debug)]
pub(crate) struct BrubeckArgs {
    /// The wire: `native`, or `brubeck` for Brubeck 0.1.4's socket layout and framing: a
    /// service connects to its callers' `--brubeck-requests` and `--brubeck-responses`, a
    /// caller binds them and waits for a service to connect.
    #[arg(long, default_value = "native", value_parser = ["native", "brubeck"])]
    wire: String,
    /// Brubeck's request address (the caller's PUSH binds it; the service's PULL connects).
    #[arg(long, value_name = "ADDRESS")]
    brubeck_requests: Option<String>,
    /// Brubeck's response address (the caller's DEALER binds it; the service's ROUTER
    /// connects).
    #[arg(long, value_name = "ADDRESS")]
    brubeck_responses: Option<String>,
}

impl BrubeckArgs {
    fn addresses(&self) -> Result<(&str, &str)> {
        match (&self.brubeck_requests, &self.brubeck_responses) {
            (Some(requests), Some(responses)) => Ok((requests, responses)),
            _ => bail!("--wire brubeck needs --brubeck-requests and --brubeck-responses"),
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct CallArgs {
    /// The instance(s) to call; several are load-balanced (native wire).
    #[arg(long, required_unless_present = "brubeck_requests")]
    connect: Vec<String>,
    /// The shared secret.
    #[arg(long, env = "RYLM_SERVICE_SECRET")]
    secret: String,
    /// The path, e.g. /echo; `?` lists the service's routes instead.
    path: String,
    /// The method: get, post, put, delete, options, connect, response or request.
    #[arg(long, default_value = "request")]
    method: String,
    /// An argument as name=value (the value is JSON if it parses, else a string); repeatable.
    #[arg(long = "arg", value_parser = parse_argument)]
    arguments: Vec<(String, Value)>,
    /// The body.
    #[arg(long, default_value = "")]
    body: String,
    /// How long to wait, in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    #[command(flatten)]
    brubeck: BrubeckArgs,
    #[command(flatten)]
    security: SecurityArgs,
}

fn parse_argument(text: &str) -> Result<(String, Value), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected name=value, got {text:?}"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((name.to_owned(), value))
}

/// The built-in routes of `rylm service`.
pub(crate) fn builtin_service(name: &str, secret: &str) -> Result<Service> {
    let echo = |request: rylm_services_mux::ServiceRequest| async move {
        let mut response = ServiceResponse::new(200, "OK");
        for (key, value) in request.arguments {
            response.add_to_payload(key, value);
        }
        response
    };
    let service = Service::new(name, secret)
        .route(r"^/echo$", Method::Request, echo)?
        .route(r"^/echo$", Method::Get, echo)?
        .route(
            r"^/upper/(?P<text>[^/]+)$",
            Method::Get,
            |request| async move {
                let text = request.named.get("text").cloned().unwrap_or_default();
                ServiceResponse::new(200, "OK").with("text", text.to_uppercase())
            },
        )?
        .route(
            r"^/slow/(?P<ms>\d+)$",
            Method::Request,
            |request| async move {
                let millis: u64 = request
                    .named
                    .get("ms")
                    .and_then(|ms| ms.parse().ok())
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(millis.min(60_000))).await;
                ServiceResponse::new(200, "Took a while, but I am back.").with("slept_ms", millis)
            },
        )?
        .route(r"^/fail$", Method::Request, |_| async move {
            ServiceResponse::new(500, "failed on purpose")
        })?;
    Ok(service)
}

pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    let service = builtin_service(&args.name, &args.secret)?
        .with_concurrency(args.concurrency)
        .with_queue(args.queue);
    let counters = service.counters();
    let handle = if args.brubeck.wire == "brubeck" {
        let (requests, responses) = args.brubeck.addresses()?;
        service
            .with_transport(args.security.connecting()?)
            .serve_brubeck(requests, responses)
            .await?
    } else {
        service
            .with_transport(args.security.binding()?)
            .serve(&args.bind)
            .await?
    };
    crate::lifecycle::listen()?;
    eprintln!(
        "rylm service: {:?} listening at {} (routes /echo, /upper/<text>, /slow/<ms>, /fail); SIGTERM or Ctrl-C stops",
        args.name,
        handle.address()
    );
    let admin = crate::admin::start(
        "service",
        args.admin,
        crate::admin::Shows::Service(counters),
    )
    .await?;
    let stopped = crate::lifecycle::until_stopped("service", std::future::pending()).await;
    handle.shutdown().await;
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
    stopped
}

pub(crate) async fn call(args: CallArgs) -> Result<()> {
    if args.brubeck.wire == "brubeck" {
        return call_brubeck(args).await;
    }
    let client = ServiceClient::with_config(rylm_services_mux::ClientConfig {
        transport: args.security.connecting()?,
        ..rylm_services_mux::ClientConfig::default()
    });
    let addresses: Vec<&str> = args.connect.iter().map(String::as_str).collect();
    client.register("target", &addresses, &args.secret);
    let deadline = Duration::try_from_secs_f64(args.timeout)
        .context("--timeout is not a number of seconds")?;
    if args.path == "?" {
        for route in client.discover("target", Some(deadline)).await? {
            println!("{}  {}", route.pattern, route.methods.join(","));
        }
        return Ok(());
    }
    let mut call = Call::new(&args.path)
        .method(args.method.parse()?)
        .body(args.body.clone());
    for (name, value) in args.arguments {
        call = call.argument(name, value);
    }
    let reply = client.call("target", call, Some(deadline)).await?;
    println!("{} {}", reply.response.status, reply.response.status_msg);
    println!("{}", Value::Object(reply.response.payload));
    if reply.response.status >= 400 {
        bail!("the service answered {}", reply.response.status);
    }
    Ok(())
}

/// `rylm call --wire brubeck`: binds Brubeck's caller sockets, waits (within the timeout) for
/// the service to connect, then calls.
async fn call_brubeck(args: CallArgs) -> Result<()> {
    let deadline = Duration::try_from_secs_f64(args.timeout)
        .context("--timeout is not a number of seconds")?;
    let (requests, responses) = args.brubeck.addresses()?;
    let caller = rylm_services_mux::BrubeckCaller::bind(
        requests,
        responses,
        &args.secret,
        &args.security.binding()?,
    )
    .await?;
    let started = std::time::Instant::now();
    caller
        .wait_for_services(1, deadline)
        .await
        .context("no Brubeck service connected in time")?;
    let arguments = args.arguments.into_iter().collect();
    let response = caller
        .call(
            &args.path,
            args.method.parse()?,
            arguments,
            deadline.saturating_sub(started.elapsed()),
        )
        .await?;
    println!("{} {}", response.status_code, response.status_msg);
    println!("{}", response.body);
    if response
        .status_code
        .as_u64()
        .is_none_or(|status| status >= 400)
    {
        bail!("the service answered {}", response.status_code);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_json_or_strings() {
        assert_eq!(
            parse_argument("n=3").expect("parses"),
            ("n".into(), Value::from(3))
        );
        assert_eq!(
            parse_argument("s=hi there").expect("parses"),
            ("s".into(), Value::from("hi there"))
        );
        assert!(parse_argument("nothing").is_err());
    }

    #[tokio::test]
    async fn the_builtin_service_answers_a_call() {
        let handle = builtin_service("t", "s")
            .expect("routes")
            .serve("tcp://127.0.0.1:0")
            .await
            .expect("binds");
        let client = ServiceClient::new();
        client.register("t", &[handle.address()], "s");
        let call = Call::new("/upper/grüße").method(Method::Get);
        let reply = client
            .call("t", call, Some(Duration::from_secs(10)))
            .await
            .expect("answered");
        assert_eq!(reply.response.payload["text"], "GRÜSSE");
        handle.shutdown().await;
    }
}
