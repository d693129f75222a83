//! Verification of Cognito access and ID tokens for the fleet: [`jwks`]
//! caches each pool's keys, [`verify`] runs the checks, [`http`] fetches
//! the keys; [`Tokens`] is what the handler calls, with its metrics.

pub mod http;
pub mod jwks;
pub mod metrics;
pub mod mint;
pub mod verify;

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

pub use self::{
    jwks::{JwksCache, JwksError, JwksSource},
    metrics::TokenMetrics,
    verify::{
        ActiveToken, Expectations, InactiveReason, KeysUnavailable, TokenUse, Verdict, Verifier,
    },
};
use crate::{
    domain::{BearerToken, UserPoolId},
    revocation::Revocations,
};

/// The token flags, resolved.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// Clock skew allowed on `exp`.
    pub leeway: Duration,
    /// Least time between two fetches of one pool's JWKS.
    pub refetch_penalty: Duration,
    /// Bound on one JWKS fetch.
    pub fetch_timeout: Duration,
}

/// The verifier, the watermarks it checks last, and its metrics: one per
/// process.
#[derive(Debug, Clone)]
pub struct Tokens {
    verifier: Verifier,
    revocations: Revocations,
    metrics: TokenMetrics,
}

impl Tokens {
    /// A verifier of tokens issued in `region`, keys from `source`; a
    /// token that passes every check is still inactive when `revocations`
    /// holds a watermark at or after its sign-in.
    pub fn new(
        source: Arc<dyn JwksSource>,
        settings: &TokenSettings,
        revocations: Revocations,
        metrics: TokenMetrics,
    ) -> Self {
        let fetches = metrics.jwks_fetches.clone();
        let cache = JwksCache::new(source, settings.refetch_penalty, move |ok| {
            fetches
                .with_label_values(&[if ok { "ok" } else { "error" }])
                .inc();
        });
        Self {
            verifier: Verifier::new(Arc::new(cache), settings.leeway),
            revocations,
            metrics,
        }
    }

    /// Verifies `token` for `pool`, counting the result. The span and
    /// metrics carry the result only, never a claim.
    pub async fn verify(
        &self,
        token: &BearerToken,
        pool: &UserPoolId,
        expect: &Expectations<'_>,
    ) -> Result<Verdict, KeysUnavailable> {
        let started = Instant::now();
        let verdict = match self.verifier.verify(token, pool, expect).await {
            // Last, and in memory: a revoked token costs what an active one does.
            Ok(Verdict::Active(active))
                if self
                    .revocations
                    .is_revoked(pool, &active.sub, active.auth_time) =>
            {
                Ok(Verdict::Inactive(InactiveReason::Revoked))
            }
            other => other,
        };
        let result = match &verdict {
            Ok(Verdict::Active(_)) => "active",
            Ok(Verdict::Inactive(reason)) => reason.label(),
            Err(_) => "unavailable",
        };
        tracing::Span::current().record("token.result", result);
        self.metrics
            .verifications
            .with_label_values(&[result])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[result])
            .observe(started.elapsed().as_secs_f64());
        verdict
    }
}
