//! Metrics of token verification, registered with the service's registry.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Verification results, created at zero so rates see their first event.
const RESULTS: &[&str] = &[
    "active",
    "invalid",
    "expired",
    "wrong_token_use",
    "wrong_client",
    "revoked",
    "unavailable",
];

/// Verifications take microseconds when cached, a JWKS fetch when not.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
];

/// `session_token_verifications_total{result}`,
/// `session_token_verification_duration_seconds{result}`,
/// `session_jwks_fetches_total{result}`.
#[derive(Debug, Clone)]
pub struct TokenMetrics {
    /// One per verification: `active` or the inactive reason, or `unavailable`.
    pub verifications: IntCounterVec,
    /// Time of the verification itself (not the RPC).
    pub duration: HistogramVec,
    /// JWKS fetches, `ok` or `error`: each is a network round trip.
    pub jwks_fetches: IntCounterVec,
}

impl TokenMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let verifications = IntCounterVec::new(
            Opts::new(
                "session_token_verifications_total",
                "VerifyToken verdicts, by result (active, or why inactive, or unavailable).",
            ),
            &["result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "session_token_verification_duration_seconds",
                "Time to verify one token, JWKS fetch included, by result.",
            )
            .buckets(BUCKETS.to_vec()),
            &["result"],
        )?;
        let jwks_fetches = IntCounterVec::new(
            Opts::new(
                "session_jwks_fetches_total",
                "JWKS documents fetched from Cognito, by result (ok, error).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(verifications.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(jwks_fetches.clone()))?;
        for result in RESULTS {
            verifications.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            jwks_fetches.with_label_values(&[result]);
        }
        Ok(Self {
            verifications,
            duration,
            jwks_fetches,
        })
    }
}
