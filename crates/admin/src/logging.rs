//! The log of a rylm program: `tracing` events on standard error, as text or as JSON lines
//! for log shippers, with the `log` crate's records (fred's, lapin's) bridged in, and repeated
//! warnings throttled so that a hostile peer cannot flood the log: at most `limit` warnings
//! and errors from one place in the code per `window`; past that they are counted, and the count
//! is logged before the next one from that place that gets through.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("the log format is text or json, not {other:?}")),
        }
    }
}

/// Warnings and errors from one place let through per window.
pub const LIMIT: u32 = 10;
/// The window of [`LIMIT`].
pub const WINDOW: Duration = Duration::from_secs(10);

/// Installs the program's log: `RUST_LOG` (or `default_filter`) chooses what is logged;
/// `log` records are bridged in. Does nothing when a subscriber is installed already.
pub fn init(format: LogFormat, default_filter: &str) {
    install(
        format,
        default_filter,
        None::<tracing_subscriber::layer::Identity>,
    );
}

/// Like [`init`], and sends the spans of traced requests to an OpenTelemetry collector; the
/// exporter runs until the handle returned is dropped (which sends what is left).
#[cfg(feature = "otlp")]
pub fn init_with_otlp(
    format: LogFormat,
    default_filter: &str,
    otlp: crate::otlp::Otlp,
) -> Result<crate::otlp::Exporter, crate::Error> {
    use tracing_subscriber::Layer;
    let (layer, exporter) = crate::otlp::start(otlp)?;
    let spans = tracing_subscriber::filter::Targets::new()
        .with_target(crate::otlp::TARGET, tracing::Level::INFO);
    install(format, default_filter, Some(layer.with_filter(spans)));
    Ok(exporter)
}

fn install<L>(format: LogFormat, default_filter: &str, extra: Option<L>)
where
    L: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colours only for a terminal: a file or a log shipper gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let lines = match format {
        LogFormat::Text => lines
            .event_format(Throttle::new(
                tracing_subscriber::fmt::format(),
                LIMIT,
                WINDOW,
                false,
            ))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => lines
            .json()
            .event_format(Throttle::new(
                tracing_subscriber::fmt::format().json(),
                LIMIT,
                WINDOW,
                true,
            ))
            .with_filter(filter)
            .boxed(),
    };
    // `try_init` also installs the `log` bridge (tracing-subscriber's `tracing-log` feature).
    let _ = tracing_subscriber::registry()
        .with(extra)
        .with(lines)
        .try_init();
}

#[derive(Debug)]
struct Window {
    started: Instant,
    passed: u32,
    suppressed: u64,
}

/// An event format that lets at most `limit` warnings and errors from one callsite through per
/// `window`, and logs how many it held back before the next one it lets through.
#[derive(Debug)]
pub struct Throttle<F> {
    inner: F,
    limit: u32,
    window: Duration,
    json: bool,
    seen: Mutex<HashMap<Identifier, Window>>,
}

impl<F> Throttle<F> {
    /// Wraps `inner`; `json` says how to write the line that counts what was held back.
    pub fn new(inner: F, limit: u32, window: Duration, json: bool) -> Self {
        Throttle {
            inner,
            limit,
            window,
            json,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the event from `callsite` goes through, and how many were held back before it.
    fn admit(&self, callsite: Identifier) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let window = seen.entry(callsite).or_insert(Window {
            started: now,
            passed: 0,
            suppressed: 0,
        });
        if now.duration_since(window.started) >= self.window {
            window.started = now;
            window.passed = 0;
        }
        if window.passed >= self.limit {
            window.suppressed += 1;
            return None;
        }
        window.passed += 1;
        Some(std::mem::take(&mut window.suppressed))
    }
}

impl<S, N, F> FormatEvent<S, N> for Throttle<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        if *metadata.level() > Level::WARN {
            return self.inner.format_event(ctx, writer, event);
        }
        let Some(held_back) = self.admit(metadata.callsite()) else {
            return Ok(());
        };
        if held_back > 0 {
            let place = format!(
                "{}:{}",
                metadata.file().unwrap_or("?"),
                metadata.line().unwrap_or(0)
            );
            if self.json {
                writeln!(
                    writer,
                    "{{\"level\":\"{}\",\"target\":\"{}\",\"fields\":{{\"message\":\"events held back by the log's throttle\",\"suppressed\":{held_back},\"at\":\"{place}\"}}}}",
                    metadata.level(),
                    metadata.target()
                )?;
            } else {
                writeln!(
                    writer,
                    " {} {}: {held_back} more like the next were held back (over {} from {place} in {:?})",
                    metadata.level(),
                    metadata.target(),
                    self.limit,
                    self.window
                )?;
            }
        }
        self.inner.format_event(ctx, writer, event)
    }
}
