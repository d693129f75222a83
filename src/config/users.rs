//! The flags of the username → sub lookup (AdminGetUser) in front of every
//! sign-out: its own rate budget and its cache.

use std::time::Duration;

use clap::Args;

use crate::limiter::BudgetSettings;

/// Cached users at most: ~100 bytes each, so the default holds ~10 MB.
const MAX_CACHE_SIZE: u64 = 10_000_000;

/// How users are looked up.
#[derive(Debug, Clone, Args)]
pub struct UserLookupConfig {
    /// AdminGetUser calls per second from this replica (not the fleet's:
    /// this budget is never in Redis). Each sign-out the sign-out budget
    /// admits may need one, so keep it at least that budget's rate plus
    /// burst (20 + 5 by default, all of which one replica may take), or
    /// uncached sign-outs beyond it fail RATE_LIMITED. They draw on
    /// Cognito's UserRead quota, 120/s per AWS account and Region and
    /// shared with every other app's AdminGetUser calls: keep replicas ×
    /// this well under it (3 × 25 = 75 by default).
    #[arg(long, env = "SESSION_USER_LOOKUP_RATE_LIMIT_RPS", default_value_t = 25.0, value_name = "RPS", value_parser = super::parse_rate)]
    pub user_lookup_rate_limit_rps: f64,

    /// AdminGetUser calls this replica may make at once after a quiet
    /// period: as many as the sign-outs it may be admitted in one second.
    #[arg(long, env = "SESSION_USER_LOOKUP_BURST", default_value_t = 25,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub user_lookup_burst: u32,

    /// Users whose sub is remembered at most (canonical usernames only: an
    /// email or phone alias can move to another user, so it is looked up
    /// every time). The least used are forgotten first.
    #[arg(long, env = "SESSION_USER_CACHE_SIZE", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_CACHE_SIZE))]
    pub user_cache_size: u64,

    /// How long a cached sub is trusted: a user deleted and created again
    /// under the same name gets a new sub, seen once the entry expires.
    #[arg(long, env = "SESSION_USER_CACHE_TTL", default_value = "1h", value_name = "DURATION", value_parser = super::parse_duration)]
    pub user_cache_ttl: Duration,
}

impl UserLookupConfig {
    /// The lookup budget: this replica's rate, queued like the sign-out
    /// budget (`--max-queue`, `--max-queue-wait`).
    pub fn budget(&self, max_queue: usize, max_wait: Duration) -> BudgetSettings {
        BudgetSettings {
            rate_per_sec: self.user_lookup_rate_limit_rps,
            burst: self.user_lookup_burst,
            max_queue,
            max_wait,
        }
    }

    /// The cache's capacity, in entries.
    pub fn cache_size(&self) -> usize {
        usize::try_from(self.user_cache_size).unwrap_or(usize::MAX)
    }
}
