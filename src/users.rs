//! From the username a caller names to the user's `sub`, the id tokens
//! carry: one AdminGetUser call under a budget of its own, cached for
//! canonical usernames. No retries: the caller retries the sign-out.

use std::{sync::Arc, time::Duration};

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use quick_cache::sync::Cache;
use tokio::time::Instant;

use crate::{
    cognito::{CognitoUser, UserDirectory},
    domain::{UserPoolId, Username},
    error::{SignOutError, UpstreamError, UpstreamErrorKind},
    limiter::Budget,
};

/// Longest sub accepted from Cognito (its subs are 36-character UUIDs), so
/// that the cache's memory stays bounded whatever a reply holds.
const MAX_SUB_BYTES: usize = 128;

/// A user's `sub`: immutable for the user's life, unlike its username's
/// aliases, and what a token names its user by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sub(String);

impl Sub {
    /// `None` for an empty or oversized value, which no Cognito user has.
    pub fn new(value: &str) -> Option<Self> {
        (!value.is_empty() && value.len() <= MAX_SUB_BYTES).then(|| Self(value.to_owned()))
    }

    /// The sub itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Sizing of the resolver.
#[derive(Debug, Clone, Copy)]
pub struct ResolverSettings {
    /// Entries the cache holds at most.
    pub cache_size: usize,
    /// How long an entry is trusted.
    pub cache_ttl: Duration,
    /// Longest one AdminGetUser call may take (`--upstream-attempt-timeout`).
    pub attempt_timeout: Duration,
}

/// Cheap to clone; clones share the cache and the budget.
#[derive(Debug, Clone)]
pub struct SubResolver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    directory: Arc<dyn UserDirectory>,
    /// AdminGetUser's own: UserRead is a quota apart from sign-outs' UserUpdate.
    budget: Budget,
    cache: Cache<(UserPoolId, Username), Cached>,
    settings: ResolverSettings,
    metrics: LookupMetrics,
}

#[derive(Debug, Clone)]
struct Cached {
    sub: Sub,
    expires: Instant,
}

impl SubResolver {
    /// `budget` should be a budget of its own, not the sign-outs'.
    pub fn new(
        directory: Arc<dyn UserDirectory>,
        budget: Budget,
        settings: ResolverSettings,
        metrics: LookupMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                directory,
                budget,
                cache: Cache::new(settings.cache_size),
                settings,
                metrics,
            }),
        }
    }

    /// The sub of the user `username` names in `pool`, from the cache or
    /// from one AdminGetUser call that ends by `deadline`.
    pub async fn resolve(
        &self,
        pool: &UserPoolId,
        username: &Username,
        deadline: Instant,
    ) -> Result<Sub, SignOutError> {
        let inner = &*self.inner;
        let key = (pool.clone(), username.clone());
        if let Some(sub) = self.cached(&key) {
            inner.metrics.count("cached");
            return Ok(sub);
        }
        if let Err(limited) = inner.budget.acquire(deadline).await {
            inner.metrics.count("rate_limited");
            return Err(limited.into());
        }
        let started = Instant::now();
        let timeout = deadline
            .saturating_duration_since(started)
            .min(inner.settings.attempt_timeout);
        let looked_up = inner.directory.get_user(pool, username, timeout).await;
        inner
            .metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match looked_up {
            Ok(user) => {
                inner.metrics.count("cognito");
                if is_canonical(&user, username) {
                    let expires = Instant::now() + inner.settings.cache_ttl;
                    let sub = user.sub.clone();
                    inner.cache.insert(key, Cached { sub, expires });
                }
                Ok(user.sub)
            }
            Err(error) => Err(self.failed(error)),
        }
    }

    /// Drops what is cached for `username` in `pool`: Cognito said the user
    /// is gone, so a user created again under that name has a new sub.
    pub fn forget(&self, pool: &UserPoolId, username: &Username) {
        self.inner.cache.remove(&(pool.clone(), username.clone()));
    }

    fn cached(&self, key: &(UserPoolId, Username)) -> Option<Sub> {
        let cached = self.inner.cache.get(key)?;
        if Instant::now() < cached.expires {
            return Some(cached.sub);
        }
        self.inner.cache.remove(key);
        None
    }

    fn failed(&self, error: UpstreamError) -> SignOutError {
        let inner = &*self.inner;
        match error.kind {
            UpstreamErrorKind::UserNotFound => inner.metrics.count("not_found"),
            UpstreamErrorKind::Throttled => {
                // Other apps are using the account's UserRead quota.
                inner.budget.on_throttled();
                inner.metrics.count("error");
            }
            _ => inner.metrics.count("error"),
        }
        error.into()
    }
}

/// Whether the name asked for is the user's for good: its canonical
/// username or its sub. An alias (email, phone) may later belong to another
/// user, so its answer is never kept.
fn is_canonical(user: &CognitoUser, asked: &Username) -> bool {
    let asked = asked.expose();
    user.username == asked || user.sub.as_str() == asked
}

/// Lookup results, created at zero so rates see their first event.
const RESULTS: &[&str] = &["cached", "cognito", "not_found", "rate_limited", "error"];

/// AdminGetUser takes one Cognito round trip: milliseconds to the timeout.
const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// `session_user_lookups_total{result}`, `session_user_lookup_duration_seconds`.
#[derive(Debug, Clone)]
pub struct LookupMetrics {
    /// One per resolve: `cached`, `cognito`, `not_found`, `rate_limited`, `error`.
    pub lookups: IntCounterVec,
    /// Time of each AdminGetUser call.
    pub duration: Histogram,
}

impl LookupMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "session_user_lookups_total",
                "Username to sub resolutions before a sign-out, by result (cached, cognito, not_found, rate_limited, error).",
            ),
            &["result"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "session_user_lookup_duration_seconds",
                "Duration of each Cognito AdminGetUser call.",
            )
            .buckets(BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        for result in RESULTS {
            lookups.with_label_values(&[result]);
        }
        Ok(Self { lookups, duration })
    }

    fn count(&self, result: &str) {
        self.lookups.with_label_values(&[result]).inc();
    }
}

#[cfg(test)]
mod tests;
