//! The log's throttle: 10,000 warnings from one place give a bounded number of lines, and the
//! count of what was held back is logged with the next one let through, as text and as JSON.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rylm_admin::logging::Throttle;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("the buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().expect("the buffer"))
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn flood(count: usize) {
    for n in 0..count {
        tracing::warn!(n, "dropped a malformed frame");
    }
}

const WINDOW: Duration = Duration::from_millis(300);

#[test]
fn ten_thousand_warnings_from_one_place_are_a_few_lines_and_a_count() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .event_format(Throttle::new(
            tracing_subscriber::fmt::format(),
            10,
            WINDOW,
            false,
        ))
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        flood(10_000);
        tracing::info!("information always passes");
        tracing::info!("information always passes");
        // The window passes: the next warning gets through, after the count.
        std::thread::sleep(WINDOW);
        flood(1);
    });
    let lines = captured.lines();
    let warnings = lines.iter().filter(|l| l.contains("malformed")).count();
    assert_eq!(warnings, 11, "{lines:#?}");
    assert_eq!(lines.iter().filter(|l| l.contains("INFO")).count(), 2);
    let count = lines
        .iter()
        .find(|l| l.contains("held back"))
        .expect("the count of what was held back");
    assert!(count.contains("9990 more"), "{count}");
    assert_eq!(lines.len(), 14, "{lines:#?}");
}

#[test]
fn as_json_every_line_is_json() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .event_format(Throttle::new(
            tracing_subscriber::fmt::format().json(),
            10,
            WINDOW,
            true,
        ))
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        flood(1000);
        std::thread::sleep(WINDOW);
        flood(1);
    });
    let lines = captured.lines();
    assert_eq!(lines.len(), 12, "{lines:#?}");
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert!(value["level"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l.contains("\"suppressed\":990")),
        "{lines:#?}"
    );
}
