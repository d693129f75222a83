//! From a validated request to Cognito's answer. Duplicates of a sign-out
//! that is still queued join it as one [`job`]; the job takes a permit from
//! the shared budget for every attempt, bounds the calls in flight and
//! retries what is worth retrying within the latest of its callers'
//! deadlines ([`attempts`]).

mod attempts;
mod job;
#[cfg(test)]
mod revoke_tests;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::{sync::Semaphore, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use self::job::{Job, Key, Outcome};
pub use self::{attempts::RetrySettings, job::JobCaller};
use crate::{
    cognito::SignOutUpstream,
    domain::{UserPoolId, Username},
    error::{SignOutError, UpstreamError, UpstreamErrorKind},
    limiter::{Budget, CallerRef, RateLimitCause, RateLimited, Reservation},
    metrics::Metrics,
    revocation::Revocations,
    users::SubResolver,
};

/// One caller's sign-out, as the handler hands it over.
#[derive(Debug, Clone)]
pub struct SignOutCall {
    /// The pool, resolved and allowed.
    pub pool: UserPoolId,
    /// The user to sign out.
    pub username: Username,
    /// Keyed hash of the username, for the audit line.
    pub user_hash: String,
    /// Who asks, for the audit line.
    pub caller: JobCaller,
    /// When this caller stops waiting.
    pub deadline: Instant,
}

/// What a job does before its first Cognito call, while it waits for its
/// permit: find the user's sub and record their revocation watermark (again
/// at the permit if it waited, for the callers who joined meanwhile). Here,
/// not in the handler, so that a sign-out refused by the budget costs no
/// AdminGetUser, and the callers of one job share one lookup.
#[derive(Debug, Clone)]
pub struct Revoker {
    /// Username → sub (AdminGetUser, cached for canonical usernames).
    pub users: SubResolver,
    /// Where the watermark goes.
    pub revocations: Revocations,
}

/// Cheap to clone; clones share the budget, the queue and the bounds.
#[derive(Debug, Clone)]
pub struct SignOutFlow {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    upstream: Arc<dyn SignOutUpstream>,
    /// `None` only in tests of the budget and retries alone.
    revoker: Option<Revoker>,
    budget: Budget,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    retry: RetrySettings,
    metrics: Arc<Metrics>,
    /// Jobs still waiting for their first permit, by (pool, user): the only
    /// ones a new caller may join.
    queued: Mutex<HashMap<Key, Arc<Job>>>,
    /// Every job task, so that shutdown can wait for them (their audit
    /// lines) or, past the grace, end them.
    jobs: TaskTracker,
    abandon: CancellationToken,
}

impl SignOutFlow {
    /// `max_in_flight` bounds the Cognito calls under way at once.
    pub fn new(
        upstream: Arc<dyn SignOutUpstream>,
        revoker: Option<Revoker>,
        budget: Budget,
        max_in_flight: usize,
        retry: RetrySettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                upstream,
                revoker,
                budget,
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                max_in_flight,
                retry,
                metrics,
                queued: Mutex::default(),
                jobs: TaskTracker::new(),
                abandon: CancellationToken::new(),
            }),
        }
    }

    /// Cognito calls under way now.
    pub fn in_flight(&self) -> usize {
        self.inner.max_in_flight - self.inner.in_flight.available_permits()
    }

    /// The Cognito budget (for metrics and tests).
    pub fn budget(&self) -> &Budget {
        &self.inner.budget
    }

    /// Signs the user out, giving up at the call's deadline. A duplicate of
    /// a queued sign-out joins it when its deadline fits the job's permit
    /// slot, and is refused at once (RATE_LIMITED) when it does not.
    pub async fn sign_out(&self, call: SignOutCall) -> Outcome {
        let deadline = call.deadline;
        let (job, mut outcome) = self.join_or_lead(call).await?;
        match tokio::time::timeout_at(deadline, outcome.wait_for(Option::is_some)).await {
            Ok(Ok(done)) => done.clone().unwrap_or_else(|| Err(job::no_outcome())),
            // The job's task ended without an outcome: it panicked, or was
            // abandoned at shutdown.
            Ok(Err(_)) => Err(job::no_outcome()),
            // Still queued: the permit came later than estimated (the rate
            // dropped), which is a rate limit, not an upstream timeout.
            Err(_) if !job.started() => Err(RateLimited {
                retry_after: self.inner.budget.estimated_wait(),
                cause: RateLimitCause::WouldWaitTooLong,
            }
            .into()),
            Err(elapsed) => Err(UpstreamError::new(UpstreamErrorKind::Timeout, elapsed).into()),
        }
    }

    /// Waits for the jobs under way (their Cognito calls and audit lines)
    /// until `deadline`, then ends the rest, which audit themselves as
    /// abandoned. New sign-outs should have stopped arriving.
    pub async fn shutdown(&self, deadline: Instant) {
        let jobs = &self.inner.jobs;
        jobs.close();
        if tokio::time::timeout_at(deadline, jobs.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                jobs = jobs.len(),
                "shutdown grace over: abandoning sign-outs still under way"
            );
            self.inner.abandon.cancel();
            jobs.wait().await;
        }
    }

    /// Joins the queued job of the same user, or starts a new one. The
    /// caller is charged once either way: joining takes its allowance
    /// only, leading takes its allowance and a slot in one reservation.
    async fn join_or_lead(
        &self,
        call: SignOutCall,
    ) -> Result<(Arc<Job>, job::Subscription), SignOutError> {
        let key = (call.pool.clone(), call.username.clone());
        let caller = CallerRef {
            id: &call.caller.id,
            verified: call.caller.verified.is_some(),
        };
        let mut charged = false;
        if self.queued().contains_key(&key) {
            self.inner.budget.charge_caller(caller).await?;
            charged = true;
            if let Some(joined) = self.join(&key, &call)? {
                return Ok(joined);
            }
        }
        let reservation = self
            .inner
            .budget
            .reserve(call.deadline, (!charged).then_some(caller))
            .await?;
        Ok(self.lead(key, call, reservation))
    }

    /// Joins the queued job for `key`, if there is one. Under the queue's
    /// lock, so a job never leaves the queue while someone joins it.
    fn join(
        &self,
        key: &Key,
        call: &SignOutCall,
    ) -> Result<Option<(Arc<Job>, job::Subscription)>, SignOutError> {
        let queued = self.queued();
        let Some(job) = queued.get(key) else {
            return Ok(None);
        };
        let subscription = job.join(call.caller.clone(), call.deadline)?;
        Ok(Some((job.clone(), subscription)))
    }

    /// Starts a job on `reservation` and queues it for others to join. The
    /// reservation may have awaited Redis, so another caller may have
    /// queued a job for this user meanwhile: this one joins it and gives
    /// its slot up (capacity lost, never an overrun), or, if that job's
    /// permit comes after this caller's deadline, runs on its own
    /// reservation, joinable by nobody.
    fn lead(
        &self,
        key: Key,
        call: SignOutCall,
        reservation: Reservation,
    ) -> (Arc<Job>, job::Subscription) {
        let mut queued = self.queued();
        let other = queued.get(&key).cloned();
        if let Some(other) = &other
            && let Ok(subscription) = other.join(call.caller.clone(), call.deadline)
        {
            return (other.clone(), subscription);
        }
        let (job, subscription) = Job::new(
            key.clone(),
            call.user_hash,
            call.caller,
            call.deadline,
            &reservation,
        );
        // A permit granted at once means the call is as good as in flight:
        // nobody may join it (a token minted after Cognito processed it
        // would survive it).
        if other.is_none() && !reservation.is_granted() {
            queued.insert(key, job.clone());
        }
        drop(queued);
        let flow = self.clone();
        let lead = job.clone();
        // A task of its own, so the job survives its callers leaving;
        // traced under the first caller's RPC span.
        self.inner.jobs.spawn(
            async move {
                tokio::select! {
                    // Past the shutdown grace nothing new starts.
                    biased;
                    () = flow.inner.abandon.cancelled() => flow.leave_queue(&lead),
                    () = flow.run(lead.clone(), reservation) => {}
                }
            }
            .instrument(tracing::Span::current()),
        );
        (job, subscription)
    }

    fn queued(&self) -> MutexGuard<'_, HashMap<Key, Arc<Job>>> {
        // Nothing panics while holding the lock; recover the data if it did.
        self.inner
            .queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
