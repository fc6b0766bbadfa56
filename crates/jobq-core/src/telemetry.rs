//! Logging through `tracing` (JSON or pretty, filtered by `JOBQ_LOG_LEVEL` or `RUST_LOG`) and,
//! when `log.otlp_endpoint` is set, the same spans exported to an OpenTelemetry collector over
//! OTLP/HTTP. The W3C trace context travels from the API request into the job's metadata and
//! from there into the job's span, so one trace shows the enqueue and every attempt.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{span_processor_with_async_runtime::BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{LogFormat, LogSettings};

/// Keeps the span exporter alive; [`Telemetry::shutdown`] flushes what is still buffered.
#[derive(Debug, Default)]
#[must_use = "call shutdown() before exiting so buffered spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The processor runs on the runtime: wait for it from a blocking thread.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Installs the global subscriber once; later calls are no-ops (tests, `jobq dev`). Must run
/// inside a Tokio runtime when `log.otlp_endpoint` is set (the exporter runs on it).
pub fn init(log: &LogSettings, service: &'static str) -> Telemetry {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&log.level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match log.format {
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
        LogFormat::Pretty => fmt.compact().boxed(),
    };
    let (otel, provider) = match exporter(log, service) {
        Ok(Some((layer, provider))) => (Some(layer), Some(provider)),
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("warning: OpenTelemetry export disabled: {e}");
            (None, None)
        }
    };
    let installed = tracing_subscriber::registry().with(otel).with(fmt).with(filter).try_init().is_ok();
    if let (true, Some(_)) = (installed, &provider) {
        tracing::info!(endpoint = %log.otlp_endpoint, service, "exporting spans over OTLP/HTTP");
    }
    Telemetry { provider: provider.filter(|_| installed) }
}

type OtelLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

fn exporter(log: &LogSettings, service: &'static str) -> anyhow::Result<Option<(OtelLayer, SdkTracerProvider)>> {
    if log.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    let endpoint = format!("{}/v1/traces", log.otlp_endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(10))
        .build()?;
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service)).boxed();
    Ok(Some((layer, provider)))
}

/// A W3C `traceparent` and optional `tracestate`.
struct Carrier<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Makes `span` a child of the remote span named by `traceparent` (no-op without export or
/// without a valid `traceparent`). Call right after creating the span.
pub fn adopt_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if traceparent.is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Carrier { traceparent, tracestate });
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

#[derive(Default)]
struct Headers(Vec<(String, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// The current span's W3C trace context (`traceparent`, then `tracestate` when not empty), or
/// nothing when spans are not exported.
pub fn current_trace_context() -> Vec<(String, String)> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut headers = Headers::default();
    TraceContextPropagator::new().inject_context(&cx, &mut headers);
    headers.0.retain(|(_, v)| !v.is_empty());
    headers.0
}
