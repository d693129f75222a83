//! A coalesced sign-out: every caller that asked for the same (pool, user)
//! while it waited for its permit. The job belongs to the task that runs
//! it, not to any caller: it holds the latest of their deadlines, outlives
//! callers that leave, and audits every Cognito call it makes.

use std::{
    io,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{sync::watch, time::Instant};

use super::SignOutFlow;
use crate::{
    cognito::SignedOut,
    domain::{UserPoolId, Username},
    error::{SignOutError, UpstreamError, UpstreamErrorKind},
    identity::{CallerId, IdentitySource},
    limiter::{RateLimitCause, RateLimited, Reservation, ReservationDeadline},
    users::Sub,
};

pub(super) type Outcome = Result<SignedOut, SignOutError>;
pub(super) type Key = (UserPoolId, Username);
pub(super) type Subscription = watch::Receiver<Option<Outcome>>;

/// A caller as the audit line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCaller {
    /// The verified identity, or the self-declared id.
    pub id: CallerId,
    /// How the id was verified; `None` when it was only declared.
    pub verified: Option<IdentitySource>,
}

#[derive(Debug)]
pub(super) struct Job {
    pub(super) key: Key,
    user_hash: String,
    /// When its first permit is expected: a joiner must be able to wait
    /// that long.
    slot: Instant,
    /// Moves the reservation's deadline out as later callers join.
    reservation: ReservationDeadline,
    members: Mutex<Members>,
    pub(super) outcome: watch::Sender<Option<Outcome>>,
    /// Set once the first permit is granted: from then on the job is in
    /// flight and nobody may join it.
    started: AtomicBool,
}

#[derive(Debug)]
struct Members {
    /// Distinct callers, in order of arrival, each with its request count.
    callers: Vec<(JobCaller, usize)>,
    /// The latest deadline of any caller: the job works until then.
    deadline: Instant,
}

impl Job {
    /// A job with its first caller, who is subscribed to the outcome.
    pub(super) fn new(
        key: Key,
        user_hash: String,
        caller: JobCaller,
        deadline: Instant,
        reservation: &Reservation,
    ) -> (Arc<Self>, Subscription) {
        let (outcome, subscription) = watch::channel(None);
        let job = Arc::new(Self {
            key,
            user_hash,
            slot: reservation.eta(),
            reservation: reservation.deadline(),
            members: Mutex::new(Members {
                callers: vec![(caller, 1)],
                deadline,
            }),
            outcome,
            started: AtomicBool::new(reservation.is_granted()),
        });
        (job, subscription)
    }

    /// Adds a caller, or refuses it at once when its deadline comes before
    /// the job's permit slot, exactly as the budget refuses any request.
    /// Called under the queue's lock, while the job is still queued.
    pub(super) fn join(
        &self,
        caller: JobCaller,
        deadline: Instant,
    ) -> Result<Subscription, RateLimited> {
        let now = Instant::now();
        if deadline < self.slot {
            return Err(RateLimited {
                retry_after: self.slot - now,
                cause: RateLimitCause::WouldWaitTooLong,
            });
        }
        let mut members = self.members();
        match members
            .callers
            .iter_mut()
            .find(|(known, _)| *known == caller)
        {
            Some((_, requests)) => *requests += 1,
            None => members.callers.push((caller, 1)),
        }
        if deadline > members.deadline {
            members.deadline = deadline;
            self.reservation.extend(deadline);
        }
        Ok(self.outcome.subscribe())
    }

    /// True once the job holds its first permit.
    pub(super) fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    pub(super) fn start(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// The latest deadline of its callers.
    pub(super) fn deadline(&self) -> Instant {
        self.members().deadline
    }

    /// The audit line of one Cognito call: who asked (every caller that
    /// joined, whether or not it still waits), for whom, and what happened.
    pub(super) fn audit(&self, attempt: u32, outcome: &str, aws_request_id: Option<&str>) {
        let members = self.members();
        let Some((first, _)) = members.callers.first() else {
            return;
        };
        let callers: Vec<&str> = members.callers.iter().map(|(c, _)| c.id.as_str()).collect();
        let requests: usize = members.callers.iter().map(|(_, n)| n).sum();
        tracing::info!(
            target: "audit",
            caller = first.id.as_str(),
            caller_verified_by = first.verified.map_or("none", IdentitySource::as_str),
            callers = ?callers,
            requests,
            user_pool_id = self.key.0.as_str(),
            user_hash = self.user_hash.as_str(),
            attempt,
            outcome,
            aws_request_id,
            "global sign-out"
        );
    }

    fn members(&self) -> MutexGuard<'_, Members> {
        // Nothing panics while holding the lock; recover the data if it did.
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl SignOutFlow ===

impl SignOutFlow {
    /// Runs a job to its end: find the user and record their watermark
    /// while waiting for the permit (unless it came at once), then call
    /// Cognito, and tell every caller still waiting. The lookup runs during
    /// the wait, not after it, so that it does not push calls past their
    /// slots (calls released late arrive at Cognito bunched).
    pub(super) async fn run(&self, job: Arc<Job>, reservation: Reservation) {
        let waiting_since = Instant::now();
        // Only a queued job can be joined, and only until its permit.
        let queued = !reservation.is_granted();
        let revoking = self.revoke(&job);
        tokio::pin!(revoking);
        let permit = async {
            if queued {
                self.wait_for_permit(&job, reservation).await
            } else {
                Some(Ok(()))
            }
        };
        tokio::pin!(permit);
        let mut revoked = None;
        let granted = loop {
            tokio::select! {
                result = &mut revoking, if revoked.is_none() => match result {
                    Ok(sub) => revoked = Some(sub),
                    // Nothing to call Cognito for: the slot is given up.
                    Err(error) => return self.end_without_call(&job, error),
                },
                granted = &mut permit => break granted,
            }
        };
        // Everyone left before the permit: no call, nothing to tell.
        let Some(granted) = granted else {
            return;
        };
        let result = match granted {
            Ok(()) => {
                job.start();
                let waited = waiting_since.elapsed();
                self.inner.metrics.permit_wait.observe(waited.as_secs_f64());
                tracing::debug!(
                    wait_ms = waited.as_secs_f64() * 1000.0,
                    "rate-limit permit granted"
                );
                match revoked {
                    Some(sub) => {
                        // Callers kept joining after the watermark was
                        // taken; one who asked after a sign-in later than
                        // it must not get OK with that token still valid.
                        // Raising it now, as nobody can join any more,
                        // covers them all (Redis logs nothing when the value
                        // did not rise).
                        if queued {
                            self.record(&job, sub.as_ref());
                        }
                        self.call_with_retries(&job).await
                    }
                    None => self.call_after_lookup(&job, revoking, queued).await,
                }
            }
            Err(limited) => {
                tracing::debug!(
                    retry_after_ms = limited.retry_after.as_millis() as u64,
                    "no rate-limit permit"
                );
                Err(limited.into())
            }
        };
        self.forget_if_gone(&job, &result);
        job.outcome.send_replace(Some(result));
    }

    /// The permit came before the lookup ended (the watermark, taken when
    /// it ends, then postdates every joiner). A permit granted at once is
    /// within the budget's burst, so the call may follow it at any time. A
    /// queued permit is a slot: a call that follows it by less than one
    /// permit interval adds at most one call to any second at Cognito; a
    /// later one takes a permit of its own (the first is lost capacity,
    /// never an overrun), so that slow lookups ending together never reach
    /// Cognito as a burst.
    async fn call_after_lookup(
        &self,
        job: &Arc<Job>,
        lookup: impl std::future::Future<Output = Result<Option<Sub>, SignOutError>>,
        queued: bool,
    ) -> Outcome {
        let granted = Instant::now();
        if let Err(error) = lookup.await {
            job.audit(0, error.reason(), None);
            return Err(error);
        }
        let rate = self.inner.budget.current_rate().max(0.001);
        let interval = std::time::Duration::from_secs_f64(1.0 / rate);
        if queued && granted.elapsed() > interval {
            self.inner.budget.acquire(job.deadline()).await?;
        }
        self.call_with_retries(job).await
    }

    /// Cognito says the user does not exist, so a cached sub for this name
    /// belongs to a deleted user: a user created again under it must be
    /// looked up afresh, not revoked under the old sub.
    fn forget_if_gone(&self, job: &Job, result: &Outcome) {
        if let (Some(revoker), Err(SignOutError::Upstream(error))) = (&self.inner.revoker, result)
            && error.kind == UpstreamErrorKind::UserNotFound
        {
            revoker.users.forget(&job.key.0, &job.key.1);
        }
    }

    /// The lookup failed: nobody may join, no sign-out call is made (the
    /// audit line's attempt 0 says so), every caller gets the error.
    fn end_without_call(&self, job: &Arc<Job>, error: SignOutError) {
        self.leave_queue(job);
        job.audit(0, error.reason(), None);
        job.outcome.send_replace(Some(Err(error)));
    }

    /// The user's sub, then their watermark (see [`Self::record`]). A
    /// failed lookup fails the job: nothing is revoked or sent. `None` when
    /// the flow revokes nothing (tests of the budget alone).
    async fn revoke(&self, job: &Job) -> Result<Option<Sub>, SignOutError> {
        let Some(revoker) = &self.inner.revoker else {
            return Ok(None);
        };
        let (pool, username) = &job.key;
        let sub = revoker
            .users
            .resolve(pool, username, job.deadline())
            .await?;
        self.record(job, Some(&sub));
        Ok(Some(sub))
    }

    /// Records the watermark: in this replica's memory at once, in Redis by
    /// a task of its own (its round trip, or its timeout while Redis is
    /// down, never delays the call). So the revocation holds even if
    /// Cognito throttles or fails the call.
    fn record(&self, job: &Job, sub: Option<&Sub>) {
        let (Some(revoker), Some(sub)) = (&self.inner.revoker, sub) else {
            return;
        };
        let recorded = revoker.revocations.record(&job.key.0, sub.as_str());
        revoker.revocations.log_in_background(recorded);
    }

    /// Waits for the job's first permit and takes it out of the queue, so
    /// nobody joins a call in flight. `None` when every caller left first:
    /// then the job leaves the queue and its slot is given up.
    async fn wait_for_permit(
        &self,
        job: &Arc<Job>,
        reservation: Reservation,
    ) -> Option<Result<(), RateLimited>> {
        let granted = reservation.granted();
        tokio::pin!(granted);
        loop {
            tokio::select! {
                // A permit granted as the last caller leaves is used, not
                // wasted: the call goes ahead, audited.
                biased;
                granted = &mut granted => {
                    self.leave_queue(job);
                    return Some(granted);
                }
                () = job.outcome.closed() => {
                    if self.leave_queue_if_abandoned(job) {
                        return None;
                    }
                }
            }
        }
    }

    /// Takes the job out of the queue: nobody may join it any more.
    pub(super) fn leave_queue(&self, job: &Arc<Job>) {
        remove_job(&mut self.queued(), job);
    }

    /// Takes the job out of the queue if nobody waits for it, deciding
    /// under the queue's lock: joins happen under that lock too, so a
    /// caller either joined before (and the job stays) or finds no job
    /// (and starts its own); it never joins a job that is leaving.
    pub(super) fn leave_queue_if_abandoned(&self, job: &Arc<Job>) -> bool {
        let mut queued = self.queued();
        let abandoned = job.outcome.receiver_count() == 0;
        if abandoned {
            remove_job(&mut queued, job);
        }
        abandoned
    }
}

/// Removes `job` from the queue, and only that job.
fn remove_job(queued: &mut std::collections::HashMap<Key, Arc<Job>>, job: &Arc<Job>) {
    if queued.get(&job.key).is_some_and(|q| Arc::ptr_eq(q, job)) {
        queued.remove(&job.key);
    }
}

/// What a caller gets if its job ended without an outcome (it panicked).
pub(super) fn no_outcome() -> SignOutError {
    UpstreamError::new(
        UpstreamErrorKind::Unexpected,
        io::Error::other("the sign-out task ended without an outcome"),
    )
    .into()
}
