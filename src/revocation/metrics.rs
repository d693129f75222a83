//! `session_revocation_*`: what operators watch of the watermarks.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Seconds from a watermark's logging in Redis to its arrival here: a
/// loopback hop to a slow cross-zone one, and catching up after an outage.
const LAG_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// The revocation metrics; clones share the series.
#[derive(Debug, Clone)]
pub struct RevocationMetrics {
    /// `session_revocation_watermarks`: held in memory now.
    pub live: IntGauge,
    /// `session_revocations_recorded_total{result}`.
    pub recorded: IntCounterVec,
    /// `session_revocation_checks_total{result}`.
    pub checks: IntCounterVec,
    /// Its two series, resolved once: VerifyToken counts one per call.
    pub checks_clear: IntCounter,
    /// `result="revoked"`.
    pub checks_revoked: IntCounter,
    /// `session_revocation_log_lag_seconds`.
    pub lag: Histogram,
    /// `session_revocation_log_resets_total`.
    pub resets: IntCounter,
    /// `session_revocation_log_pending`: recorded here, not yet in Redis.
    pub pending: IntGauge,
    /// `session_revocation_log_caught_up`: 1 once this replica has read the
    /// whole log, 0 while it loads or cannot reach Redis.
    pub caught_up: IntGauge,
    /// `session_revocation_watchers`: WatchRevocations streams open.
    pub watchers: IntGauge,
}

/// `result` of `session_revocations_recorded_total`.
const RECORDED: &[&str] = &["logged", "already_logged", "memory_only", "pending"];

impl RevocationMetrics {
    /// Registers the series; a second registration (tests with several
    /// services in one process) keeps the first's.
    pub fn new(registry: &Registry) -> Self {
        let checks = IntCounterVec::new(
            Opts::new(
                "session_revocation_checks_total",
                "VerifyToken watermark checks of otherwise active tokens, by result (clear, revoked).",
            ),
            &["result"],
        )
        .expect("valid counter");
        let metrics = Self {
            live: IntGauge::new(
                "session_revocation_watermarks",
                "Revocation watermarks held in this replica's memory.",
            )
            .expect("valid gauge"),
            recorded: IntCounterVec::new(
                Opts::new(
                    "session_revocations_recorded_total",
                    "Watermarks recorded by sign-outs here: logged (in Redis), already_logged \
                     (Redis had it or a later one), memory_only (no Redis configured), pending \
                     (Redis failed; held here and retried).",
                ),
                &["result"],
            )
            .expect("valid counter"),
            checks_clear: checks.with_label_values(&["clear"]),
            checks_revoked: checks.with_label_values(&["revoked"]),
            checks,
            lag: Histogram::with_opts(
                HistogramOpts::new(
                    "session_revocation_log_lag_seconds",
                    "Time from a watermark's entry in the Redis log to its arrival in this replica \
                     (Redis's clock against this host's).",
                )
                .buckets(LAG_BUCKETS.to_vec()),
            )
            .expect("valid histogram"),
            resets: IntCounter::new(
                "session_revocation_log_resets_total",
                "Times the Redis revocation log was found lost (a restart without persistence, \
                 eviction) and rewritten from this replica's memory.",
            )
            .expect("valid counter"),
            pending: IntGauge::new(
                "session_revocation_log_pending",
                "Watermarks recorded here that Redis does not have yet.",
            )
            .expect("valid gauge"),
            caught_up: IntGauge::new(
                "session_revocation_log_caught_up",
                "1 while this replica follows the whole revocation log, 0 while it loads or has lost Redis.",
            )
            .expect("valid gauge"),
            watchers: IntGauge::new(
                "session_revocation_watchers",
                "WatchRevocations streams open.",
            )
            .expect("valid gauge"),
        };
        for result in RECORDED {
            metrics.recorded.with_label_values(&[*result]);
        }
        let collectors: [Box<dyn prometheus::core::Collector>; 8] = [
            Box::new(metrics.live.clone()),
            Box::new(metrics.recorded.clone()),
            Box::new(metrics.checks.clone()),
            Box::new(metrics.lag.clone()),
            Box::new(metrics.resets.clone()),
            Box::new(metrics.pending.clone()),
            Box::new(metrics.caught_up.clone()),
            Box::new(metrics.watchers.clone()),
        ];
        for collector in collectors {
            let _ = registry.register(collector);
        }
        metrics
    }
}
