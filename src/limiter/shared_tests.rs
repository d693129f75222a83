//! The budget script against a real `redis-server` (Debian's package; the
//! tests fail, never skip, without it). The script's answers are in Redis's
//! microseconds, so its arithmetic is checked on its own answers, not on
//! this process's clock; bounds leave room for a slow machine.

use std::time::Duration;

use redis::{Script, aio::MultiplexedConnection};

use crate::test_redis::TestRedis;

/// `{granted, wait_us, cause, rate_milli}`.
type Answer = (i64, i64, String, i64);

struct Cells {
    script: Script,
    connection: MultiplexedConnection,
    rate: f64,
    burst: u32,
}

impl Cells {
    async fn call(
        &mut self,
        mode: &str,
        caller: Option<(&str, f64, u32)>,
        max_wait_us: u64,
    ) -> Answer {
        let mut invocation = self.script.prepare_invoke();
        invocation.key("{t}:budget").key("{t}:throttle");
        if let Some((key, _, _)) = caller {
            invocation.key(key);
        }
        invocation
            .arg(mode)
            .arg(self.rate)
            .arg(self.burst)
            .arg(max_wait_us)
            .arg(caller.map_or(1.0, |c| c.1))
            .arg(caller.map_or(1, |c| c.2));
        invocation
            .invoke_async(&mut self.connection)
            .await
            .expect("the script runs")
    }

    async fn reserve(&mut self, max_wait_us: u64) -> Answer {
        self.call("reserve", None, max_wait_us).await
    }

    async fn budget_cell(&mut self) -> Option<String> {
        redis::cmd("HGET")
            .arg("{t}:budget")
            .arg("tat")
            .query_async(&mut self.connection)
            .await
            .expect("HGET")
    }
}

async fn cells(redis: &TestRedis, rate: f64, burst: u32) -> Cells {
    Cells {
        script: Script::new(include_str!("budget.lua")),
        connection: redis.connection().await,
        rate,
        burst,
    }
}

const INTERVAL_US: i64 = 100_000; // 10/s

#[tokio::test]
async fn the_burst_is_granted_at_once_then_one_slot_per_interval() {
    let redis = TestRedis::start();
    let mut cells = cells(&redis, 10.0, 2).await;
    let (a, b) = (cells.reserve(0).await, cells.reserve(0).await);
    assert_eq!(
        (a.0, a.1, b.0, b.1),
        (1, 0, 1, 0),
        "the burst of 2: {a:?} {b:?}"
    );
    // Slots are reserved back to back: each wait is one interval more than
    // the one before, less the (small) time between the two calls.
    let mut previous = 0;
    for n in 1..=5 {
        let (granted, wait, cause, rate_milli) = cells.reserve(10_000_000).await;
        assert_eq!((granted, cause.as_str(), rate_milli), (1, "ok", 10_000));
        assert!(
            wait > previous && wait <= n * INTERVAL_US,
            "slot {n}: waits {wait} µs after {previous} µs"
        );
        assert!(
            wait > previous + INTERVAL_US / 2,
            "slot {n} is an interval later"
        );
        previous = wait;
    }
}

#[tokio::test]
async fn a_refusal_writes_nothing_and_says_when_a_slot_comes() {
    let redis = TestRedis::start();
    let mut cells = cells(&redis, 10.0, 1).await;
    cells.reserve(0).await;
    let before = cells.budget_cell().await;
    for _ in 0..20 {
        let (granted, wait, cause, _) = cells.reserve(1_000).await;
        assert_eq!((granted, cause.as_str()), (0, "wait"));
        assert!(wait > 1_000 && wait <= INTERVAL_US, "retry after {wait} µs");
    }
    assert_eq!(cells.budget_cell().await, before, "refusals took nothing");
    let (granted, wait, ..) = cells.reserve(10_000_000).await;
    assert_eq!(granted, 1);
    assert!(
        wait <= INTERVAL_US,
        "the next slot is still the first one: {wait} µs"
    );
}

#[tokio::test]
async fn a_throttle_halves_the_rate_and_frees_no_burst() {
    let redis = TestRedis::start();
    let mut cells = cells(&redis, 10.0, 4).await;
    for _ in 0..4 {
        assert_eq!(cells.reserve(0).await.0, 1, "the burst");
    }
    let (applied, _, cause, rate_milli) = cells.call("throttled", None, 0).await;
    assert_eq!(
        (applied, cause.as_str(), rate_milli),
        (1, "throttled", 5_000)
    );
    let (again, _, cause, _) = cells.call("throttled", None, 0).await;
    assert_eq!(
        (again, cause.as_str()),
        (0, "cooldown"),
        "one episode, one halving"
    );
    // At the old rate the burst's 4 slots were outstanding (tolerance 3
    // intervals): the next slot was ~1 interval away. Rescaled to the new
    // interval it is ~2 old intervals away, never at once.
    let (granted, wait, _, rate_milli) = cells.reserve(10_000_000).await;
    assert_eq!((granted, rate_milli), (1, 5_000));
    assert!(
        wait > INTERVAL_US,
        "after the throttle the next slot is more than an old interval away: {wait} µs"
    );
    let (_, next, ..) = cells.reserve(10_000_000).await;
    assert!(
        next - wait > INTERVAL_US,
        "slots are now 200 ms apart: {wait} then {next} µs"
    );
}

#[tokio::test]
async fn the_callers_cell_is_checked_in_the_same_call_and_a_refusal_takes_no_slot() {
    let redis = TestRedis::start();
    let mut cells = cells(&redis, 100.0, 100).await;
    let caller = Some(("{t}:caller:svc-a", 1.0, 2));
    for _ in 0..2 {
        let (granted, wait, ..) = cells.call("reserve", caller, 0).await;
        assert_eq!((granted, wait), (1, 0), "the caller's burst of 2");
    }
    let budget = cells.budget_cell().await;
    let (granted, wait, cause, _) = cells.call("reserve", caller, 0).await;
    assert_eq!((granted, cause.as_str()), (0, "caller"));
    assert!(wait > 0 && wait <= 1_000_000, "retry after {wait} µs");
    assert_eq!(
        cells.budget_cell().await,
        budget,
        "no slot taken for a refused caller"
    );
    let (granted, ..) = cells.call("caller", caller, 0).await;
    assert_eq!(granted, 0, "a joiner is charged to the same cell");
    let other = Some(("{t}:caller:svc-b", 1.0, 2));
    assert_eq!(
        cells.call("reserve", other, 0).await.0,
        1,
        "another caller is not"
    );
}

#[tokio::test]
async fn after_script_flush_the_script_is_loaded_again() {
    let redis = TestRedis::start();
    let mut cells = cells(&redis, 10.0, 5).await;
    assert_eq!(cells.reserve(0).await.0, 1);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut cells.connection)
        .await
        .expect("SCRIPT FLUSH");
    assert_eq!(
        cells.reserve(0).await.0,
        1,
        "NOSCRIPT, then loaded and run once"
    );
}

/// A budget of the service's own on `redis`, with a short cool-down.
async fn shared_budget(
    redis: &TestRedis,
    cooldown: Duration,
    registry: &prometheus::Registry,
) -> crate::limiter::SharedBudget {
    shared_budget_with_queue(redis, cooldown, registry, 10).await
}

async fn shared_budget_with_queue(
    redis: &TestRedis,
    cooldown: Duration,
    registry: &prometheus::Registry,
    max_queue: usize,
) -> crate::limiter::SharedBudget {
    use crate::{
        limiter::{BudgetSettings, CallerSettings, LocalBudget, SharedBudget, SharedSettings},
        redis::{Redis, RedisSettings, RedisUrl},
    };
    let client = Redis::connect(
        &RedisSettings {
            url: RedisUrl::parse(&redis.url()).expect("url"),
            password: None,
            ca_file: None,
            timeout: Duration::from_secs(1),
            reconnect_every: cooldown,
        },
        registry,
        vec![super::budget_script()],
    )
    .expect("client");
    let settings = BudgetSettings {
        rate_per_sec: 100.0,
        burst: 10,
        max_queue: 10,
        max_wait: Duration::from_secs(1),
    };
    let fallback = LocalBudget::start(settings, CallerSettings::default());
    SharedBudget::new(
        client,
        SharedSettings {
            rate_per_sec: 100.0,
            burst: 10,
            max_queue,
            max_wait: Duration::from_secs(1),
            cooldown,
            key_prefix: "t".into(),
        },
        fallback,
        registry,
    )
}

/// `session_redis_errors_total`, all kinds.
fn redis_errors(registry: &prometheus::Registry) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == "session_redis_errors_total")
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_counter().get_value())
        .sum()
}

/// Polls `ready` every 10 ms for at most `limit`; how long it took.
async fn within(limit: Duration, ready: impl Fn() -> bool) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if ready() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test]
async fn after_an_outage_the_first_probe_once_redis_is_back_makes_the_budget_shared() {
    let mut redis = TestRedis::start();
    let cooldown = Duration::from_secs(1);
    let registry = prometheus::Registry::new();
    let budget = shared_budget(&redis, cooldown, &registry).await;
    let shared = || budget.is_shared();
    assert!(
        within(Duration::from_secs(5), shared).await.is_some(),
        "shared once connected, before any request"
    );
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(1);
    budget.reserve(deadline(), None).await.expect("a slot");

    redis.kill();
    // The call that finds Redis gone falls back: the sign-out still has a slot.
    budget
        .reserve(deadline(), None)
        .await
        .expect("a local slot");
    assert!(!budget.is_shared());
    // Let a probe fail during the outage, and restart Redis just after it:
    // the next probe, one cool-down later, makes a connection of its own and
    // finds Redis (one that reused the old connection could be handed the
    // failure of a reconnection tried while Redis was down, and leave the
    // budget local for a second cool-down).
    // Probes come one cool-down apart, not one after another: over three
    // cool-downs, three probes' worth of errors (each counts its failed
    // connection, and sometimes the connection manager's retry), no more.
    let before = redis_errors(&registry);
    tokio::time::sleep(cooldown * 3).await;
    let during = redis_errors(&registry) - before;
    assert!(
        (1.0..=8.0).contains(&during),
        "{during} Redis errors in three cool-downs of an outage"
    );
    let failed = redis_errors(&registry);
    let probed = within(Duration::from_secs(5), || redis_errors(&registry) > failed).await;
    assert!(probed.is_some(), "a probe during the outage");
    // After redis-rs's own retry of the reconnection that probe started
    // (within 200 ms), which would otherwise find Redis back by itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!budget.is_shared(), "still local while Redis is down");
    redis.restart();
    let back = within(Duration::from_secs(5), shared).await;
    let back = back.expect("shared again, with no request asking");
    assert!(
        back < cooldown * 3 / 2,
        "the first probe after the restart found Redis: {back:?} (cool-down {cooldown:?})"
    );
}

#[tokio::test]
async fn without_a_place_in_the_queue_a_request_still_takes_a_slot_free_now() {
    use crate::limiter::{RateLimitCause, RateLimited, Refusal};
    let redis = TestRedis::start();
    let cooldown = Duration::from_secs(5);
    // --max-queue 0 on this replica: nobody may wait, but the burst (10 at
    // 100/s) is free; another replica on the same cells may queue.
    let registry = prometheus::Registry::new();
    let budget = shared_budget_with_queue(&redis, cooldown, &registry, 0).await;
    let other = shared_budget_with_queue(&redis, cooldown, &prometheus::Registry::new(), 100).await;
    for replica in [&budget, &other] {
        assert!(
            within(Duration::from_secs(5), || replica.is_shared())
                .await
                .is_some(),
            "connected"
        );
    }
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(1);
    for n in 0..10 {
        let slot = budget.reserve(deadline(), None).await;
        assert!(slot.is_ok_and(|s| s.is_granted()), "slot {n} of the burst");
    }
    // The other replica queues for the next 50 slots (10 ms apart)...
    let mut queued = Vec::new();
    for _ in 0..50 {
        queued.push(other.reserve(deadline(), None).await.expect("queued"));
    }
    // ...so this one's refusal says the 51st slot, about 510 ms away: the
    // script's answer, not one interval (room for a slow machine).
    match budget.reserve(deadline(), None).await {
        Err(Refusal::Budget(RateLimited {
            retry_after,
            cause: RateLimitCause::QueueFull,
        })) => assert!(
            retry_after > Duration::from_millis(250) && retry_after <= Duration::from_millis(520),
            "the script says when the next slot comes: {retry_after:?}"
        ),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert!(budget.is_shared(), "a refusal is not a Redis failure");
}
