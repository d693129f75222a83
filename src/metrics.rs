//! Prometheus metrics and the admin listener that serves them at
//! `GET /metrics`. Gauges that other parts own (queue depth, calls in flight,
//! current rate) are read at scrape time rather than mirrored.
//!
//! The listener is a few lines of hyper on purpose: one path, no routing
//! framework needed.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::{net::TcpListener, sync::Semaphore};

/// Latency buckets in seconds: sub-millisecond refusals up to slow Cognito.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric the service exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `session_rpc_duration_seconds{method, code}`.
    pub rpc_duration: HistogramVec,
    /// `session_cognito_request_duration_seconds{outcome}`, one per attempt.
    pub upstream_duration: HistogramVec,
    /// `session_cognito_requests_total{outcome}`, one per attempt.
    pub upstream_requests: IntCounterVec,
    /// `session_rate_limit_rejections_total{reason}`.
    pub rejections: IntCounterVec,
    /// `session_rate_limit_permit_wait_seconds`.
    pub permit_wait: Histogram,
    /// `session_authz_denials_total{reason}`.
    pub authz_denials: IntCounterVec,
    /// `session_config_reloads_total{kind, result}`.
    pub config_reloads: IntCounterVec,
    /// `session_config_reload_failing{kind}`: 1 while the last reload of that
    /// kind failed (the previous file still in force), 0 after a success.
    pub config_reload_failing: IntGaugeVec,
    /// `session_rate_limit_configured_rate_per_second`: `--rate-limit-rps`,
    /// so alerts can compare the adaptive rate with it.
    pub configured_rate: Gauge,
    queue_depth: IntGauge,
    in_flight: IntGauge,
    current_rate: Gauge,
    log_lines_dropped: IntCounter,
    log_lines_suppressed: IntCounter,
}

/// Label values created at zero when the process starts. A counter series
/// born at 1 hides its first increment from `rate()` and `increase()`, and a
/// reload fails only once per changed file, so its alert needs the series to
/// exist before the failure.
const INITIAL_REJECTION_REASONS: &[&str] = &["CALLER_RATE_LIMITED", "RATE_LIMITED", "OVERLOADED"];
/// Reasons that `SignOutError::Unauthorized` (authz::Denied) maps to.
const INITIAL_AUTHZ_DENIAL_REASONS: &[&str] = &[
    "CALLER_NOT_ALLOWED",
    "POOL_NOT_ALLOWED_FOR_CALLER",
    "RPC_NOT_ALLOWED_FOR_CALLER",
];
/// Kinds of reloaded files (`reload::Watched::kind`).
const RELOAD_KINDS: &[&str] = &["tls", "authz_policy"];
const INITIAL_RELOADS: &[[&str; 2]] = &[
    ["tls", "ok"],
    ["tls", "error"],
    ["authz_policy", "ok"],
    ["authz_policy", "error"],
];

/// Values sampled at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Sampled {
    /// Requests waiting for a permit.
    pub queue_depth: usize,
    /// Cognito calls under way.
    pub in_flight: usize,
    /// The budget's rate now (below the configured one after throttling).
    pub current_rate: f64,
    /// Log lines dropped so far because stdout could not keep up.
    pub log_lines_dropped: u64,
    /// Warning and error lines dropped so far as repeats of one statement.
    pub log_lines_suppressed: u64,
}

impl Metrics {
    /// Registers every metric in a registry of its own.
    pub fn new() -> Self {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let metric = HistogramVec::new(opts, labels).expect("valid histogram");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique name");
            metric
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique name");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid gauge");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique name");
            metric
        };
        let rpc_duration = histogram(
            "session_rpc_duration_seconds",
            "Duration of API calls, by method and gRPC code.",
            &["method", "code"],
        );
        let upstream_duration = histogram(
            "session_cognito_request_duration_seconds",
            "Duration of each AdminUserGlobalSignOut attempt, by outcome (OK or Cognito error).",
            &["outcome"],
        );
        let upstream_requests = counter(
            "session_cognito_requests_total",
            "AdminUserGlobalSignOut attempts, by outcome (OK or Cognito error).",
            &["outcome"],
        );
        let rejections = counter(
            "session_rate_limit_rejections_total",
            "Requests refused by the limits, by ErrorInfo reason.",
            &["reason"],
        );
        let authz_denials = counter(
            "session_authz_denials_total",
            "Requests refused by the authorization policy, by ErrorInfo reason.",
            &["reason"],
        );
        let config_reloads = counter(
            "session_config_reloads_total",
            "Files reloaded after a change on disk, by kind (tls, authz_policy) and result.",
            &["kind", "result"],
        );
        let config_reload_failing = IntGaugeVec::new(
            Opts::new(
                "session_config_reload_failing",
                "1 while the last reload of that kind (tls, authz_policy) failed and the previous file is still in use; 0 after a success.",
            ),
            &["kind"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(config_reload_failing.clone()))
            .expect("unique name");
        let permit_wait = HistogramVec::new(
            HistogramOpts::new(
                "session_rate_limit_permit_wait_seconds",
                "Time a sign-out waited for its first rate-limit permit.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &[],
        )
        .expect("valid histogram")
        .with_label_values::<&str>(&[]);
        registry
            .register(Box::new(permit_wait.clone()))
            .expect("unique name");
        let queue_depth = gauge(
            "session_rate_limit_queue_depth",
            "Requests waiting for a rate-limit permit.",
        );
        let in_flight = gauge("session_cognito_in_flight", "Cognito calls under way.");
        let float_gauge = |name: &str, help: &str| {
            let metric = Gauge::new(name, help).expect("valid gauge");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique name");
            metric
        };
        let current_rate = float_gauge(
            "session_rate_limit_rate_per_second",
            "The Cognito budget's current rate (lower than configured after throttling).",
        );
        let configured_rate = float_gauge(
            "session_rate_limit_configured_rate_per_second",
            "The Cognito budget's configured rate (--rate-limit-rps).",
        );
        for reason in INITIAL_REJECTION_REASONS {
            rejections.with_label_values(&[*reason]);
        }
        for labels in INITIAL_RELOADS {
            config_reloads.with_label_values(labels);
        }
        for kind in RELOAD_KINDS {
            config_reload_failing.with_label_values(&[*kind]).set(0);
        }
        for reason in INITIAL_AUTHZ_DENIAL_REASONS {
            authz_denials.with_label_values(&[*reason]);
        }
        let log_lines_dropped = IntCounter::new(
            "session_log_lines_dropped_total",
            "Log lines dropped because standard output could not keep up (audit lines included).",
        )
        .expect("valid counter");
        registry
            .register(Box::new(log_lines_dropped.clone()))
            .expect("unique name");
        let log_lines_suppressed = IntCounter::new(
            "session_log_lines_suppressed_total",
            "Warning and error lines not written because the same statement logged too often (over 20 at once or 5 a second).",
        )
        .expect("valid counter");
        registry
            .register(Box::new(log_lines_suppressed.clone()))
            .expect("unique name");
        let build_info = IntGaugeVec::new(
            Opts::new("session_build_info", "Always 1; the labels name the build."),
            &["version"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique name");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Self {
            registry,
            rpc_duration,
            upstream_duration,
            upstream_requests,
            rejections,
            permit_wait,
            authz_denials,
            config_reloads,
            config_reload_failing,
            configured_rate,
            queue_depth,
            in_flight,
            current_rate,
            log_lines_dropped,
            log_lines_suppressed,
        }
    }

    /// Counts a reload attempt of `kind` and records whether that kind is now
    /// failing (a failure stays visible until a later reload succeeds).
    pub fn record_reload(&self, kind: &str, ok: bool) {
        self.config_reloads
            .with_label_values(&[kind, if ok { "ok" } else { "error" }])
            .inc();
        self.config_reload_failing
            .with_label_values(&[kind])
            .set(i64::from(!ok));
    }

    /// The registry, for parts that register metrics of their own (tokens).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric, gauges sampled now.
    pub fn render(&self, sampled: Sampled) -> String {
        self.queue_depth
            .set(i64::try_from(sampled.queue_depth).unwrap_or(i64::MAX));
        self.in_flight
            .set(i64::try_from(sampled.in_flight).unwrap_or(i64::MAX));
        self.current_rate.set(sampled.current_rate);
        // The writer keeps its own total; the counter catches up to it.
        let dropped = sampled.log_lines_dropped;
        self.log_lines_dropped
            .inc_by(dropped.saturating_sub(self.log_lines_dropped.get()));
        let suppressed = sampled.log_lines_suppressed;
        self.log_lines_suppressed
            .inc_by(suppressed.saturating_sub(self.log_lines_suppressed.get()));
        let mut text = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut text);
        String::from_utf8(text).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Time a scrape has to send its request headers, and the longest a
/// metrics connection lives: Prometheus sends a few hundred bytes at once.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// hyper's smallest read buffer; a scrape's request is far below it, and a
/// header that does not fit is refused (431) instead of buffered.
const METRICS_MAX_BUF: usize = 8 * 1024;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves, with at
/// most `budget` connections at once (further clients wait in the kernel's
/// backlog: no file descriptors taken from the gRPC port).
pub async fn serve_metrics<F>(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    budget: Arc<Semaphore>,
    shutdown: F,
) where
    F: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = budget.clone().acquire_owned() => permit,
            () = &mut shutdown => return,
        };
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // Out of file descriptors, typically: retrying at once would
            // spin a core; pause as the gRPC listener does.
            Err(error) => {
                tracing::warn!(%error, "metrics listener: accept failed");
                tokio::time::sleep(crate::incoming::ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(respond(&request, &*render)) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .max_buf_size(METRICS_MAX_BUF)
                .serve_connection(TokioIo::new(stream), service);
            // Also bounds a client that never reads the response.
            let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, connection).await;
            drop(permit);
        });
    }
}

fn respond<B>(
    request: &Request<B>,
    render: &(dyn Fn() -> String + Send + Sync),
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (200, "text/plain; version=0.0.4", render()),
        (_, "/metrics") => (405, "text/plain", "only GET\n".to_owned()),
        _ => (404, "text/plain", "try /metrics\n".to_owned()),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::from(body))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_sampled_gauges() {
        let metrics = Metrics::new();
        metrics
            .rejections
            .with_label_values(&["RATE_LIMITED"])
            .inc();
        let text = metrics.render(Sampled {
            queue_depth: 3,
            in_flight: 2,
            current_rate: 10.0,
            log_lines_dropped: 7,
            log_lines_suppressed: 3,
        });
        for line in [
            "session_rate_limit_rejections_total{reason=\"RATE_LIMITED\"} 1",
            "session_rate_limit_queue_depth 3",
            "session_cognito_in_flight 2",
            "session_rate_limit_rate_per_second 10",
            "session_log_lines_dropped_total 7",
            "session_log_lines_suppressed_total 3",
            "session_build_info{version=\"",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn alerting_counters_start_at_zero_and_the_configured_rate_is_exported() {
        let metrics = Metrics::new();
        metrics.configured_rate.set(20.0);
        let text = metrics.render(Sampled {
            queue_depth: 0,
            in_flight: 0,
            current_rate: 20.0,
            log_lines_dropped: 0,
            log_lines_suppressed: 0,
        });
        for line in [
            "session_rate_limit_configured_rate_per_second 20",
            "session_rate_limit_rejections_total{reason=\"RATE_LIMITED\"} 0",
            "session_rate_limit_rejections_total{reason=\"OVERLOADED\"} 0",
            "session_rate_limit_rejections_total{reason=\"CALLER_RATE_LIMITED\"} 0",
            "session_config_reloads_total{kind=\"tls\",result=\"error\"} 0",
            "session_config_reloads_total{kind=\"authz_policy\",result=\"error\"} 0",
            "session_config_reload_failing{kind=\"tls\"} 0",
            "session_config_reload_failing{kind=\"authz_policy\"} 0",
            "session_authz_denials_total{reason=\"CALLER_NOT_ALLOWED\"} 0",
            "session_authz_denials_total{reason=\"POOL_NOT_ALLOWED_FOR_CALLER\"} 0",
            "session_authz_denials_total{reason=\"RPC_NOT_ALLOWED_FOR_CALLER\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn a_failed_reload_stays_failing_until_a_reload_of_that_kind_succeeds() {
        let metrics = Metrics::new();
        let render = || {
            metrics.render(Sampled {
                queue_depth: 0,
                in_flight: 0,
                current_rate: 0.0,
                log_lines_dropped: 0,
                log_lines_suppressed: 0,
            })
        };
        metrics.record_reload("tls", false);
        let text = render();
        for line in [
            "session_config_reload_failing{kind=\"tls\"} 1",
            "session_config_reload_failing{kind=\"authz_policy\"} 0",
            "session_config_reloads_total{kind=\"tls\",result=\"error\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Another kind succeeding does not clear it.
        metrics.record_reload("authz_policy", true);
        assert!(render().contains("session_config_reload_failing{kind=\"tls\"} 1"));
        metrics.record_reload("tls", true);
        let text = render();
        for line in [
            "session_config_reload_failing{kind=\"tls\"} 0",
            "session_config_reloads_total{kind=\"tls\",result=\"ok\"} 1",
            "session_config_reloads_total{kind=\"tls\",result=\"error\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
