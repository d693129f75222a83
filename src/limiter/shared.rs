//! The fleet's budget: one GCRA in Redis that every replica reserves from,
//! on Redis's clock, in one script call per request (`budget.lua`). The
//! script answers "your permit is in W" (and moves the cell on) or refuses
//! without writing; the request sleeps W here, so no replica polls.
//!
//! Redis trouble never stops sign-outs and never lets the full rate
//! through: on any failure this replica switches to its local budget at
//! the fallback rate, and a background probe after each cool-down decides
//! when it goes back (requests never probe a Redis that just failed).
//!
//! What differs from the local budget: a reserved slot is final. When
//! Cognito throttles, the script slows the slots it hands out from then on
//! (the outstanding ones are rescaled, so nothing bursts), but slots
//! already given keep their time.

use std::{
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus::{IntGaugeVec, Opts, Registry};
use redis::{Script, ScriptInvocation};
use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};

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
    /// Whether the script runs (after a failure); writes nothing.
    Probe,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::Caller => "caller",
            Self::Throttled => "throttled",
            Self::Probe => "probe",
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
        tokio::spawn(watch_redis(
            budget.inner.redis.connected_watch(),
            Arc::downgrade(&budget.inner),
        ));
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
        if !inner.mode.try_shared(inner.redis.is_connected()) {
            return inner.fallback.reserve(deadline, caller);
        }
        let latest = deadline.min(now + inner.settings.max_wait);
        // A place in the queue lets the request wait for a later slot;
        // without one (the queue is full, or --max-queue is 0) it may still
        // take a slot free now, and the script's refusal says when one
        // comes. A place is given back if the slot is now.
        let place = inner.queue.clone().try_acquire_owned().ok();
        let max_wait = match place {
            Some(_) => latest.saturating_duration_since(now),
            None => Duration::ZERO,
        };
        let cell = caller.and_then(|c| inner.fallback.callers().shared_cell(c.id, c.verified));
        let answer = match self.run(Op::Reserve, cell.as_ref(), max_wait).await {
            Ok(answer) => answer,
            Err(_) => return inner.fallback.reserve(deadline, caller),
        };
        let received = Instant::now();
        let (granted, wait_us, cause, _) = answer;
        let wait = Duration::from_micros(u64::try_from(wait_us).unwrap_or(0));
        match (granted, cause.as_str(), place) {
            // A slot is reserved at Redis's `now + wait`; counted from when
            // the answer arrived, it can only come late, never early.
            (1, _, Some(place)) if !wait.is_zero() => {
                Ok(Reservation::timed(received + wait, latest, place))
            }
            // Asked with no wait allowed, a granted slot is now.
            (1, ..) => Ok(Reservation::at_once(received, latest)),
            (_, "caller", _) => Err(Refusal::Caller(CallerRateLimited { retry_after: wait })),
            (_, _, place) => Err(Refusal::Budget(RateLimited {
                retry_after: wait.max(self.interval()),
                cause: match place {
                    Some(_) => RateLimitCause::WouldWaitTooLong,
                    None => RateLimitCause::QueueFull,
                },
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
        if !inner.mode.try_shared(inner.redis.is_connected()) {
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
        // While local, Redis is the probe's to ask: a throttle call failing
        // on a dead connection would push the probe back for ever.
        if !self.inner.mode.is_shared() {
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

    /// Whether requests now reserve in Redis (not the local fallback).
    pub fn is_shared(&self) -> bool {
        self.inner.mode.is_shared()
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

    /// One script call; a failure switches this replica to local mode. A
    /// success changes no mode: an answer that comes after a failure must
    /// not cut the cool-down short (only the probe ends it).
    async fn run(
        &self,
        op: Op,
        cell: Option<&CallerCell>,
        max_wait: Duration,
    ) -> Result<Answer, RedisCallError> {
        let inner = &self.inner;
        let invocation = inner.invocation(op, cell, max_wait);
        let generation = inner.redis.generation();
        let answer = inner
            .redis
            .run_script::<Answer>(op.as_str(), &invocation)
            .await;
        // A failure of a connection a probe has replaced meanwhile says
        // nothing about Redis now.
        if answer.is_ok() || inner.redis.generation() == generation {
            inner.note(&answer);
        }
        answer
    }
}

impl Inner {
    /// The script call for `op`: keys under one hash tag, then the
    /// arguments `budget.lua` documents.
    fn invocation(
        &self,
        op: Op,
        cell: Option<&CallerCell>,
        max_wait: Duration,
    ) -> ScriptInvocation<'_> {
        let settings = &self.settings;
        let prefix = &settings.key_prefix;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(format!("{{{prefix}}}:budget"))
            .key(format!("{{{prefix}}}:throttle"));
        if let Op::Probe = op {
            invocation.key(format!("{{{prefix}}}:probe"));
        }
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
        invocation
    }

    /// Keeps the fleet's rate from an answer; a failure makes this replica
    /// local for a cool-down.
    fn note(&self, answer: &Result<Answer, RedisCallError>) {
        match answer {
            Ok((.., rate_milli)) if *rate_milli > 0 => {
                self.rate_milli.store(*rate_milli as u64, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(error) => self
                .mode
                .failed(Instant::now(), error, self.fallback.current_rate()),
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

/// Marks the budget shared once Redis is first reached, then, whenever a
/// call failed, probes Redis after each cool-down (see [`probe`]) and marks
/// it shared again when the script runs. Requests never probe: a hung Redis costs
/// one request per replica a timeout, not one per cool-down. Holds no
/// reference to the budget while it waits.
async fn watch_redis(mut connected: watch::Receiver<bool>, budget: Weak<Inner>) {
    if connected.wait_for(|connected| *connected).await.is_err() {
        return; // the client is gone
    }
    let Some(mut modes) = budget.upgrade().map(|inner| {
        inner.mode.connected();
        inner.mode.state.subscribe()
    }) else {
        return;
    };
    loop {
        let retry_at = match modes
            .wait_for(|mode| matches!(mode, Mode::Local { .. }))
            .await
        {
            Ok(mode) => match *mode {
                Mode::Local { retry_at } => retry_at,
                _ => unreachable!("waited for local"),
            },
            Err(_) => return, // the budget is gone
        };
        tokio::time::sleep_until(retry_at).await;
        let Some(inner) = budget.upgrade() else {
            return;
        };
        if !inner.mode.due(Instant::now()) {
            continue; // shared again, or a later failure moved the probe
        }
        match probe(&inner).await {
            Ok(()) => inner.mode.shared_works(),
            // Every failure, a connection refused as much as a script
            // error, waits a whole cool-down for the next probe.
            Err(error) => inner
                .mode
                .failed(Instant::now(), &error, inner.fallback.current_rate()),
        }
    }
}

/// Whether Redis works again: on a connection of its own (a new DNS lookup
/// and socket, so a connection that died without a reset, or a primary
/// that moved, is not asked again), the budget script itself in a mode that
/// writes only a key of its own (a PING, or a script that only reads, would
/// pass where a reservation fails: out of memory, a read-only replica).
/// When it runs, every call uses that connection from then on.
async fn probe(inner: &Inner) -> Result<(), RedisCallError> {
    let connection = inner.redis.connect_anew().await?;
    let invocation = inner.invocation(Op::Probe, None, Duration::ZERO);
    let (.., rate_milli) = inner
        .redis
        .run_script_on::<Answer>(&connection, Op::Probe.as_str(), &invocation)
        .await?;
    inner.note(&Ok((1, 0, String::new(), rate_milli)));
    inner.redis.adopt(connection);
    Ok(())
}

/// Shared or local, and when local, when Redis is probed again.
#[derive(Debug)]
struct ModeSwitch {
    state: watch::Sender<Mode>,
    cooldown: Duration,
    gauge: IntGaugeVec,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Not connected yet: local until connected, then every request asks
    /// Redis (none leaks into the fallback while the first is asked).
    Starting,
    Shared,
    /// Until Redis answers a probe, made at `retry_at`.
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
            state: watch::Sender::new(Mode::Starting),
            cooldown,
            gauge,
        }
    }

    fn is_shared(&self) -> bool {
        matches!(*self.state.borrow(), Mode::Shared)
    }

    /// Whether this request should ask Redis.
    fn try_shared(&self, connected: bool) -> bool {
        match *self.state.borrow() {
            Mode::Shared => true,
            Mode::Starting => connected,
            Mode::Local { .. } => false,
        }
    }

    /// Local, and the cool-down is over: time to probe.
    fn due(&self, now: Instant) -> bool {
        matches!(*self.state.borrow(), Mode::Local { retry_at } if now >= retry_at)
    }

    /// The first connection was made: shared, unless a call already
    /// failed meanwhile (then the probe decides).
    fn connected(&self) {
        self.state.send_if_modified(|mode| {
            let starting = matches!(mode, Mode::Starting);
            if starting {
                self.become_shared(mode);
            }
            starting
        });
    }

    fn shared_works(&self) {
        self.state.send_if_modified(|mode| {
            let changed = !matches!(mode, Mode::Shared);
            if changed {
                self.become_shared(mode);
            }
            changed
        });
    }

    fn become_shared(&self, mode: &mut Mode) {
        *mode = Mode::Shared;
        self.gauge.with_label_values(&["shared"]).set(1);
        self.gauge.with_label_values(&["local"]).set(0);
        tracing::info!("rate budget: shared (Redis)");
    }

    /// A call or a probe failed: local for a cool-down. Logged only when
    /// it ends the shared mode, so an outage is one line, not one a probe.
    fn failed(&self, now: Instant, error: &RedisCallError, fallback_rate: f64) {
        self.state.send_modify(|mode| {
            let was_shared = matches!(mode, Mode::Shared);
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
        });
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
    fn local_until_connected_and_after_a_failure_until_a_probe_answers() {
        let switch = ModeSwitch::new(Duration::from_secs(5), &Registry::new());
        let start = Instant::now();
        assert!(!switch.try_shared(false), "local while connecting");
        assert_eq!(gauge(&switch), (0, 1));
        switch.connected();
        assert!(switch.try_shared(true));
        assert_eq!(gauge(&switch), (1, 0), "shared once connected");

        switch.failed(start, &RedisCallError::NotConnected, 1.0);
        assert_eq!(gauge(&switch), (0, 1));
        assert!(!switch.try_shared(true), "requests never probe");
        assert!(!switch.due(start + Duration::from_millis(4_999)));
        let after = start + Duration::from_secs(5);
        assert!(switch.due(after), "the probe is due after the cool-down");
        switch.failed(after, &RedisCallError::NotConnected, 1.0);
        assert!(
            !switch.due(after + Duration::from_millis(4_999)),
            "a failed probe waits again"
        );
        assert!(!switch.try_shared(true));
        switch.shared_works();
        assert!(switch.try_shared(true) && !switch.due(after + Duration::from_secs(60)));
        assert_eq!(gauge(&switch), (1, 0));
    }

    #[test]
    fn a_failure_before_the_connection_is_announced_keeps_the_cooldown() {
        let switch = ModeSwitch::new(Duration::from_secs(5), &Registry::new());
        let start = Instant::now();
        switch.failed(start, &RedisCallError::NotConnected, 1.0);
        switch.connected();
        assert!(
            !switch.try_shared(true),
            "a late announcement does not cut the cool-down short"
        );
        assert_eq!(gauge(&switch), (0, 1));
    }
}
