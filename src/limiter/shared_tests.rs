//! The budget script against a real `redis-server` (Debian's package; the
//! tests fail, never skip, without it). The script's answers are in Redis's
//! microseconds, so its arithmetic is checked on its own answers, not on
//! this process's clock; bounds leave room for a slow machine.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

use redis::{Script, aio::MultiplexedConnection};

/// A throw-away Redis on a free loopback port, killed on drop.
struct TestRedis {
    child: Child,
    port: u16,
}

impl TestRedis {
    fn start() -> Self {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut child = Command::new(&binary)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("redis-server is required (scripts/test installs it): {e}")
                });
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { child, port };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start");
    }

    async fn connection(&self) -> MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("connected")
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
