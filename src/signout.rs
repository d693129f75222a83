//! From a validated request to Cognito's answer: coalesce duplicates that are
//! still queued, take a permit from the shared budget for every attempt,
//! bound the calls in flight, retry what is worth retrying within the
//! deadline.
//!
//! Retries are ours, not the SDK's: the SDK's retries happen inside one
//! `send()`, where no permit can be awaited, so they would spend Cognito's
//! quota behind the budget's back.

use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};
use tracing::{Instrument, field::Empty};

use crate::{
    cognito::{Cognito, SignedOut},
    domain::{UserPoolId, Username},
    error::{SignOutError, UpstreamError, UpstreamErrorKind},
    limiter::UpstreamBudget,
    metrics::Metrics,
};

/// Longest pause between two attempts, whatever the attempt number.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

type Outcome = Result<SignedOut, SignOutError>;
type Key = (UserPoolId, Username);

/// Retry policy of the upstream call.
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    /// Attempts per sign-out, the first included.
    pub max_attempts: u32,
    /// Pause before the first retry; doubles each time, with jitter.
    pub initial_backoff: Duration,
}

/// Cheap to clone; clones share the budget, the queue and the bounds.
#[derive(Debug, Clone)]
pub struct SignOutFlow {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cognito: Cognito,
    budget: UpstreamBudget,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    retry: RetrySettings,
    metrics: Arc<Metrics>,
    /// Sign-outs waiting for their first permit, by (pool, user).
    queued: Mutex<HashMap<Key, watch::Sender<Option<Outcome>>>>,
}

impl SignOutFlow {
    /// `max_in_flight` bounds the Cognito calls under way at once.
    pub fn new(
        cognito: Cognito,
        budget: UpstreamBudget,
        max_in_flight: usize,
        retry: RetrySettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cognito,
                budget,
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                max_in_flight,
                retry,
                metrics,
                queued: Mutex::default(),
            }),
        }
    }

    /// Cognito calls under way now.
    pub fn in_flight(&self) -> usize {
        self.inner.max_in_flight - self.inner.in_flight.available_permits()
    }

    /// The shared budget (for metrics and tests).
    pub fn budget(&self) -> &UpstreamBudget {
        &self.inner.budget
    }

    /// Signs `username` out of `pool`, giving up at `deadline`.
    pub async fn sign_out(
        &self,
        pool: UserPoolId,
        username: Username,
        deadline: Instant,
    ) -> Outcome {
        let mut outcome = self.join_or_lead((pool, username), deadline);
        match tokio::time::timeout_at(deadline, outcome.wait_for(Option::is_some)).await {
            Ok(Ok(done)) => done.clone().unwrap_or_else(|| Err(no_outcome())),
            // The leading task ended without an outcome: only if it panicked.
            Ok(Err(_)) => Err(no_outcome()),
            Err(_) => Err(UpstreamError::new(
                UpstreamErrorKind::Timeout,
                io::Error::new(io::ErrorKind::TimedOut, "deadline passed while queued"),
            )
            .into()),
        }
    }

    /// Joins the queued sign-out of the same user, or queues a new one.
    fn join_or_lead(&self, key: Key, deadline: Instant) -> watch::Receiver<Option<Outcome>> {
        let mut queued = self
            .inner
            .queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = queued.get(&key) {
            return existing.subscribe();
        }
        let (outcome, receiver) = watch::channel(None);
        queued.insert(key.clone(), outcome.clone());
        // A task of its own, so the group survives its first caller leaving;
        // traced under the first caller's RPC span.
        tokio::spawn(
            self.clone()
                .lead(key, outcome, deadline)
                .instrument(tracing::Span::current()),
        );
        receiver
    }

    async fn lead(self, key: Key, outcome: watch::Sender<Option<Outcome>>, deadline: Instant) {
        let waiting_since = Instant::now();
        let permit = tokio::select! {
            permit = self.inner.budget.acquire(Some(deadline)) => permit,
            // Every caller gave up: leave the queue, take no permit.
            () = outcome.closed() => {
                self.forget(&key);
                return;
            }
        };
        // From here on the call is in flight and nobody may join it: a token
        // minted after Cognito processed this call would survive it, so a
        // request that arrives now must make a call of its own.
        self.forget(&key);
        let waited = waiting_since.elapsed();
        let result = match permit {
            Ok(()) => {
                self.inner.metrics.permit_wait.observe(waited.as_secs_f64());
                tracing::debug!(
                    wait_ms = waited.as_secs_f64() * 1000.0,
                    "rate-limit permit granted"
                );
                let span = cognito_span();
                self.call_with_retries(&key.0, &key.1, deadline, &span)
                    .instrument(span.clone())
                    .await
            }
            Err(limited) => {
                tracing::debug!(
                    retry_after_ms = limited.retry_after.as_millis() as u64,
                    "no rate-limit permit"
                );
                Err(limited.into())
            }
        };
        let _ = outcome.send(Some(result));
    }

    /// Metrics and span fields of one attempt.
    fn record_attempt(
        &self,
        result: &Result<SignedOut, UpstreamError>,
        started: Instant,
        span: &tracing::Span,
    ) {
        let outcome = match result {
            Ok(signed_out) => {
                span.record("aws.request_id", signed_out.aws_request_id.as_str());
                // A retry that succeeds clears an earlier attempt's ERROR.
                span.record("otel.status_code", "OK");
                "OK"
            }
            Err(error) => {
                if let Some(id) = &error.aws_request_id {
                    span.record("aws.request_id", id.as_str());
                }
                if let Some(code) = &error.cognito_code {
                    span.record("cognito.error_code", code.as_str());
                }
                span.record("otel.status_code", "ERROR");
                error.outcome_label()
            }
        };
        span.record("outcome", outcome);
        let metrics = &self.inner.metrics;
        metrics
            .upstream_requests
            .with_label_values(&[outcome])
            .inc();
        metrics
            .upstream_duration
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
    }

    fn forget(&self, key: &Key) {
        let mut queued = self
            .inner
            .queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        queued.remove(key);
    }

    /// The first attempt's permit is already taken; every retry takes one.
    async fn call_with_retries(
        &self,
        pool: &UserPoolId,
        username: &Username,
        deadline: Instant,
        span: &tracing::Span,
    ) -> Outcome {
        let mut attempt = 1;
        let mut last_error: Option<UpstreamError> = None;
        loop {
            let Ok(slot) = self.inner.in_flight.clone().try_acquire_owned() else {
                return Err(last_error.map_or(SignOutError::Overloaded, SignOutError::from));
            };
            span.record("attempts", i64::from(attempt));
            let started = Instant::now();
            let remaining = deadline.saturating_duration_since(started);
            let result = self
                .inner
                .cognito
                .global_sign_out(pool, username, remaining)
                .await;
            self.record_attempt(&result, started, span);
            let error = match result {
                Ok(signed_out) => return Ok(signed_out),
                Err(error) => error,
            };
            // Pausing and queueing for the next permit is not "in flight".
            drop(slot);
            if error.kind == UpstreamErrorKind::Throttled {
                self.inner.budget.on_throttled();
            }
            if !error.kind.is_transient() || attempt >= self.inner.retry.max_attempts {
                return Err(error.into());
            }
            let pause = backoff(self.inner.retry.initial_backoff, attempt);
            // Out of time for another attempt: the last answer says most.
            if Instant::now() + pause >= deadline {
                return Err(error.into());
            }
            tokio::time::sleep(pause).await;
            if self.inner.budget.acquire(Some(deadline)).await.is_err() {
                return Err(error.into());
            }
            tracing::debug!(attempt = attempt + 1, previous = ?error.kind, "retrying Cognito call");
            attempt += 1;
            last_error = Some(error);
        }
    }
}

/// The client span of the Cognito call, retries included.
fn cognito_span() -> tracing::Span {
    tracing::info_span!(
        "cognito",
        otel.name = "CognitoIdentityProvider/AdminUserGlobalSignOut",
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system = "aws-api",
        rpc.service = "CognitoIdentityProvider",
        rpc.method = "AdminUserGlobalSignOut",
        attempts = Empty,
        outcome = Empty,
        aws.request_id = Empty,
        cognito.error_code = Empty,
    )
}

fn no_outcome() -> SignOutError {
    UpstreamError::new(
        UpstreamErrorKind::Unexpected,
        io::Error::other("the sign-out task ended without an outcome"),
    )
    .into()
}

/// Exponential backoff with "equal jitter": half fixed, half random, so
/// retries of a burst spread out instead of arriving together.
fn backoff(initial: Duration, attempt: u32) -> Duration {
    let exponential = initial
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(MAX_BACKOFF);
    exponential / 2 + exponential.mul_f64(fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let initial = Duration::from_millis(100);
        for attempt in 1..=4 {
            let pause = backoff(initial, attempt);
            let full = initial * (1 << (attempt - 1));
            assert!(
                pause >= full / 2 && pause <= full,
                "attempt {attempt}: {pause:?}"
            );
        }
        assert!(backoff(initial, 30) <= MAX_BACKOFF);
    }
}
