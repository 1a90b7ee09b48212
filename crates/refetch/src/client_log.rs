//! The Kafka client's own log lines, de-duplicated and rate-limited.
//!
//! librdkafka reports a broker it cannot reach on every reconnect attempt, from every client and
//! for every broker connection: hundreds of identical lines in seconds, which bury the one line
//! that matters and cost a log pipeline real money. [`ClientLog`] writes the first occurrence of
//! each distinct line at once, counts the repeats, and writes one summary line per distinct line
//! per interval (default [`DEFAULT_INTERVAL`]) with the count, for as long as the repeats go on.
//!
//! Two lines are the same when their severity, facility and text match once the parts librdkafka
//! varies are removed: the `(after 12ms in state CONNECT)` suffix and its `N identical error(s)
//! suppressed` count (which is added to ours). Host names, ports and error codes stay part of the
//! text, so two brokers that fail are two lines.
//!
//! Lines go to `tracing` with the target `rdkafka` and the fields `facility` and `count` (1 for
//! the first occurrence, the number of occurrences in the interval for a summary). Debug lines are
//! passed through unchanged.
//!
//! The consumer driver routes its `log` and `error` callbacks here; [`QuietContext`] does the same
//! for any other rdkafka client (a producer, an admin or a watermark client).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// The default interval of one summary line per distinct line.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// How serious a client line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    /// Emergency, alert, critical or error.
    Error,
    /// Warning.
    Warning,
    /// Notice, info and debug (passed through at `debug`, never de-duplicated).
    Debug,
}

/// A line to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Its severity.
    pub severity: Severity,
    /// librdkafka's facility (`FAIL`, `ERROR`, `REQTMOUT`, ...).
    pub facility: String,
    /// The text (of the latest occurrence).
    pub message: String,
    /// Occurrences this line stands for: 1 for a first occurrence, the count of the interval for
    /// a summary.
    pub count: u64,
    /// `Some(interval)` for a summary line, `None` for a first occurrence.
    pub summary: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    severity: Severity,
    facility: String,
    text: String,
}

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    repeats: u64,
    latest: String,
}

/// De-duplicates and rate-limits client lines. See the module docs.
#[derive(Debug)]
pub struct ClientLog {
    interval: Duration,
    entries: Mutex<HashMap<Key, Entry>>,
}

/// The text with librdkafka's varying suffix removed, and the repeat count that suffix reported.
fn signature(message: &str) -> (&str, u64) {
    let Some(open) = message.rfind(" (") else {
        return (message, 0);
    };
    let tail = &message[open + 2..];
    if !(tail.ends_with(')') && (tail.starts_with("after ") || tail.contains("suppressed"))) {
        return (message, 0);
    }
    let suppressed = tail
        .find(" identical error(s) suppressed")
        .and_then(|end| {
            let start = tail[..end]
                .rfind(|c: char| !c.is_ascii_digit())
                .map_or(0, |i| i + 1);
            tail[start..end].parse().ok()
        })
        .unwrap_or(0);
    (&message[..open], suppressed)
}

impl Default for ClientLog {
    fn default() -> Self {
        ClientLog::new(DEFAULT_INTERVAL)
    }
}

impl ClientLog {
    /// A log writing at most one line per distinct line per `interval`.
    pub fn new(interval: Duration) -> Self {
        ClientLog {
            interval,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// One client line at `now`: returns the line to write now, if any.
    pub fn observe(
        &self,
        now: Instant,
        severity: Severity,
        facility: &str,
        message: &str,
    ) -> Option<Line> {
        if severity == Severity::Debug {
            return Some(Line {
                severity,
                facility: facility.to_owned(),
                message: message.to_owned(),
                count: 1,
                summary: None,
            });
        }
        let (text, suppressed) = signature(message);
        let key = Key {
            severity,
            facility: facility.to_owned(),
            text: text.to_owned(),
        };
        let Ok(mut entries) = self.entries.lock() else {
            // A poisoned lock only loses de-duplication, never the line.
            return Some(Line {
                severity,
                facility: facility.to_owned(),
                message: message.to_owned(),
                count: 1,
                summary: None,
            });
        };
        match entries.get_mut(&key) {
            Some(e) if now < e.window_start + self.interval => {
                e.repeats += 1 + suppressed;
                e.latest = message.to_owned();
                None
            }
            Some(e) => {
                // A new interval: a line that kept repeating gets its summary, counting this one.
                let count = e.repeats + 1 + suppressed;
                let line = Line {
                    severity,
                    facility: facility.to_owned(),
                    message: message.to_owned(),
                    count,
                    summary: (e.repeats > 0).then_some(self.interval),
                };
                e.window_start = now;
                e.repeats = 0;
                e.latest = message.to_owned();
                Some(line)
            }
            None => {
                entries.insert(
                    key,
                    Entry {
                        window_start: now,
                        repeats: suppressed,
                        latest: message.to_owned(),
                    },
                );
                Some(Line {
                    severity,
                    facility: facility.to_owned(),
                    message: message.to_owned(),
                    count: 1,
                    summary: None,
                })
            }
        }
    }

    /// Summaries of the lines whose interval ended by `now` with repeats; lines that stayed
    /// quiet for a whole interval are forgotten (their next occurrence is written at once).
    pub fn flush(&self, now: Instant) -> Vec<Line> {
        let Ok(mut entries) = self.entries.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        entries.retain(|key, e| {
            if now < e.window_start + self.interval {
                return true;
            }
            if e.repeats == 0 {
                return false;
            }
            out.push(Line {
                severity: key.severity,
                facility: key.facility.clone(),
                message: e.latest.clone(),
                count: e.repeats,
                summary: Some(self.interval),
            });
            e.window_start = now;
            e.repeats = 0;
            true
        });
        out.sort_by(|a, b| a.message.cmp(&b.message));
        out
    }

    /// Summaries of every line with repeats not written yet, whatever their interval (for the
    /// end of the process). The lines are forgotten.
    pub fn drain(&self) -> Vec<Line> {
        let Ok(mut entries) = self.entries.lock() else {
            return Vec::new();
        };
        let mut out: Vec<Line> = entries
            .drain()
            .filter(|(_, e)| e.repeats > 0)
            .map(|(key, e)| Line {
                severity: key.severity,
                facility: key.facility,
                message: e.latest,
                count: e.repeats,
                summary: Some(self.interval),
            })
            .collect();
        out.sort_by(|a, b| a.message.cmp(&b.message));
        out
    }

    /// Observe a line now and write what is due (see [`write`]).
    pub fn log(&self, severity: Severity, facility: &str, message: &str) {
        if let Some(line) = self.observe(Instant::now(), severity, facility, message) {
            write(&line);
        }
    }
}

/// Write `line` through `tracing` (target `rdkafka`).
pub fn write(line: &Line) {
    let facility = line.facility.as_str();
    let count = line.count;
    match (line.severity, line.summary) {
        (Severity::Error, None) => {
            tracing::error!(target: "rdkafka", facility, count, "{}", line.message)
        }
        (Severity::Warning, None) => {
            tracing::warn!(target: "rdkafka", facility, count, "{}", line.message)
        }
        (Severity::Debug, _) => {
            tracing::debug!(target: "rdkafka", facility, count, "{}", line.message)
        }
        (Severity::Error, Some(d)) => tracing::error!(
            target: "rdkafka",
            facility,
            count,
            interval_s = d.as_secs(),
            "{} (seen {count} times in the last {}s)",
            line.message,
            d.as_secs()
        ),
        (Severity::Warning, Some(d)) => tracing::warn!(
            target: "rdkafka",
            facility,
            count,
            interval_s = d.as_secs(),
            "{} (seen {count} times in the last {}s)",
            line.message,
            d.as_secs()
        ),
    }
}

/// The process-wide client log every rdkafka client of refetch writes through. The first call
/// starts a thread that writes the summaries of lines that stopped repeating.
pub fn global() -> &'static ClientLog {
    static GLOBAL: OnceLock<ClientLog> = OnceLock::new();
    static FLUSHER: OnceLock<()> = OnceLock::new();
    let log = GLOBAL.get_or_init(ClientLog::default);
    FLUSHER.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("refetch-client-log".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    for line in log.flush(Instant::now()) {
                        write(&line);
                    }
                }
            });
    });
    log
}

#[cfg(feature = "kafka")]
mod context {
    use rdkafka::ClientContext;
    use rdkafka::config::RDKafkaLogLevel;
    use rdkafka::error::KafkaError;

    use super::{Severity, global};

    /// The severity of a librdkafka log level.
    pub fn severity(level: RDKafkaLogLevel) -> Severity {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => Severity::Error,
            RDKafkaLogLevel::Warning => Severity::Warning,
            _ => Severity::Debug,
        }
    }

    /// Route one librdkafka log line through the [`global`] client log.
    pub fn client_line(level: RDKafkaLogLevel, facility: &str, message: &str) {
        global().log(severity(level), facility, message);
    }

    /// Route one client error callback through the [`global`] client log.
    pub fn client_error(error: &KafkaError, reason: &str) {
        global().log(Severity::Error, "ERROR", &format!("{error}: {reason}"));
    }

    /// A client context whose log and error callbacks go through the [`global`] client log,
    /// for producers and helper clients (`ClientConfig::create_with_context(QuietContext)`).
    #[derive(Debug, Clone, Copy, Default)]
    pub struct QuietContext;

    impl ClientContext for QuietContext {
        fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
            client_line(level, fac, log_message);
        }

        fn error(&self, error: KafkaError, reason: &str) {
            client_error(&error, reason);
        }
    }

    impl rdkafka::consumer::ConsumerContext for QuietContext {}
    impl rdkafka::producer::ProducerContext for QuietContext {
        type DeliveryOpaque = ();
        fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
    }
}

#[cfg(feature = "kafka")]
pub use context::{QuietContext, client_error, client_line, severity};

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use super::*;

    const REFUSED: &str = "127.0.0.1:29092/bootstrap: Connect to ipv4#127.0.0.1:29092 failed: \
                           Connection refused (after 0ms in state CONNECT)";

    #[test]
    fn signatures_drop_what_librdkafka_varies() {
        assert_eq!(
            signature(REFUSED),
            (
                "127.0.0.1:29092/bootstrap: Connect to ipv4#127.0.0.1:29092 failed: Connection refused",
                0
            )
        );
        assert_eq!(
            signature(
                "b:1/bootstrap: Connect failed: Connection refused (after 3ms in state CONNECT, 29 identical error(s) suppressed)"
            ),
            ("b:1/bootstrap: Connect failed: Connection refused", 29)
        );
        // Parentheses that are part of the text stay.
        assert_eq!(
            signature("Topic t (3 partitions) not found"),
            ("Topic t (3 partitions) not found", 0)
        );
        assert_eq!(signature("x (y)"), ("x (y)", 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_becomes_one_line_per_interval_with_its_count() {
        let log = ClientLog::new(Duration::from_secs(10));
        let mut written = Vec::new();
        // 40 lines a second for 25 seconds, with librdkafka's varying suffix.
        for i in 0..1000u64 {
            let msg = format!(
                "b:9092/bootstrap: Connect to ipv4#b:9092 failed: Connection refused (after {}ms in state CONNECT)",
                i % 7
            );
            written.extend(log.observe(Instant::now(), Severity::Error, "FAIL", &msg));
            written.extend(log.flush(Instant::now()));
            tokio::time::advance(Duration::from_millis(25)).await;
        }
        // t=0: the first occurrence; t=10 s and t=20 s: one summary each.
        assert_eq!(written.len(), 3, "{written:#?}");
        assert_eq!(written[0].count, 1);
        assert_eq!(written[0].summary, None);
        assert_eq!(written[1].summary, Some(Duration::from_secs(10)));
        assert_eq!(written[2].summary, Some(Duration::from_secs(10)));
        // Every occurrence is accounted for exactly once, until the current interval.
        let in_lines: u64 = written.iter().map(|l| l.count).sum();
        assert_eq!(in_lines, 801, "{written:#?}");
        // The flood stops: the last 5 s of repeats are summarised when their interval ends,
        // then the line is forgotten and the next occurrence is written at once.
        tokio::time::advance(Duration::from_secs(6)).await;
        let tail = log.flush(Instant::now());
        assert_eq!(tail.len(), 1);
        assert_eq!(in_lines + tail[0].count, 1000);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(log.flush(Instant::now()).is_empty());
        // At the end of the process, repeats not written yet are summarised at once.
        for _ in 0..3 {
            log.observe(Instant::now(), Severity::Warning, "REQTMOUT", "timed out");
        }
        let last = log.drain();
        assert_eq!(last.len(), 1, "{last:#?}");
        assert_eq!(last[0].count, 2);
        assert!(log.drain().is_empty());
        let again = log.observe(Instant::now(), Severity::Error, "FAIL", REFUSED);
        assert_eq!(again.map(|l| (l.count, l.summary)), Some((1, None)));
    }

    #[tokio::test(start_paused = true)]
    async fn distinct_lines_are_counted_apart_and_librdkafka_suppression_adds_up() {
        let log = ClientLog::new(Duration::from_secs(10));
        let a = "a:9092/bootstrap: Connect to ipv4#a:9092 failed: Connection refused (after 1ms in state CONNECT)";
        let b = "b:9092/bootstrap: Connect to ipv4#b:9092 failed: Connection refused (after 1ms in state CONNECT)";
        assert!(
            log.observe(Instant::now(), Severity::Error, "FAIL", a)
                .is_some()
        );
        assert!(
            log.observe(Instant::now(), Severity::Error, "FAIL", b)
                .is_some()
        );
        // The same text at another severity or facility is another line.
        assert!(
            log.observe(Instant::now(), Severity::Warning, "FAIL", a)
                .is_some()
        );
        assert!(
            log.observe(Instant::now(), Severity::Error, "ERROR", a)
                .is_some()
        );
        let suppressed = "a:9092/bootstrap: Connect to ipv4#a:9092 failed: Connection refused \
                          (after 2ms in state CONNECT, 9 identical error(s) suppressed)";
        assert!(
            log.observe(Instant::now(), Severity::Error, "FAIL", suppressed)
                .is_none()
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let lines = log.flush(Instant::now());
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert_eq!(lines[0].count, 10, "one repeat plus librdkafka's 9");
        assert!(lines[0].message.contains("a:9092"));
        // Debug lines are never held back.
        for _ in 0..3 {
            assert!(
                log.observe(Instant::now(), Severity::Debug, "X", "y")
                    .is_some()
            );
        }
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_written_lines_carry_the_count_through_tracing() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let log = ClientLog::new(Duration::from_secs(10));
        for _ in 0..401 {
            log.log(Severity::Error, "FAIL", REFUSED);
            tokio::time::advance(Duration::from_millis(25)).await;
        }
        for line in log.flush(Instant::now()) {
            write(&line);
        }
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["target"], "rdkafka");
        assert_eq!(lines[0]["level"], "ERROR");
        assert_eq!(lines[0]["fields"]["facility"], "FAIL");
        assert_eq!(lines[0]["fields"]["count"], 1);
        assert_eq!(lines[1]["fields"]["count"], 400);
        assert_eq!(lines[1]["fields"]["interval_s"], 10);
        let text = lines[1]["fields"]["message"].as_str().unwrap();
        assert!(
            text.contains("Connection refused") && text.contains("seen 400 times in the last 10s"),
            "{text}"
        );
    }
}
