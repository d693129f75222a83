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

use crate::{
    cognito::{Cognito, SignedOut},
    domain::{UserPoolId, Username},
    error::{SignOutError, UpstreamError, UpstreamErrorKind},
    limiter::UpstreamBudget,
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
    retry: RetrySettings,
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
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cognito,
                budget,
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                retry,
                queued: Mutex::default(),
            }),
        }
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
        // A task of its own, so the group survives its first caller leaving.
        tokio::spawn(self.clone().lead(key, outcome, deadline));
        receiver
    }

    async fn lead(self, key: Key, outcome: watch::Sender<Option<Outcome>>, deadline: Instant) {
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
        let result = match permit {
            Ok(()) => self.call_with_retries(&key.0, &key.1, deadline).await,
            Err(limited) => Err(limited.into()),
        };
        let _ = outcome.send(Some(result));
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
    ) -> Outcome {
        let mut attempt = 1;
        let mut last_error: Option<UpstreamError> = None;
        loop {
            let Ok(_slot) = self.inner.in_flight.clone().try_acquire_owned() else {
                return Err(last_error.map_or(SignOutError::Overloaded, SignOutError::from));
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let error = match self
                .inner
                .cognito
                .global_sign_out(pool, username, remaining)
                .await
            {
                Ok(signed_out) => return Ok(signed_out),
                Err(error) => error,
            };
            drop(_slot);
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
