//! Revocation watermarks: a sign-out through this service revokes, at
//! once, every token of that user signed in before it, for everyone who
//! verifies through the service (VerifyToken) or watches it
//! (WatchRevocations), even while Cognito throttles the sign-out itself.
//!
//! [`watermarks`] is the map every check reads, in memory. With Redis,
//! [`store`] keeps each watermark and a log of them, and [`tail`] follows
//! the log into the map, so every replica holds every watermark and a check
//! never leaves the process. Without Redis the map is all there is.
//! [`watch`] streams the map, then the log, to resource servers.

pub mod cursor;
mod metrics;
mod store;
mod tail;
mod watch;
pub mod watermarks;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use tokio::{
    sync::{Semaphore, watch as state},
    time::Instant,
};
use tokio_util::{
    sync::CancellationToken,
    task::{AbortOnDropHandle, TaskTracker},
};

use self::{cursor::Epoch, store::RedisLog, watermarks::Watermarks};
pub use self::{
    cursor::{BadCursor, Cursor, Position},
    metrics::RevocationMetrics,
    store::scripts,
    watch::{WatchEnd, WatchRefused, Watched},
    watermarks::Revocation,
};
use crate::{domain::UserPoolId, redis::Redis};

/// How often expired watermarks are dropped from memory.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The revocation flags, resolved.
#[derive(Debug, Clone)]
pub struct RevocationSettings {
    /// Added to the clock when a watermark is taken, so that a token signed
    /// in a moment before the sign-out, on a host whose clock is behind,
    /// is still revoked.
    pub skew: Duration,
    /// The longest token lifetime: a watermark is kept this long (plus the
    /// skew), by when every token it revokes has expired.
    pub ttl: Duration,
    /// WatchRevocations streams open at once, at most.
    pub max_watchers: usize,
}

impl RevocationSettings {
    fn keep_secs(&self) -> i64 {
        secs(self.ttl + self.skew)
    }
}

/// One per process; cheap to clone. Dropping the last clone stops its
/// background tasks.
#[derive(Debug, Clone)]
pub struct Revocations {
    shared: Arc<Shared>,
    _tasks: Arc<[AbortOnDropHandle<()>]>,
    /// Writes to Redis still under way, awaited by [`Revocations::flush`].
    writes: TaskTracker,
}

/// What the handlers and the background tasks share.
#[derive(Debug)]
struct Shared {
    watermarks: Watermarks,
    settings: RevocationSettings,
    log: Option<RedisLog>,
    /// The log's epoch as this replica knows it; `None` until Redis first
    /// answers.
    epoch: ArcSwapOption<Epoch>,
    /// Watermarks recorded here that Redis has not confirmed, the highest
    /// per user: bounded by the users signed out during an outage, not by
    /// their sign-outs.
    pending: Mutex<HashMap<(UserPoolId, String), i64>>,
    /// In memory-only mode, the last position given out.
    last_position: Mutex<Position>,
    /// True while the map holds the whole log.
    caught_up: state::Sender<bool>,
    /// False from a failed Redis call until the follower's next successful
    /// read: meanwhile sign-outs hold their watermark here at once rather
    /// than each wait out `--redis-timeout` (the follower writes them).
    log_healthy: AtomicBool,
    metrics: RevocationMetrics,
    watchers: Arc<Semaphore>,
    /// Bounds the snapshots in memory at once (each copies part of the
    /// map): held while one is built and sent.
    snapshots: Semaphore,
    /// Cancelled when the server drains: watch streams end.
    closing: CancellationToken,
}

impl Revocations {
    /// Watermarks in this process only: lost at restart, not seen by other
    /// replicas.
    pub fn in_memory(settings: RevocationSettings, metrics: RevocationMetrics) -> Self {
        let shared = Shared::new(settings, None, metrics);
        shared.epoch.store(Some(Arc::new(Epoch::random())));
        shared.caught_up.send_replace(true);
        shared.metrics.caught_up.set(1);
        let shared = Arc::new(shared);
        let sweep = tokio::spawn(sweep(Arc::downgrade(&shared)));
        Self {
            _tasks: Arc::new([AbortOnDropHandle::new(sweep)]),
            shared,
            writes: TaskTracker::new(),
        }
    }

    /// Watermarks in Redis under `prefix`, followed into memory by a task
    /// of their own. `reconnect_every` paces the retries while Redis fails.
    pub fn with_redis(
        settings: RevocationSettings,
        redis: Redis,
        prefix: &str,
        reconnect_every: Duration,
        metrics: RevocationMetrics,
    ) -> Self {
        let log = RedisLog::new(redis, prefix, settings.keep_secs());
        let shared = Arc::new(Shared::new(settings, Some(log.clone()), metrics));
        let follow = tokio::spawn(tail::follow(Arc::downgrade(&shared), log, reconnect_every));
        let sweep = tokio::spawn(sweep(Arc::downgrade(&shared)));
        Self {
            _tasks: Arc::new([
                AbortOnDropHandle::new(follow),
                AbortOnDropHandle::new(sweep),
            ]),
            shared,
            writes: TaskTracker::new(),
        }
    }

    /// Records that every token of `sub` in `pool` signed in until now
    /// (plus the skew) is revoked: in this replica's memory before it
    /// returns (VerifyToken here sees it at once); in the log once
    /// [`Recorded::logged`] has run. Never fails: a write Redis does not
    /// confirm is held and retried by the log's follower.
    pub fn record(&self, pool: &UserPoolId, sub: &str) -> Recorded {
        let shared = &self.shared;
        let revoked_before = now_secs().saturating_add(secs(shared.settings.skew));
        shared.watermarks.raise(pool, sub, revoked_before);
        shared.metrics.live.set(shared.watermarks.len());
        if shared.log.is_none() {
            shared.log_in_memory(pool, sub, revoked_before);
            shared.count_recorded("memory_only");
        }
        Recorded {
            revoked_before,
            pending: shared.log.is_some().then(|| Pending {
                shared: shared.clone(),
                pool: pool.clone(),
                sub: sub.to_owned(),
            }),
        }
    }

    /// True when a token of `sub` in `pool` signed in at `auth_time` was
    /// revoked; counted in `session_revocation_checks_total`.
    pub fn is_revoked(&self, pool: &UserPoolId, sub: &str, auth_time: i64) -> bool {
        let revoked = self.shared.watermarks.is_revoked(pool, sub, auth_time);
        let metrics = &self.shared.metrics;
        if revoked {
            metrics.checks_revoked.inc();
        } else {
            metrics.checks_clear.inc();
        }
        revoked
    }

    /// Turns true once the map holds the whole log (at once in memory-only
    /// mode).
    pub fn caught_up(&self) -> state::Receiver<bool> {
        self.shared.caught_up.subscribe()
    }

    /// True while the log is still arriving: the follower's reads succeed
    /// but it has not caught up. False once caught up, and while Redis
    /// fails (nothing is arriving then).
    pub fn loading(&self) -> bool {
        self.shared.log.is_some()
            && self.shared.log_healthy.load(Ordering::Acquire)
            && !*self.shared.caught_up.borrow()
    }

    /// Runs [`Recorded::logged`] in a task of its own that
    /// [`Revocations::flush`] waits for at shutdown.
    pub fn log_in_background(&self, recorded: Recorded) {
        self.writes.spawn(recorded.logged());
    }

    /// At shutdown: waits, until `deadline`, for the writes started by
    /// [`Revocations::log_in_background`], then tries once to write the
    /// watermarks Redis has not confirmed. What is still not written is
    /// lost for the other replicas, and logged as an error.
    pub async fn flush(&self, deadline: Instant) {
        self.writes.close();
        if tokio::time::timeout_at(deadline, self.writes.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                writes = self.writes.len(),
                "revocation writes to Redis still under way at shutdown"
            );
        }
        let Some(log) = &self.shared.log else {
            return;
        };
        let pending = self.shared.take_pending();
        if pending.is_empty() {
            return;
        }
        let written = match self.shared.epoch.load_full() {
            // One try, given at least one `--redis-timeout` even when the
            // grace is spent: these are lost for the fleet otherwise.
            Some(epoch) => {
                let until = deadline.max(Instant::now() + log.redis().timeout());
                matches!(
                    tokio::time::timeout_at(until, log.record_many(&epoch, &pending)).await,
                    Ok(Ok(_))
                )
            }
            None => false,
        };
        if written {
            self.shared.metrics.pending.set(0);
        } else {
            tracing::error!(
                lost = pending.len(),
                "revocation watermarks not written to Redis before exit: other replicas \
                 (and those started later) do not revoke these users' tokens"
            );
        }
    }

    /// Watermarks held in memory now.
    pub fn len(&self) -> i64 {
        self.shared.watermarks.len()
    }

    /// True when none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every watch stream (the server is draining; clients reconnect
    /// elsewhere with their cursor) and refuses new ones.
    pub fn close_watchers(&self) {
        self.shared.closing.cancel();
    }
}

/// A watermark recorded here; [`Recorded::logged`] writes it to Redis.
#[derive(Debug)]
#[must_use = "the watermark reaches other replicas only once logged"]
pub struct Recorded {
    /// Tokens signed in at or before this (seconds) are revoked.
    pub revoked_before: i64,
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    shared: Arc<Shared>,
    pool: UserPoolId,
    sub: String,
}

impl Recorded {
    /// Writes the watermark to the Redis log (nothing to do in memory-only
    /// mode), bounded by `--redis-timeout`; while Redis fails, it is held
    /// for the follower to write instead. Returns the watermark.
    pub async fn logged(self) -> i64 {
        let revoked_before = self.revoked_before;
        let Some(Pending { shared, pool, sub }) = self.pending else {
            return revoked_before;
        };
        let Some(log) = &shared.log else {
            return revoked_before;
        };
        let epoch = shared.epoch.load_full();
        let outcome = match epoch {
            Some(epoch) if shared.log_healthy.load(Ordering::Acquire) => {
                Some(log.record(&epoch, &pool, &sub, revoked_before).await)
            }
            _ => None,
        };
        match outcome {
            Some(Ok(store::Logged::Raised(_))) => shared.count_recorded("logged"),
            Some(Ok(store::Logged::Kept)) => shared.count_recorded("already_logged"),
            failed => {
                if let Some(Err(error)) = &failed {
                    tracing::warn!(%error, "revocation not written to Redis; held here and retried");
                }
                shared.log_healthy.store(false, Ordering::Release);
                shared.hold(&pool, &sub, revoked_before);
                shared.count_recorded("pending");
            }
        }
        revoked_before
    }
}

impl Shared {
    fn new(
        settings: RevocationSettings,
        log: Option<RedisLog>,
        metrics: RevocationMetrics,
    ) -> Self {
        Self {
            watermarks: Watermarks::new(settings.keep_secs()),
            watchers: Arc::new(Semaphore::new(settings.max_watchers)),
            settings,
            log,
            epoch: ArcSwapOption::empty(),
            pending: Mutex::default(),
            last_position: Mutex::default(),
            caught_up: state::Sender::new(false),
            log_healthy: AtomicBool::new(false),
            metrics,
            snapshots: Semaphore::new(2),
            closing: CancellationToken::new(),
        }
    }

    /// Memory-only mode: the map is the log. Positions are given out and
    /// applied under one lock, so watchers get them in order.
    fn log_in_memory(&self, pool: &UserPoolId, sub: &str, revoked_before: i64) {
        let mut last = self
            .last_position
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *last = last.next(now_millis());
        self.watermarks.apply_logged(Revocation {
            pool: pool.clone(),
            sub: sub.to_owned(),
            revoked_before,
            position: *last,
        });
    }

    fn hold(&self, pool: &UserPoolId, sub: &str, revoked_before: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let held = pending
            .entry((pool.clone(), sub.to_owned()))
            .or_insert(revoked_before);
        *held = (*held).max(revoked_before);
        self.metrics
            .pending
            .set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
    }

    /// Takes the held watermarks, less those already expired (they revoke
    /// nothing any more).
    fn take_pending(&self) -> Vec<(UserPoolId, String, i64)> {
        let pending =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        let now = now_secs();
        pending
            .into_iter()
            .filter(|(_, before)| self.watermarks.expires_at(*before) > now)
            .map(|((pool, sub), before)| (pool, sub, before))
            .collect()
    }

    fn count_recorded(&self, result: &str) {
        self.metrics.recorded.with_label_values(&[result]).inc();
    }
}

/// Drops expired watermarks now and then.
async fn sweep(shared: std::sync::Weak<Shared>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let removed = shared.watermarks.sweep(now_secs());
        shared.metrics.live.set(shared.watermarks.len());
        if removed > 0 {
            tracing::debug!(removed, "expired revocation watermarks dropped");
        }
    }
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, secs)
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod redis_tests;
