//! What one connection, and all of them together, may cost: a budget of
//! connections per listener sized from the file-descriptor limit, a deadline
//! for a client's first bytes, an end to idle connections, a hard end to
//! every connection, and a budget of control frames per connection and for
//! the listener. The accept loops ([`crate::incoming`],
//! [`crate::metrics`]) apply them.

mod activity;
mod frames;
mod guard;
mod idle;

use std::{sync::Arc, time::Duration};

use tokio::sync::Semaphore;

pub use self::{
    activity::{Activity, CountOpenCalls, CountOpenCallsLayer},
    frames::FrameShare,
    guard::{Guarded, HTTP2_PREFACE},
    idle::IdleRule,
};

/// File descriptors kept out of every connection budget: the binary, logs,
/// listeners, DNS, and the Cognito client's own connections (one per call
/// in flight at most, counted on top of this).
const RESERVED_FDS: u64 = 64;

/// The gRPC budget when the fd limit allows more: about 8 KiB each while
/// idle, so 4096 stay far inside a 128 MiB pod, and a sign-out service has
/// tens of clients, not thousands.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 4096;

/// A listener's bounds.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections open at once; beyond it the listener stops accepting and
    /// new ones wait in the kernel's backlog.
    pub budget: Arc<Semaphore>,
    /// Time a new connection has to send its first bytes (the TLS
    /// ClientHello), and again after the handshake to send the HTTP/2 preface.
    pub first_bytes_timeout: Duration,
    /// Time a TLS handshake may take once the ClientHello has arrived.
    pub handshake_timeout: Duration,
    /// Age at which a connection is cut, whatever its state.
    pub hard_end_after: Option<Duration>,
    /// HTTP/2 control frames one connection may send per second.
    pub frames_per_sec: Option<u32>,
    /// Control frames all the listener's connections may send per second,
    /// shared equally among those open.
    pub frames_total: Option<u32>,
    /// Time a connection may go without a call open (see `idle.rs`).
    pub idle_timeout: Option<Duration>,
    /// Places in `budget`.
    pub size: usize,
}

impl ConnectionLimits {
    /// Limits with `max` connections at once.
    pub fn new(max: u64, first_bytes_timeout: Duration, handshake_timeout: Duration) -> Self {
        let size = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            budget: Arc::new(Semaphore::new(size)),
            size,
            first_bytes_timeout,
            handshake_timeout,
            hard_end_after: None,
            frames_per_sec: None,
            frames_total: None,
            idle_timeout: None,
        }
    }

    /// Each connection's share of the listener's control frames, if shared.
    pub fn frame_share(&self) -> Option<FrameShare> {
        self.frames_total.map(|total| FrameShare {
            total,
            budget: self.budget.clone(),
            size: self.size,
        })
    }

    /// The idle rule for this listener's connections, if it closes idle
    /// ones: under pressure, the first-bytes timeout applies.
    pub fn idle_rule(&self) -> Option<IdleRule> {
        self.idle_timeout.map(|timeout| IdleRule {
            timeout,
            pressed_timeout: self.first_bytes_timeout.min(timeout),
            budget: self.budget.clone(),
            size: self.size,
        })
    }
}

/// The fd limit is too low for the budgets asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the open-files limit ({limit}) cannot hold {wanted} connections plus {reserved} other \
     descriptors: lower --max-connections or raise the limit (ulimit -n, the container runtime)"
)]
pub struct FdLimitTooLow {
    /// The soft RLIMIT_NOFILE after raising it.
    pub limit: u64,
    /// Connections asked for (the gRPC budget; 0 when derived).
    pub wanted: u64,
    /// Descriptors needed besides the gRPC connections.
    pub reserved: u64,
}

/// Raises the soft open-files limit to the hard one (what a process may do
/// unprivileged) and returns the soft limit in force afterwards.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limit.current = limit.maximum,
            Err(error) => tracing::warn!(%error, "could not raise the open-files limit"),
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

/// The gRPC listener's budget: `wanted`, or when unset as many as the fd
/// `limit` leaves after `others` (the side listeners' budgets and the
/// Cognito connections), at most [`DEFAULT_MAX_CONNECTIONS`].
pub fn grpc_budget(limit: u64, wanted: Option<u64>, others: u64) -> Result<u64, FdLimitTooLow> {
    let reserved = RESERVED_FDS + others;
    let room = limit.saturating_sub(reserved);
    let too_low = |wanted| FdLimitTooLow {
        limit,
        wanted,
        reserved,
    };
    match wanted {
        Some(wanted) if wanted > room => Err(too_low(wanted)),
        Some(wanted) => Ok(wanted),
        // Fewer than a handful of clients is no service at all.
        None if room < 8 => Err(too_low(0)),
        None => Ok(room.min(DEFAULT_MAX_CONNECTIONS)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_what_the_fd_limit_leaves_at_most_the_default() {
        assert_eq!(grpc_budget(1 << 20, None, 200), Ok(DEFAULT_MAX_CONNECTIONS));
        assert_eq!(grpc_budget(1024, None, 200), Ok(1024 - 64 - 200));
        assert_eq!(grpc_budget(1024, Some(100), 200), Ok(100));
    }

    #[test]
    fn a_budget_the_fd_limit_cannot_hold_is_refused_with_the_numbers() {
        let error = grpc_budget(256, Some(500), 100).expect_err("too many");
        assert_eq!(error.reserved, 164);
        assert!(error.to_string().contains("(256)"), "{error}");
        assert!(grpc_budget(100, None, 40).is_err());
    }

    #[test]
    fn the_soft_fd_limit_is_raised_to_the_hard_one() {
        use rustix::process::{Resource, getrlimit};
        let after = raise_fd_limit();
        assert_eq!(
            Some(after),
            getrlimit(Resource::Nofile).maximum.or(Some(u64::MAX))
        );
    }
}
