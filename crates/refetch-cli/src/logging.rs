//! Logs and traces: `tracing-subscriber` on standard error, human-readable by default, JSON on
//! request, and optionally an OpenTelemetry layer that exports spans over OTLP/HTTP.
//!
//! - The filter comes from `RUST_LOG` when it is set, otherwise from `[log] level`; it can be
//!   replaced while the process runs ([`set_level`], used by `refetch run` when SIGHUP reloads
//!   the configuration). librdkafka's
//!   own lines arrive through the `rdkafka` target, de-duplicated and rate-limited
//!   ([`refetch::client_log`]), whichever client wrote them: lines of rdkafka's default client
//!   context (a producer without refetch's context logs through the `log` crate) are routed
//!   through the same client log.
//! - Colours only when standard error is a terminal (and `NO_COLOR` is not set): a log written
//!   to a file or a pipe holds no escape codes.
//! - In JSON mode every line is one JSON object, the fatal error that ends the process included
//!   ([`fatal`]).
//! - With `[traces] endpoint` set, the spans of flights (`flight`), fetches (`fetch`,
//!   `fetch_batch`) and sink batches (`sink_batch`) go to the collector, and source requests
//!   carry a W3C `traceparent` of the current fetch span. The exporter runs on the SDK's own
//!   thread; [`shutdown`] flushes what is left when the process ends.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::OnceLock;

use anyhow::Context as _;
use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TracesSection};

/// The format of the installed subscriber (unset until [`init`] succeeded).
static FORMAT: OnceLock<LogFormat> = OnceLock::new();
/// The trace provider, when trace export is on.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Replaces the installed subscriber's filter.
static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Replace the filter with `level` (a filter directive). Refused while `RUST_LOG` is set (it
/// wins over `[log] level`) or when no subscriber of this module is installed.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Err("RUST_LOG is set and wins over [log] level".to_owned());
    }
    let filter = EnvFilter::try_new(level).map_err(|e| format!("`{level}`: {e}"))?;
    match RELOAD.get() {
        Some(reload) => reload(filter),
        None => Err("no log subscriber to reconfigure".to_owned()),
    }
}

/// Install the global subscriber. `level` is a filter directive (`info`, `info,refetch=debug`).
/// Calling it twice keeps the first subscriber.
pub fn init(level: &str, format: LogFormat) {
    // Without trace export nothing here can fail.
    let _ = init_with_traces(level, format, &TracesSection::default());
}

/// Install the global subscriber, with trace export when `traces.endpoint` is set. Fails only
/// when the exporter cannot be built (the endpoint was checked when the configuration loaded).
pub fn init_with_traces(
    level: &str,
    format: LogFormat,
    traces: &TracesSection,
) -> anyhow::Result<()> {
    if FORMAT.get().is_some() {
        return Ok(());
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = match format {
        LogFormat::Text => fmt.with_target(true).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
    };
    let otel = match &traces.endpoint {
        Some(endpoint) => Some(otel_layer(endpoint, traces)?),
        None => None,
    };
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    let result = tracing_subscriber::registry()
        .with(
            fmt.with_filter(filter)
                .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                    !is_client_target(meta.target())
                })),
        )
        .with(
            ClientLines.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                is_client_target(meta.target()) && *meta.level() <= tracing::Level::WARN
            })),
        )
        .with(otel)
        .try_init();
    // An already installed subscriber (tests, a second call) is fine.
    if result.is_ok() {
        let _ = FORMAT.set(format);
        let _ = RELOAD.set(Box::new(move |f| {
            reload.reload(f).map_err(|e| e.to_string())
        }));
    }
    Ok(())
}

/// The OpenTelemetry layer: refetch's spans (and warnings and errors inside them, as span
/// events) to an OTLP/HTTP collector, and `traceparent` on source requests.
fn otel_layer<S>(
    endpoint: &str,
    traces: &TracesSection,
) -> anyhow::Result<Box<dyn tracing_subscriber::Layer<S> + Send + Sync>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .with_timeout(traces.timeout)
        .with_headers(
            traces
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        )
        .build()
        .context("cannot build the OTLP trace exporter ([traces])")?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            traces.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(traces.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("refetch");
    let _ = PROVIDER.set(provider);
    refetch_http::telemetry::set_trace_headers(|headers| {
        let cx = tracing::Span::current().context();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    });
    let filter = tracing_subscriber::filter::filter_fn(|meta| {
        meta.target().starts_with("refetch")
            && (meta.is_span() || *meta.level() <= tracing::Level::WARN)
    });
    Ok(tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter)
        .boxed())
}

/// The targets under which rdkafka's default client context logs (through the `log` crate):
/// clients created without refetch's own context, such as a producer.
fn is_client_target(target: &str) -> bool {
    target == "librdkafka" || target == "rdkafka::client"
}

/// Routes the lines of rdkafka's default client context through [`refetch::client_log`]: the
/// same de-duplication and rate limit as the consumer's own lines, whichever client wrote them.
struct ClientLines;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ClientLines {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut message = MessageField::default();
        event.record(&mut message);
        let severity = if *event.metadata().level() <= tracing::Level::ERROR {
            Severity::Error
        } else {
            Severity::Warning
        };
        let (facility, text) = client_line(&message.0);
        refetch::client_log::global().log(severity, facility, text);
    }
}

use refetch::client_log::Severity;

/// The facility and text of a line of rdkafka's default context: `librdkafka: FAC text` for
/// a log line, `librdkafka: Global error: ...` for an error callback.
fn client_line(message: &str) -> (&str, &str) {
    let rest = message.strip_prefix("librdkafka: ").unwrap_or(message);
    if rest.starts_with("Global error: ") {
        return ("ERROR", rest);
    }
    match rest.split_once(' ') {
        Some((fac, text))
            if !fac.is_empty() && fac.chars().all(|c| c.is_ascii_uppercase() || c == '_') =>
        {
            (fac, text)
        }
        _ => ("", rest),
    }
}

#[derive(Default)]
struct MessageField(String);

impl tracing::field::Visit for MessageField {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            value.clone_into(&mut self.0);
        }
    }
}

/// Writes trace-context headers into a request's header map.
struct HeaderInjector<'a>(&'a mut reqwest::header::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Report the error that ends the process: one JSON line in JSON mode, `error: ...` otherwise.
pub fn fatal(error: &anyhow::Error) {
    match FORMAT.get() {
        Some(LogFormat::Json) => {
            tracing::error!(target: "refetch", "{error:#}");
        }
        _ => eprintln!("error: {error:#}"),
    }
}

/// Write the Kafka client's repeats not summarised yet, then flush and stop trace export (call
/// once, when the process ends, outside the async runtime).
pub fn shutdown() {
    for line in refetch::client_log::global().drain() {
        refetch::client_log::write(&line);
    }
    if let Some(p) = PROVIDER.get()
        && let Err(e) = p.shutdown()
    {
        eprintln!("warning: flushing the last spans failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_the_default_client_context_are_split_into_facility_and_text() {
        assert_eq!(
            client_line(
                "librdkafka: FAIL [thrd:b:1/bootstrap]: b:1/bootstrap: Connect to ipv4#b:1 failed"
            ),
            (
                "FAIL",
                "[thrd:b:1/bootstrap]: b:1/bootstrap: Connect to ipv4#b:1 failed"
            )
        );
        assert_eq!(
            client_line(
                "librdkafka: Global error: AllBrokersDown (Local: down): 1/1 brokers are down"
            ),
            (
                "ERROR",
                "Global error: AllBrokersDown (Local: down): 1/1 brokers are down"
            )
        );
        assert_eq!(client_line("something else"), ("", "something else"));
    }
}
