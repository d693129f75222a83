//! One process's budget: today's per-process GCRA queue and caller table.
//! It backs the service without Redis, and is the fleet budget's fallback
//! while Redis cannot be reached.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    BudgetSettings, CallerLimits, CallerRef, CallerSettings, Refusal, Reservation, UpstreamBudget,
};
use crate::limiter::{CallerRateLimited, RateLimited};

/// Cheap to clone; clones share the budget and the caller table.
#[derive(Debug, Clone)]
pub struct LocalBudget {
    upstream: UpstreamBudget,
    callers: std::sync::Arc<CallerLimits>,
}

impl LocalBudget {
    /// Starts the queue's dispatcher; needs a tokio runtime.
    pub fn start(budget: BudgetSettings, callers: CallerSettings) -> Self {
        Self {
            upstream: UpstreamBudget::start(budget),
            callers: std::sync::Arc::new(CallerLimits::new(callers)),
        }
    }

    /// The caller's allowance first (when given), then a place in the queue.
    pub fn reserve(
        &self,
        deadline: Instant,
        caller: Option<CallerRef<'_>>,
    ) -> Result<Reservation, Refusal> {
        if let Some(caller) = caller {
            self.charge_caller(caller)?;
        }
        Ok(self.upstream.reserve(Some(deadline))?)
    }

    /// Takes one request from the caller's allowance.
    pub fn charge_caller(&self, caller: CallerRef<'_>) -> Result<(), CallerRateLimited> {
        self.callers
            .check(caller.id, caller.verified, Instant::now())
    }

    /// Waits for a permit (a retry's: no caller is charged).
    pub async fn acquire(&self, deadline: Instant) -> Result<(), RateLimited> {
        self.upstream.acquire(Some(deadline)).await
    }

    /// Cognito said TooManyRequests.
    pub fn on_throttled(&self) {
        self.upstream.on_throttled();
    }

    /// The per-caller rules, for the fleet's cells.
    pub fn callers(&self) -> &CallerLimits {
        &self.callers
    }

    /// Permits per second now.
    pub fn current_rate(&self) -> f64 {
        self.upstream.current_rate()
    }

    /// Requests waiting for a permit.
    pub fn queue_depth(&self) -> usize {
        self.upstream.queue_depth()
    }

    /// How long a request arriving now would wait, at least one interval.
    pub fn estimated_wait(&self) -> Duration {
        self.upstream.estimated_wait()
    }
}
