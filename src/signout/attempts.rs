//! The Cognito calls of one job: the first attempt on the job's permit,
//! each retry on a permit of its own, at most `--max-in-flight` calls under
//! way at once, every attempt audited and measured.
//!
//! Retries are ours, not the SDK's: the SDK's retries happen inside one
//! `send()`, where no permit can be awaited, so they would spend Cognito's
//! quota behind the budget's back.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{Instrument, field::Empty};

use super::{
    SignOutFlow,
    job::{Job, Outcome},
};
use crate::{
    cognito::SignedOut,
    error::{SignOutError, UpstreamError, UpstreamErrorKind},
    metrics::Metrics,
};

/// Longest pause between two attempts, whatever the attempt number.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Retry policy of the upstream call.
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    /// Attempts per sign-out, the first included.
    pub max_attempts: u32,
    /// Pause before the first retry; doubles each time, with jitter.
    pub initial_backoff: Duration,
}

impl SignOutFlow {
    /// The first attempt's permit is already taken; every retry takes one.
    /// The job's deadline (its callers' latest) bounds them all.
    pub(super) async fn call_with_retries(&self, job: &Job) -> Outcome {
        let span = cognito_span();
        self.attempts(job, &span).instrument(span.clone()).await
    }

    async fn attempts(&self, job: &Job, span: &tracing::Span) -> Outcome {
        let deadline = job.deadline();
        let mut attempt = 1;
        let mut last_error: Option<UpstreamError> = None;
        loop {
            let started = Instant::now();
            let remaining = deadline.saturating_duration_since(started);
            // A call that cannot finish in time is not made, nor counted.
            // With no attempt made, the caller's time ran out in the queue:
            // the caller's outcome, not an upstream timeout.
            if remaining.is_zero() {
                return Err(last_error.map_or(SignOutError::DeadlineTooShort, SignOutError::from));
            }
            let Ok(slot) = self.inner.in_flight.clone().try_acquire_owned() else {
                return Err(last_error.map_or(SignOutError::Overloaded, SignOutError::from));
            };
            span.record("attempts", i64::from(attempt));
            let audit = AuditOnDrop::new(job, attempt, &self.inner.metrics);
            let result = self
                .inner
                .upstream
                .global_sign_out(&job.key.0, &job.key.1, remaining)
                .await;
            audit.finish(&result);
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
            if self.inner.budget.acquire(deadline).await.is_err() {
                return Err(error.into());
            }
            tracing::debug!(attempt = attempt + 1, previous = ?error.kind, "retrying Cognito call");
            attempt += 1;
            last_error = Some(error);
        }
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
}

/// Audits one Cognito call however it ends: with its outcome, or, if the
/// job is ended mid-call (shutdown past its grace), as abandoned: Cognito
/// may or may not have signed the user out.
struct AuditOnDrop<'a> {
    job: &'a Job,
    attempt: u32,
    metrics: &'a Metrics,
    audited: bool,
}

impl<'a> AuditOnDrop<'a> {
    fn new(job: &'a Job, attempt: u32, metrics: &'a Metrics) -> Self {
        Self {
            job,
            attempt,
            metrics,
            audited: false,
        }
    }

    fn finish(mut self, result: &Result<SignedOut, UpstreamError>) {
        let (outcome, aws_request_id) = match result {
            Ok(signed_out) => ("signed_out", Some(signed_out.aws_request_id.as_str())),
            Err(error) => (error.outcome_label(), error.aws_request_id.as_deref()),
        };
        self.job.audit(self.attempt, outcome, aws_request_id);
        self.audited = true;
    }
}

impl Drop for AuditOnDrop<'_> {
    fn drop(&mut self) {
        if !self.audited {
            self.job.audit(self.attempt, "abandoned", None);
            self.metrics
                .upstream_requests
                .with_label_values(&["Abandoned"])
                .inc();
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
