//! The fleet's budget: one GCRA in Redis that every replica reserves from,
//! on Redis's clock, in one script call per request (`budget.lua`). The
//! script answers "your permit is in W" (and moves the cell on) or refuses
//! without writing; the request sleeps W here, so no replica polls.
//!
//! Redis trouble never stops sign-outs and never lets the full rate
//! through: on any failure this replica switches to its local budget at
//! the fallback rate for a cool-down, then one request tries Redis again.
//!
//! What differs from the local budget: a reserved slot is final. When
//! Cognito throttles, the script slows the slots it hands out from then on
//! (the outstanding ones are rescaled, so nothing bursts), but slots
//! already given keep their time.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus::{IntGaugeVec, Opts, Registry};
use redis::Script;
use tokio::{sync::Semaphore, time::Instant};

use super::{
    CallerCell, CallerCellName, CallerRateLimited, CallerRef, LocalBudget, RateLimitCause,
    RateLimited, Refusal, Reservation,
};
use crate::redis::{Redis, RedisCallError};

/// Sizing of the fleet's budget.
#[derive(Debug, Clone)]
pub struct SharedSettings {
    /// Permits per second for the whole fleet.
    pub rate_per_sec: f64,
    /// Permits at once after a quiet period, fleet-wide.
    pub burst: u32,
    /// Requests this replica lets wait for their slot at once.
    pub max_queue: usize,
    /// Longest a request waits for its slot.
    pub max_wait: Duration,
    /// Time in local mode after a Redis failure before Redis is tried again.
    pub cooldown: Duration,
    /// Prefix of every key; the keys share it as their hash tag.
    pub key_prefix: String,
}

/// Cheap to clone; clones share the connection and the mode.
#[derive(Debug, Clone)]
pub struct SharedBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    redis: Redis,
    script: Script,
    settings: SharedSettings,
    /// Places for requests sleeping until their slot (`--max-queue`).
    queue: Arc<Semaphore>,
    fallback: LocalBudget,
    mode: ModeSwitch,
    /// The fleet's rate as the script last reported it, in milli-permits/s.
    rate_milli: AtomicU64,
}

/// What the script was asked to do.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// A slot in the budget, and the caller's allowance if a cell is given.
    Reserve,
    /// Only the caller's allowance (a caller joining a queued sign-out).
    Caller,
    /// Cognito throttled: lower the fleet's rate.
    Throttled,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::Caller => "caller",
            Self::Throttled => "throttled",
        }
    }
}

/// The script's answer: `{granted, wait_us, cause, rate_milli}`.
type Answer = (i64, i64, String, i64);

impl SharedBudget {
    /// A budget on `redis`, falling back to `fallback`; registers
    /// `session_rate_limit_mode` in `registry`.
    pub fn new(
        redis: Redis,
        settings: SharedSettings,
        fallback: LocalBudget,
        registry: &Registry,
    ) -> Self {
        let mode = ModeSwitch::new(settings.cooldown, registry);
        let budget = Self {
            inner: Arc::new(Inner {
                redis,
                script: budget_script(),
                queue: Arc::new(Semaphore::new(settings.max_queue)),
                rate_milli: AtomicU64::new(milli(settings.rate_per_sec)),
                settings,
                fallback,
                mode,
            }),
        };
        // The mode says "shared" as soon as Redis is reachable, not only
        // after the first sign-out; the task holds no reference, so a
        // budget dropped before Redis comes up is not kept alive by it.
        let redis = budget.inner.redis.clone();
        let inner = Arc::downgrade(&budget.inner);
        tokio::spawn(async move {
            redis.wait_connected().await;
            if let Some(inner) = inner.upgrade() {
                inner.mode.connected();
            }
        });
        budget
    }

    /// A slot for a new sign-out: the caller's allowance (when given) and
    /// the fleet's budget, in one round trip.
    pub async fn reserve(
        &self,
        deadline: Instant,
        caller: Option<CallerRef<'_>>,
    ) -> Result<Reservation, Refusal> {
        let inner = &self.inner;
        let now = Instant::now();
        if !inner.mode.try_shared(now, inner.redis.is_connected()) {
            return inner.fallback.reserve(deadline, caller);
        }
        let latest = deadline.min(now + inner.settings.max_wait);
        // A full queue costs Redis nothing; a place is given back if the
        // permit comes at once.
        let Ok(place) = inner.queue.clone().try_acquire_owned() else {
            return Err(Refusal::Budget(RateLimited {
                retry_after: self.estimated_wait(),
                cause: RateLimitCause::QueueFull,
            }));
        };
        let cell = caller.and_then(|c| inner.fallback.callers().shared_cell(c.id, c.verified));
        let max_wait = latest.saturating_duration_since(now);
        let answer = match self.run(Op::Reserve, cell.as_ref(), max_wait).await {
            Ok(answer) => answer,
            Err(_) => return inner.fallback.reserve(deadline, caller),
        };
        let received = Instant::now();
        let (granted, wait_us, cause, _) = answer;
        let wait = Duration::from_micros(u64::try_from(wait_us).unwrap_or(0));
        match (granted, cause.as_str()) {
            // A slot is reserved at Redis's `now + wait`; counted from when
            // the answer arrived, it can only come late, never early.
            (1, _) if wait.is_zero() => Ok(Reservation::at_once(received, latest)),
            (1, _) => Ok(Reservation::timed(received + wait, latest, place)),
            (_, "caller") => Err(Refusal::Caller(CallerRateLimited { retry_after: wait })),
            _ => Err(Refusal::Budget(RateLimited {
                retry_after: wait.max(self.interval()),
                cause: RateLimitCause::WouldWaitTooLong,
            })),
        }
    }

    /// Takes one request from the caller's fleet-wide allowance.
    pub async fn charge_caller(&self, caller: CallerRef<'_>) -> Result<(), CallerRateLimited> {
        let inner = &self.inner;
        let Some(cell) = inner
            .fallback
            .callers()
            .shared_cell(caller.id, caller.verified)
        else {
            return Ok(());
        };
        if !inner
            .mode
            .try_shared(Instant::now(), inner.redis.is_connected())
        {
            return inner.fallback.charge_caller(caller);
        }
        match self.run(Op::Caller, Some(&cell), Duration::ZERO).await {
            Err(_) => inner.fallback.charge_caller(caller),
            Ok((1, ..)) => Ok(()),
            Ok((_, wait_us, ..)) => Err(CallerRateLimited {
                retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
            }),
        }
    }

    /// Cognito said TooManyRequests: slow the whole fleet (and the fallback,
    /// in case Redis goes away during the episode). Does not wait.
    pub fn on_throttled(&self) {
        self.inner.fallback.on_throttled();
        if !self.inner.redis.is_connected() {
            return;
        }
        let budget = self.clone();
        tokio::spawn(async move {
            if let Ok((1, _, _, rate_milli)) = budget.run(Op::Throttled, None, Duration::ZERO).await
            {
                tracing::warn!(
                    rate_per_sec = rate_milli as f64 / 1000.0,
                    "Cognito is throttling: the fleet's budget lowered"
                );
            }
        });
    }

    /// Permits per second now: the fleet's, or the fallback's when local.
    pub fn current_rate(&self) -> f64 {
        if self.inner.mode.is_shared() {
            self.inner.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0
        } else {
            self.inner.fallback.current_rate()
        }
    }

    /// Requests of this replica waiting for a slot, in either mode.
    pub fn queue_depth(&self) -> usize {
        let waiting = self.inner.settings.max_queue - self.inner.queue.available_permits();
        waiting + self.inner.fallback.queue_depth()
    }

    /// A retry-after for refusals made without asking Redis: one interval
    /// at the fleet's rate, or the fallback's estimate when local.
    pub fn estimated_wait(&self) -> Duration {
        if self.inner.mode.is_shared() {
            self.interval()
        } else {
            self.inner.fallback.estimated_wait()
        }
    }

    fn interval(&self) -> Duration {
        let rate = self.inner.rate_milli.load(Ordering::Relaxed).max(1) as f64 / 1000.0;
        Duration::from_secs_f64(1.0 / rate)
    }

    /// One script call; a failure switches this replica to local mode.
    async fn run(
        &self,
        op: Op,
        cell: Option<&CallerCell>,
        max_wait: Duration,
    ) -> Result<Answer, RedisCallError> {
        let inner = &self.inner;
        let settings = &inner.settings;
        let prefix = &settings.key_prefix;
        let mut invocation = inner.script.prepare_invoke();
        invocation
            .key(format!("{{{prefix}}}:budget"))
            .key(format!("{{{prefix}}}:throttle"));
        if let Some(cell) = cell {
            invocation.key(match &cell.name {
                CallerCellName::Own(id) => format!("{{{prefix}}}:caller:{}", id.as_str()),
                CallerCellName::Unverified => format!("{{{prefix}}}:unverified"),
            });
        }
        invocation
            .arg(op.as_str())
            .arg(settings.rate_per_sec)
            .arg(settings.burst)
            .arg(u64::try_from(max_wait.as_micros()).unwrap_or(u64::MAX))
            .arg(cell.map_or(1.0, |c| c.rate_per_sec))
            .arg(cell.map_or(1, |c| c.burst));
        match inner
            .redis
            .run_script::<Answer>(op.as_str(), &invocation)
            .await
        {
            Ok(answer) => {
                inner.mode.shared_works();
                if answer.3 > 0 {
                    inner.rate_milli.store(answer.3 as u64, Ordering::Relaxed);
                }
                Ok(answer)
            }
            Err(error) => {
                inner
                    .mode
                    .failed(Instant::now(), &error, inner.fallback.current_rate());
                Err(error)
            }
        }
    }
}

/// The budget's script, for [`Redis::connect`] to load up front.
pub fn budget_script() -> Script {
    Script::new(include_str!("budget.lua"))
}

fn milli(rate: f64) -> u64 {
    (rate * 1000.0) as u64
}

/// Shared or local, and when local, when Redis may be tried again.
#[derive(Debug)]
struct ModeSwitch {
    state: Mutex<Mode>,
    cooldown: Duration,
    gauge: IntGaugeVec,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// No answer from Redis yet: local until connected, then every request
    /// asks Redis (none leaks into the fallback while the first is asked).
    Starting,
    Shared,
    /// Until `retry_at`; then one request tries Redis again.
    Local {
        retry_at: Instant,
    },
}

impl ModeSwitch {
    fn new(cooldown: Duration, registry: &Registry) -> Self {
        let gauge = mode_gauge(registry);
        gauge.with_label_values(&["shared"]).set(0);
        gauge.with_label_values(&["local"]).set(1);
        Self {
            state: Mutex::new(Mode::Starting),
            cooldown,
            gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mode> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_shared(&self) -> bool {
        matches!(*self.lock(), Mode::Shared)
    }

    /// Whether this request should ask Redis. In local mode, once the
    /// cool-down is over, exactly one request does (the others stay local
    /// for another cool-down unless it succeeds), so a hung Redis costs one
    /// request a timeout per cool-down, not every request.
    fn try_shared(&self, now: Instant, connected: bool) -> bool {
        let mut mode = self.lock();
        match *mode {
            Mode::Shared => true,
            Mode::Starting => connected,
            Mode::Local { retry_at } if connected && now >= retry_at => {
                *mode = Mode::Local {
                    retry_at: now + self.cooldown,
                };
                true
            }
            Mode::Local { .. } => false,
        }
    }

    /// The first connection was made: shared, unless a call already
    /// failed meanwhile (then the cool-down decides).
    fn connected(&self) {
        let mut mode = self.lock();
        if matches!(*mode, Mode::Starting) {
            self.become_shared(&mut mode);
        }
    }

    fn shared_works(&self) {
        let mut mode = self.lock();
        if !matches!(*mode, Mode::Shared) {
            self.become_shared(&mut mode);
        }
    }

    fn become_shared(&self, mode: &mut Mode) {
        *mode = Mode::Shared;
        self.gauge.with_label_values(&["shared"]).set(1);
        self.gauge.with_label_values(&["local"]).set(0);
        tracing::info!("rate budget: shared (Redis)");
    }

    fn failed(&self, now: Instant, error: &RedisCallError, fallback_rate: f64) {
        let mut mode = self.lock();
        let was_shared = matches!(*mode, Mode::Shared);
        *mode = Mode::Local {
            retry_at: now + self.cooldown,
        };
        if was_shared {
            self.gauge.with_label_values(&["shared"]).set(0);
            self.gauge.with_label_values(&["local"]).set(1);
            tracing::warn!(
                %error,
                kind = error.kind(),
                fallback_rate_per_sec = fallback_rate,
                cooldown = ?self.cooldown,
                "rate budget: Redis unavailable, local fallback"
            );
        }
    }
}

/// `session_rate_limit_mode{mode}`: 1 for the mode in force, 0 for the
/// other. Registered once per registry.
pub fn mode_gauge(registry: &Registry) -> IntGaugeVec {
    let gauge = IntGaugeVec::new(
        Opts::new(
            "session_rate_limit_mode",
            "1 for the Cognito budget's mode in force: shared (the fleet's, in Redis) or local (this process's own).",
        ),
        &["mode"],
    )
    .expect("valid gauge");
    let _ = registry.register(Box::new(gauge.clone()));
    gauge
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(switch: &ModeSwitch) -> (i64, i64) {
        let value = |mode| switch.gauge.with_label_values(&[mode]).get();
        (value("shared"), value("local"))
    }

    #[test]
    fn local_until_connected_then_one_probe_per_cooldown_after_a_failure() {
        let switch = ModeSwitch::new(Duration::from_secs(5), &Registry::new());
        let start = Instant::now();
        assert!(!switch.try_shared(start, false), "local while connecting");
        assert_eq!(gauge(&switch), (0, 1));
        switch.connected();
        assert!(switch.try_shared(start, true));
        assert_eq!(gauge(&switch), (1, 0), "shared once connected");

        switch.failed(start, &RedisCallError::NotConnected, 1.0);
        assert_eq!(gauge(&switch), (0, 1));
        let before = start + Duration::from_millis(4_999);
        assert!(!switch.try_shared(before, true), "local for the cool-down");
        let after = start + Duration::from_secs(5);
        assert!(switch.try_shared(after, true), "one request probes");
        assert!(
            !switch.try_shared(after, true),
            "the others stay local while it does"
        );
        switch.failed(after, &RedisCallError::NotConnected, 1.0);
        assert!(!switch.try_shared(after + Duration::from_millis(4_999), true));
        let again = after + Duration::from_secs(5);
        assert!(switch.try_shared(again, true), "the next probe");
        switch.shared_works();
        assert!(switch.try_shared(again, true) && switch.try_shared(again, true));
        assert_eq!(gauge(&switch), (1, 0));
    }

    #[test]
    fn a_failure_before_the_connection_is_announced_keeps_the_cooldown() {
        let switch = ModeSwitch::new(Duration::from_secs(5), &Registry::new());
        let start = Instant::now();
        switch.failed(start, &RedisCallError::NotConnected, 1.0);
        switch.connected();
        assert!(
            !switch.try_shared(start, true),
            "a late announcement does not cut the cool-down short"
        );
        assert_eq!(gauge(&switch), (0, 1));
    }
}
