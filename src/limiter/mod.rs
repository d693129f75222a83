//! Keeping inside Cognito's quota: per-caller limits, then one budget with
//! a bounded queue. The budget is this process's own ([`LocalBudget`]) or
//! the fleet's in Redis ([`SharedBudget`], which falls back to a local one);
//! the sign-out flow sees one [`Budget`] either way. See the README's "Rate
//! limiting" section.

mod budget;
mod callers;
mod gcra;
mod local;
mod shared;
#[cfg(test)]
mod shared_tests;

use std::time::Duration;

use tokio::time::Instant;

pub use budget::{
    BudgetSettings, RateLimitCause, RateLimited, Reservation, ReservationDeadline, UpstreamBudget,
};
pub use callers::{CallerCell, CallerCellName, CallerLimits, CallerRateLimited, CallerSettings};
pub use local::LocalBudget;
pub use shared::{SharedBudget, SharedSettings, budget_script, mode_gauge};

use crate::identity::CallerId;

/// Who a request is charged to.
#[derive(Debug, Clone, Copy)]
pub struct CallerRef<'a> {
    /// The verified identity, or the self-declared id.
    pub id: &'a CallerId,
    /// True when `id` was verified (a certificate, a trusted XFCC).
    pub verified: bool,
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The caller is over its own allowance.
    #[error(transparent)]
    Caller(#[from] CallerRateLimited),
    /// The budget has no slot before the request's deadline.
    #[error(transparent)]
    Budget(#[from] RateLimited),
}

/// The Cognito budget the sign-out flow draws on. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Budget {
    /// This process's own (no `--redis-url`).
    Local(LocalBudget),
    /// The fleet's, in Redis.
    Shared(SharedBudget),
    /// A local budget whose every decision takes `delay`, as a round trip
    /// to Redis does: the seam for the flow's interleavings on paused time.
    #[cfg(test)]
    Delayed {
        /// Decides.
        local: LocalBudget,
        /// How long each request takes to reach the decision.
        delay: Duration,
        /// How long each answer then takes to come back, in the order of
        /// the decisions (zero once used up): answers can overtake.
        answer_delays: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Duration>>>,
    },
}

impl Budget {
    /// A slot for a new sign-out, charged to `caller` when given.
    pub async fn reserve(
        &self,
        deadline: Instant,
        caller: Option<CallerRef<'_>>,
    ) -> Result<Reservation, Refusal> {
        match self {
            Self::Local(local) => local.reserve(deadline, caller),
            Self::Shared(shared) => shared.reserve(deadline, caller).await,
            #[cfg(test)]
            Self::Delayed {
                local,
                delay,
                answer_delays,
            } => {
                tokio::time::sleep(*delay).await;
                let decided = local.reserve(deadline, caller);
                let back = answer_delays.lock().expect("not poisoned").pop_front();
                tokio::time::sleep(back.unwrap_or_default()).await;
                decided
            }
        }
    }

    /// Charges a caller that joins a sign-out already queued.
    pub async fn charge_caller(&self, caller: CallerRef<'_>) -> Result<(), CallerRateLimited> {
        match self {
            Self::Local(local) => local.charge_caller(caller),
            Self::Shared(shared) => shared.charge_caller(caller).await,
            #[cfg(test)]
            Self::Delayed { local, delay, .. } => {
                tokio::time::sleep(*delay).await;
                local.charge_caller(caller)
            }
        }
    }

    /// Waits for a retry's permit (no caller is charged for retries).
    pub async fn acquire(&self, deadline: Instant) -> Result<(), RateLimited> {
        match self {
            Self::Local(local) => local.acquire(deadline).await,
            Self::Shared(shared) => match shared.reserve(deadline, None).await {
                Ok(reservation) => reservation.granted().await,
                Err(Refusal::Budget(limited)) => Err(limited),
                // Not charged to a caller, so never refused for one.
                Err(Refusal::Caller(limited)) => Err(RateLimited {
                    retry_after: limited.retry_after,
                    cause: RateLimitCause::WouldWaitTooLong,
                }),
            },
            #[cfg(test)]
            Self::Delayed { local, delay, .. } => {
                tokio::time::sleep(*delay).await;
                local.acquire(deadline).await
            }
        }
    }

    /// Cognito said TooManyRequests: slow down.
    pub fn on_throttled(&self) {
        match self {
            Self::Local(local) => local.on_throttled(),
            Self::Shared(shared) => shared.on_throttled(),
            #[cfg(test)]
            Self::Delayed { local, .. } => local.on_throttled(),
        }
    }

    /// Permits per second now.
    pub fn current_rate(&self) -> f64 {
        match self {
            Self::Local(local) => local.current_rate(),
            Self::Shared(shared) => shared.current_rate(),
            #[cfg(test)]
            Self::Delayed { local, .. } => local.current_rate(),
        }
    }

    /// Requests of this process waiting for a permit.
    pub fn queue_depth(&self) -> usize {
        match self {
            Self::Local(local) => local.queue_depth(),
            Self::Shared(shared) => shared.queue_depth(),
            #[cfg(test)]
            Self::Delayed { local, .. } => local.queue_depth(),
        }
    }

    /// A retry-after for a request refused after it queued.
    pub fn estimated_wait(&self) -> Duration {
        match self {
            Self::Local(local) => local.estimated_wait(),
            Self::Shared(shared) => shared.estimated_wait(),
            #[cfg(test)]
            Self::Delayed { local, .. } => local.estimated_wait(),
        }
    }
}
