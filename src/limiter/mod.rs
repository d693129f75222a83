//! Keeping inside Cognito's quota: per-caller limits, then one shared
//! budget with a bounded queue. See the README's "Rate limiting" section.

mod budget;
mod callers;
mod gcra;

pub use budget::{
    BudgetSettings, RateLimitCause, RateLimited, Reservation, ReservationDeadline, UpstreamBudget,
};
pub use callers::{CallerLimits, CallerRateLimited, CallerSettings};
