//! The one place that builds the process's tracing subscriber: a
//! `RUST_LOG`-style filter, JSON or text logs, and an OpenTelemetry layer when
//! an OTLP endpoint is configured through the standard `OTEL_*` variables.

mod repeats;
mod rpc_layer;
mod user_hash;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{ExporterBuildError, SpanExporter, WithExportConfig};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use std::{os::fd::AsFd, time::Duration};

use tracing::Subscriber;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, filter_fn},
    fmt::MakeWriter,
    layer::SubscriberExt,
};

pub use repeats::LOG_LINES_SUPPRESSED;
pub use rpc_layer::{AccessNote, RpcTelemetryLayer, code_name};
pub use user_hash::{HashKeyError, UserHasher};

use crate::config::LogFormat;

const SERVICE_NAME: &str = env!("CARGO_PKG_NAME");
const SERVICE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The OTLP endpoint the standard variables name, if any: the traces-specific
/// one first, as the OpenTelemetry specification orders them.
pub fn otlp_endpoint_from_env() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
}

/// A tracer provider exporting over OTLP/gRPC to `endpoint`, batching on a
/// thread of its own. Resource: service name and version from the package,
/// overridable by `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`; the
/// sampler from `OTEL_TRACES_SAMPLER`/`_ARG` (the SDK reads those itself).
/// Must be called inside the tokio runtime (the exporter's channel lives there).
pub fn tracer_provider(endpoint: &str) -> Result<SdkTracerProvider, ExporterBuildError> {
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    // The default builder has already read OTEL_SERVICE_NAME and
    // OTEL_RESOURCE_ATTRIBUTES; our package name only fills in when they
    // name no service.
    let env_names_service = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
    let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        SERVICE_VERSION,
    ));
    if !env_names_service {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The subscriber: logs to `sink`, filtered by `RUST_LOG` (else
/// `default_filter`), and spans to OpenTelemetry when `tracing` is given.
pub fn subscriber<W>(
    format: LogFormat,
    default_filter: &str,
    sink: W,
    tracing: Option<&SdkTracerProvider>,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = match format {
        // JSON lines carry no span context, so the layer is shown events
        // only: otherwise it formats every span's fields on creation and on
        // each `record`, for nothing (a sixth of the service's CPU, measured
        // in BENCHMARKS.md).
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(sink)
            .with_filter(
                filter
                    .and(filter_fn(|meta| meta.is_event()))
                    .and(repeats::RepeatLimit::default()),
            )
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(sink)
            .with_filter(filter.and(repeats::RepeatLimit::default()))
            .boxed(),
    };
    // Only our own spans go to the collector: h2, hyper, tonic and the SDK
    // would otherwise trace the exporter's own traffic.
    let otel = tracing.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(SERVICE_NAME))
            .with_filter(filter_fn(|meta| {
                meta.target().starts_with("session_service")
            }))
    });
    Box::new(tracing_subscriber::registry().with(otel).with(logs))
}

/// Standard output for log lines, written by a thread of its own so that
/// the write(2) calls leave the request path; under load one call carries
/// many lines. Bounded and lossy: when 8192 lines wait (stdout stalled, the
/// node's log pipe full), new lines are dropped and counted
/// (`session_log_lines_dropped_total`) rather than blocking the tokio
/// workers, which would stall every call, health check and scrape until the
/// pod is killed for it. Keep the guard until exit: dropping it flushes what
/// is still queued, for [`FLUSH_AT_EXIT`] at most.
pub fn stdout_writer() -> (NonBlocking, FlushOnExit) {
    // A buffered handle on fd 1: `io::stdout()` itself flushes every line.
    // The worker flushes after each batch, so nothing waits in the buffer.
    let out: Box<dyn std::io::Write + Send + Sync> =
        match std::io::stdout().as_fd().try_clone_to_owned() {
            Ok(fd) => Box::new(std::io::BufWriter::new(std::fs::File::from(fd))),
            Err(_) => Box::new(std::io::stdout()),
        };
    // The queue's slots are allocated up front: the default 128k lines
    // cost 4 MiB of resident memory (measured), 8192 cost 256 KiB.
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .finish(out);
    (writer, FlushOnExit(Some(guard)))
}

/// How long the process waits at exit for queued log lines to be written.
pub const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// Flushes the log writer when dropped, but waits [`FLUSH_AT_EXIT`] at most:
/// with stdout stalled, tracing-appender's own guard never returns (when
/// its worker does not answer in time it reports so with `println!`, which
/// blocks on the full pipe), and the process would hang at exit until the
/// pod is killed. Its drop runs on a thread of its own, left behind at exit.
#[derive(Debug)]
pub struct FlushOnExit(Option<WorkerGuard>);

impl Drop for FlushOnExit {
    fn drop(&mut self) {
        let Some(guard) = self.0.take() else {
            return;
        };
        let (done, flushed) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                drop(guard);
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = flushed.recv_timeout(FLUSH_AT_EXIT);
        }
    }
}

/// Lines the log writer holds before it drops new ones.
pub const LOG_QUEUE_LINES: usize = 8192;

/// Installs `subscriber` for the whole process; call once, at start.
pub fn init(subscriber: Box<dyn Subscriber + Send + Sync>) {
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        tracing::warn!("a global tracing subscriber was already installed");
    }
}
