//! The process-wide budget of calls to Cognito: a GCRA with a bounded FIFO
//! queue in front of it. A request waits only if its permit will come before
//! its deadline; otherwise it is refused at once, told when to come back.
//!
//! A request first *reserves* (at once: granted, queued with the slot it is
//! expected at, or refused), then awaits its permit. The dispatcher, not the
//! waiter's own timer, decides whether a permit still fits a waiter's
//! deadline, so a waiter whose deadline falls in its slot's timer tick gets
//! the permit instead of racing it.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, OwnedSemaphorePermit, oneshot},
    time::Instant,
};
use tokio_util::task::AbortOnDropHandle;

use super::gcra::Gcra;

/// How far one TooManyRequestsException slows the budget, and how it recovers.
const THROTTLE_FACTOR: f64 = 0.5;
/// The budget never drops below this share of the configured rate.
const THROTTLE_FLOOR: f64 = 0.1;
/// Throttles closer together than this count once (they are one episode).
const THROTTLE_COOLDOWN: Duration = Duration::from_secs(1);
/// Each second without throttling gives back this share of the configured rate.
const RECOVERY_PER_SECOND: f64 = 0.1;

/// Sizing of the budget.
#[derive(Debug, Clone, Copy)]
pub struct BudgetSettings {
    /// Permits per second to Cognito.
    pub rate_per_sec: f64,
    /// Permits that may be taken at once after a quiet period.
    pub burst: u32,
    /// Requests that may wait for a permit at once.
    pub max_queue: usize,
    /// Longest a request may wait, whatever its deadline.
    pub max_wait: Duration,
}

/// Why no permit was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitCause {
    /// The queue already holds `max_queue` requests.
    QueueFull,
    /// The permit would come after the request's deadline or `max_wait`.
    WouldWaitTooLong,
}

/// No permit; come back after `retry_after` (the earliest a permit could be
/// had, given the requests already queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("upstream rate budget exhausted ({cause:?}); retry after {retry_after:?}")]
pub struct RateLimited {
    /// Earliest time from now a permit could be had.
    pub retry_after: Duration,
    /// Why the request was refused.
    pub cause: RateLimitCause,
}

/// Cheap to clone; all clones share one budget.
#[derive(Debug, Clone)]
pub struct UpstreamBudget {
    shared: Arc<Shared>,
    _dispatcher: Arc<AbortOnDropHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Notify,
    settings: BudgetSettings,
    /// Origin of the deadlines waiters keep as microseconds.
    epoch: Instant,
}

#[derive(Debug)]
struct State {
    gcra: Gcra,
    /// Waiters in arrival order; a closed sender is a waiter that gave up.
    queue: VecDeque<Waiter>,
    /// Waiters still waiting (the queue may hold some that gave up).
    waiting: usize,
    /// The last slow-down, if any: the rate is derived from it.
    throttled: Option<Throttled>,
}

#[derive(Debug)]
struct Waiter {
    grant: oneshot::Sender<Result<(), RateLimited>>,
    latest: ReservationDeadline,
}

/// A slow-down: the rate it set and when.
#[derive(Debug, Clone, Copy)]
struct Throttled {
    rate: f64,
    at: Instant,
}

/// A place in the budget: a permit granted at once, or a place in the queue
/// with the slot it is expected at. Dropping it gives the place up (a
/// permit granted at once is spent all the same).
#[derive(Debug)]
pub struct Reservation {
    eta: Instant,
    latest: ReservationDeadline,
    place: Place,
}

#[derive(Debug)]
enum Place {
    Granted,
    Queued {
        granted: oneshot::Receiver<Result<(), RateLimited>>,
        _leave: LeaveQueue,
    },
    /// A slot the fleet's budget gave (see `shared.rs`): the permit is the
    /// instant itself, and the place in the queue is held until then.
    Timed {
        _queue: OwnedSemaphorePermit,
    },
}

/// The latest a queued permit may come; a coalesced job moves it out as
/// callers with later deadlines join. Never beyond the reservation's
/// `max_wait`.
#[derive(Debug, Clone)]
pub struct ReservationDeadline(Arc<DeadlineCell>);

#[derive(Debug)]
struct DeadlineCell {
    epoch: Instant,
    micros: AtomicU64,
    cap: Instant,
}

// === impl UpstreamBudget ===

impl UpstreamBudget {
    /// Starts the budget and its dispatcher task; needs a tokio runtime.
    pub fn start(settings: BudgetSettings) -> Self {
        let now = Instant::now();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                gcra: Gcra::new(settings.rate_per_sec, settings.burst, now),
                queue: VecDeque::new(),
                waiting: 0,
                throttled: None,
            }),
            wake: Notify::new(),
            settings,
            epoch: now,
        });
        let dispatcher = tokio::spawn(dispatch(shared.clone()));
        Self {
            shared,
            _dispatcher: Arc::new(AbortOnDropHandle::new(dispatcher)),
        }
    }

    /// Takes a permit now, queues for one that comes before `deadline` (and
    /// within `max_wait`), or refuses at once when it would come later.
    pub fn reserve(&self, deadline: Option<Instant>) -> Result<Reservation, RateLimited> {
        let now = Instant::now();
        let max_wait_end = now + self.shared.settings.max_wait;
        let latest = deadline.map_or(max_wait_end, |d| d.min(max_wait_end));
        let latest = ReservationDeadline::new(self.shared.epoch, latest, max_wait_end);
        let mut state = self.shared.lock();
        state.apply_rate(now, self.shared.settings.rate_per_sec);
        if state.waiting == 0 && state.gcra.next_free(now) <= now {
            state.gcra.take(now);
            return Ok(Reservation {
                eta: now,
                latest,
                place: Place::Granted,
            });
        }
        let eta = state.gcra.free_after(now, queue_position(state.waiting));
        let refuse = |cause| RateLimited {
            retry_after: eta - now,
            cause,
        };
        if state.waiting >= self.shared.settings.max_queue {
            return Err(refuse(RateLimitCause::QueueFull));
        }
        if eta > latest.get() {
            return Err(refuse(RateLimitCause::WouldWaitTooLong));
        }
        let (grant, granted) = oneshot::channel();
        state.queue.push_back(Waiter {
            grant,
            latest: latest.clone(),
        });
        state.waiting += 1;
        drop(state);
        self.shared.wake.notify_one();
        Ok(Reservation {
            eta,
            latest,
            place: Place::Queued {
                granted,
                _leave: LeaveQueue(self.shared.clone()),
            },
        })
    }

    /// Waits, in arrival order, for a permit that comes before `deadline`
    /// (and within `max_wait`); refuses at once when it would not.
    /// Dropping the future gives up the place in the queue.
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<(), RateLimited> {
        self.reserve(deadline)?.granted().await
    }

    /// Cognito said TooManyRequests: someone else is using the account's
    /// quota, so slow down for a while.
    pub fn on_throttled(&self) {
        let now = Instant::now();
        let configured = self.shared.settings.rate_per_sec;
        let mut state = self.shared.lock();
        if state
            .throttled
            .is_some_and(|last| now.duration_since(last.at) < THROTTLE_COOLDOWN)
        {
            return;
        }
        let current = state.rate(now, configured);
        let slower = (current * THROTTLE_FACTOR).max(configured * THROTTLE_FLOOR);
        state.throttled = Some(Throttled {
            rate: slower,
            at: now,
        });
        state.apply_rate(now, configured);
        tracing::warn!(
            rate_per_sec = slower,
            "Cognito is throttling: upstream budget lowered"
        );
    }

    /// Permits per second right now (lower than configured after throttling).
    pub fn current_rate(&self) -> f64 {
        self.shared
            .lock()
            .rate(Instant::now(), self.shared.settings.rate_per_sec)
    }

    /// Requests waiting for a permit.
    pub fn queue_depth(&self) -> usize {
        self.shared.lock().waiting
    }

    /// How long a request arriving now would wait for its permit, and at
    /// least one permit's interval: a refusal never says "retry at once".
    pub fn estimated_wait(&self) -> Duration {
        let now = Instant::now();
        let state = self.shared.lock();
        let wait = state.gcra.free_after(now, queue_position(state.waiting)) - now;
        wait.max(state.gcra.interval())
    }
}

fn queue_position(waiting: usize) -> u32 {
    u32::try_from(waiting).unwrap_or(u32::MAX)
}

// === impl Reservation ===

impl Reservation {
    /// A permit granted at once, by a budget other than this one.
    pub(super) fn at_once(now: Instant, latest: Instant) -> Self {
        Self {
            eta: now,
            latest: ReservationDeadline::new(now, latest, latest),
            place: Place::Granted,
        }
    }

    /// A permit that is due at `eta`, holding a place in the queue until
    /// then. Its deadline cannot move the slot: it is already reserved.
    pub(super) fn timed(eta: Instant, latest: Instant, queue: OwnedSemaphorePermit) -> Self {
        Self {
            eta,
            latest: ReservationDeadline::new(eta.min(latest), latest, latest),
            place: Place::Timed { _queue: queue },
        }
    }

    /// When the permit is expected: now when granted at once.
    pub fn eta(&self) -> Instant {
        self.eta
    }

    /// True when the permit was granted at once.
    pub fn is_granted(&self) -> bool {
        matches!(self.place, Place::Granted)
    }

    /// The latest the permit may come, shared so it can be moved out.
    pub fn deadline(&self) -> ReservationDeadline {
        self.latest.clone()
    }

    /// Waits for the permit. Refused only when the rate dropped after the
    /// reservation and the permit would now come after the deadline.
    pub async fn granted(self) -> Result<(), RateLimited> {
        match self.place {
            Place::Granted => Ok(()),
            Place::Timed { _queue } => {
                tokio::time::sleep_until(self.eta).await;
                Ok(())
            }
            Place::Queued { granted, _leave } => granted.await.unwrap_or(Err(RateLimited {
                // The dispatcher is gone: only if the budget was dropped.
                retry_after: Duration::ZERO,
                cause: RateLimitCause::WouldWaitTooLong,
            })),
        }
    }
}

/// Takes a waiter out of the count however its wait ends.
#[derive(Debug)]
struct LeaveQueue(Arc<Shared>);

impl Drop for LeaveQueue {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

// === impl ReservationDeadline ===

impl ReservationDeadline {
    fn new(epoch: Instant, latest: Instant, cap: Instant) -> Self {
        let cell = DeadlineCell {
            epoch,
            micros: AtomicU64::new(0),
            cap,
        };
        cell.micros.store(cell.to_micros(latest), Ordering::Relaxed);
        Self(Arc::new(cell))
    }

    /// The latest the permit may come.
    pub fn get(&self) -> Instant {
        let micros = self.0.micros.load(Ordering::Relaxed);
        self.0.epoch + Duration::from_micros(micros)
    }

    /// Moves the deadline out to `later` (never in, never past `max_wait`).
    pub fn extend(&self, later: Instant) {
        let micros = self.0.to_micros(later.min(self.0.cap));
        self.0.micros.fetch_max(micros, Ordering::Relaxed);
    }
}

impl DeadlineCell {
    fn to_micros(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch);
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
    }
}

// === impl Shared / State ===

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the data if it did.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// The configured rate, or after a slow-down, its rate plus what each
    /// quiet second since has given back, capped at the configured rate.
    fn rate(&self, now: Instant, configured: f64) -> f64 {
        match self.throttled {
            None => configured,
            Some(Throttled { rate, at }) => {
                let quiet_secs = now.duration_since(at).as_secs_f64().floor();
                (rate + configured * RECOVERY_PER_SECOND * quiet_secs).min(configured)
            }
        }
    }

    fn apply_rate(&mut self, now: Instant, configured: f64) {
        let rate = self.rate(now, configured);
        self.gcra.set_rate(rate, now);
    }

    /// The first waiter still waiting whose permit, due at or after `from`,
    /// comes before its deadline; those it no longer fits (the rate dropped
    /// after they queued) are refused. A permit due by now is never refused:
    /// a dispatcher that runs late (a starved CPU) must not turn its own
    /// lateness into refusals. Returns when that permit is due.
    fn next_grant(&mut self, from: Instant, now: Instant) -> Option<Instant> {
        loop {
            let front = self.queue.front()?;
            if front.grant.is_closed() {
                self.queue.pop_front();
                continue;
            }
            let due = self.gcra.next_free(from);
            if due <= front.latest.get().max(now) {
                return Some(due);
            }
            if let Some(late) = self.queue.pop_front() {
                let _ = late.grant.send(Err(RateLimited {
                    retry_after: due.saturating_duration_since(now),
                    cause: RateLimitCause::WouldWaitTooLong,
                }));
            }
        }
    }
}

/// Hands out permits to the queue, in order, as the GCRA allows.
async fn dispatch(shared: Arc<Shared>) {
    loop {
        let woken = shared.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let (due, decided) = {
            let mut state = shared.lock();
            let now = Instant::now();
            state.apply_rate(now, shared.settings.rate_per_sec);
            (state.next_grant(now, now), now)
        };
        let Some(due) = due else {
            woken.await;
            continue;
        };
        tokio::time::sleep_until(due).await;
        let mut state = shared.lock();
        let now = Instant::now();
        state.apply_rate(now, shared.settings.rate_per_sec);
        // Looked at again from when the slot was chosen: the rate may have
        // dropped, or the first waiter left, while we slept. The permit is
        // charged to the slot it was due at, not to when the timer fired:
        // timers wake a little late, and charging `now` would lose that
        // lateness on every permit (the benchmark saw 196 instead of 200 in
        // 10 s at 20/s). Its deadline is judged by that slot too, so a
        // deadline in the same timer tick still gets its permit.
        let Some(due) = state.next_grant(decided, now).filter(|due| *due <= now) else {
            continue;
        };
        if let Some(waiter) = state.queue.pop_front() {
            // A waiter that left meanwhile gets nothing and costs nothing.
            if waiter.grant.send(Ok(())).is_ok() {
                state.gcra.take(due);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Paused tokio time: sleeps complete instantly, in order, and
    //! `Instant::now()` tells exactly how much virtual time passed.

    use super::*;

    fn budget(rate: f64, burst: u32, max_queue: usize) -> UpstreamBudget {
        UpstreamBudget::start(BudgetSettings {
            rate_per_sec: rate,
            burst,
            max_queue,
            max_wait: Duration::from_secs(2),
        })
    }

    const MS: Duration = Duration::from_millis(1);

    type Waiter = tokio::task::JoinHandle<Result<(), RateLimited>>;

    /// Spawns `n` more waiters and returns once they are all in the queue.
    async fn queue_waiters(budget: &UpstreamBudget, n: usize) -> Vec<Waiter> {
        let target = budget.queue_depth() + n;
        let waiters = (0..n)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move { budget.acquire(None).await })
            })
            .collect();
        while budget.queue_depth() < target {
            tokio::task::yield_now().await;
        }
        waiters
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_the_next_permit_within_its_deadline() {
        let budget = budget(10.0, 1, 10);
        let start = Instant::now();
        budget.acquire(None).await.expect("burst");

        budget
            .acquire(Some(start + 500 * MS))
            .await
            .expect("queued");

        assert_eq!(start.elapsed(), 100 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_in_the_same_tick_as_the_slot_still_gets_the_permit() {
        let budget = budget(10.0, 1, 10);
        let start = Instant::now();
        budget.acquire(None).await.expect("burst");

        budget
            .acquire(Some(start + 100 * MS))
            .await
            .expect("the slot is at the deadline itself");

        assert_eq!(start.elapsed(), 100 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_before_the_next_permit_is_refused_at_once_with_the_wait() {
        let budget = budget(10.0, 1, 10);
        let start = Instant::now();
        budget.acquire(None).await.expect("burst");

        let refused = budget
            .acquire(Some(start + 50 * MS))
            .await
            .expect_err("too late");

        assert_eq!(refused.retry_after, 100 * MS);
        assert_eq!(refused.cause, RateLimitCause::WouldWaitTooLong);
        assert_eq!(start.elapsed(), Duration::ZERO, "refused without waiting");
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_delay_counts_the_requests_already_queued() {
        let budget = budget(10.0, 1, 10);
        budget.acquire(None).await.expect("burst");
        let queued = queue_waiters(&budget, 3).await;
        let start = Instant::now();

        let refused = budget
            .acquire(Some(start + MS))
            .await
            .expect_err("too late");

        assert_eq!(
            refused.retry_after,
            400 * MS,
            "three queued ahead, then ours"
        );
        for waiter in queued {
            waiter.await.expect("task").expect("permit");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_permits_in_arrival_order_one_interval_apart() {
        let budget = budget(10.0, 1, 10);
        let start = Instant::now();
        budget.acquire(None).await.expect("burst");
        let (done, mut order) = tokio::sync::mpsc::unbounded_channel();
        for id in 0..5 {
            let (waiter, done) = (budget.clone(), done.clone());
            tokio::spawn(async move {
                waiter.acquire(None).await.expect("permit");
                done.send((id, start.elapsed())).expect("send");
            });
            while budget.queue_depth() <= id {
                tokio::task::yield_now().await;
            }
        }

        for expected in 0..5u32 {
            let (id, at) = order.recv().await.expect("permit");
            assert_eq!(id, expected as usize);
            assert_eq!(at, 100 * MS * (expected + 1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn late_timer_wakeups_do_not_lower_the_rate() {
        // 20/s for 10 s, but time only moves in 7 ms steps, so every timer
        // fires up to 7 ms after its slot (as real timers do, by less).
        let budget = UpstreamBudget::start(BudgetSettings {
            rate_per_sec: 20.0,
            burst: 1,
            max_queue: 1000,
            max_wait: Duration::from_secs(60),
        });
        let start = Instant::now();
        budget.acquire(None).await.expect("burst");
        let waiters = queue_waiters(&budget, 400).await;
        while start.elapsed() < Duration::from_secs(10) {
            tokio::time::advance(7 * MS).await;
            tokio::task::yield_now().await;
        }
        let granted = waiters.iter().filter(|w| w.is_finished()).count();

        // Slots at 50 ms, 100 ms, ... 10 s after the burst permit.
        assert_eq!(granted, 200, "granted in 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let budget = budget(1.0, 1, 2);
        budget.acquire(None).await.expect("burst");
        let _waiting = queue_waiters(&budget, 2).await;

        let refused = budget.acquire(None).await.expect_err("full");

        assert_eq!(refused.cause, RateLimitCause::QueueFull);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_frees_its_place_and_takes_no_permit() {
        let budget = budget(10.0, 1, 10);
        let start = Instant::now();
        budget.acquire(None).await.expect("burst");
        let cancelled = queue_waiters(&budget, 1).await.remove(0);

        cancelled.abort();
        let _ = cancelled.await;

        assert_eq!(budget.queue_depth(), 0);
        // Its slot at 100 ms is ours: with it taken we would wait until 200 ms
        // and a 150 ms deadline would be refused.
        budget
            .acquire(Some(start + 150 * MS))
            .await
            .expect("the freed slot");
        assert_eq!(start.elapsed(), 100 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_halves_the_rate_and_quiet_seconds_restore_it() {
        let budget = budget(20.0, 1, 10);

        budget.on_throttled();
        budget.on_throttled(); // the same episode: counted once
        assert_eq!(budget.current_rate(), 10.0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            budget.current_rate(),
            12.0,
            "a quiet second gives back 10 %"
        );
        budget.on_throttled();
        assert_eq!(budget.current_rate(), 6.0);

        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(budget.current_rate(), 16.0);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            budget.current_rate(),
            20.0,
            "never above the configured rate"
        );
    }

    /// Permits a saturated queue is granted within `window` of now, counting
    /// those granted at once separately (time moves in 1 ms steps).
    async fn granted_within(budget: &UpstreamBudget, window: Duration) -> (usize, usize) {
        let start = Instant::now();
        let (done, mut granted) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..100 {
            let (waiter, done) = (budget.clone(), done.clone());
            tokio::spawn(async move {
                if waiter.acquire(None).await.is_ok() {
                    let _ = done.send(start.elapsed());
                }
            });
        }
        drop(done);
        while start.elapsed() < window {
            tokio::task::yield_now().await;
            tokio::time::advance(MS).await;
        }
        tokio::task::yield_now().await;
        let mut at_once = 0;
        let mut within = 0;
        while let Ok(at) = granted.try_recv() {
            at_once += usize::from(at.is_zero());
            within += usize::from(at <= window);
        }
        (at_once, within)
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_never_admits_more_in_the_next_second_than_before() {
        let window = Duration::from_secs(1);
        let mut rows = Vec::new();
        for spent in 0..=5 {
            let history = |throttle: bool| async move {
                let budget = UpstreamBudget::start(BudgetSettings {
                    rate_per_sec: 10.0,
                    burst: 5,
                    max_queue: 1000,
                    max_wait: Duration::from_secs(60),
                });
                for _ in 0..spent {
                    budget.acquire(None).await.expect("within the burst");
                }
                if throttle {
                    budget.on_throttled();
                }
                granted_within(&budget, window).await
            };
            let (steady_at_once, steady) = history(false).await;
            let (throttled_at_once, throttled) = history(true).await;
            eprintln!(
                "burst 5, {spent} spent, then a throttle: granted at once {steady_at_once} \
                 without it, {throttled_at_once} with it; within 1 s {steady} without, \
                 {throttled} with"
            );
            rows.push((spent, steady_at_once, throttled_at_once, throttled));
        }
        for (spent, steady_at_once, throttled_at_once, throttled) in rows {
            assert!(
                throttled_at_once <= steady_at_once,
                "{spent} spent: more at once after the throttle"
            );
            // What was left of the burst, then the halved rate (5/s).
            assert!(
                throttled <= (5 - spent) + 5,
                "{spent} spent: {throttled} within 1 s"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_never_goes_below_a_tenth_of_the_configured_rate() {
        let budget = budget(20.0, 1, 10);
        for _ in 0..10 {
            budget.on_throttled();
            tokio::time::advance(THROTTLE_COOLDOWN).await;
        }
        assert!(budget.current_rate() >= 2.0, "{}", budget.current_rate());
    }

    #[tokio::test(start_paused = true)]
    async fn after_throttling_permits_are_spaced_by_the_lower_rate() {
        let budget = budget(10.0, 1, 10);
        budget.acquire(None).await.expect("burst");
        budget.on_throttled();
        let start = Instant::now();

        budget.acquire(None).await.expect("permit");
        budget.acquire(None).await.expect("permit");

        // The permit already taken is re-spaced at the lower rate too (it
        // would otherwise free burst), so the first comes at 200 ms and the
        // next 200 ms later.
        assert_eq!(start.elapsed(), 400 * MS);
    }
}
