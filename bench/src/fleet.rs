//! P7–P8: the fleet's budget in Redis. P7 offers 10× the fleet's rate over
//! three replicas sharing one Redis and counts what reaches Cognito; P8
//! prices the shared budget at concurrency 1 against the Redis round trip
//! it adds.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use crate::{
    children::{Running, spawn_role, spawn_service},
    clients,
    load::{Call, Outcome, Stop, open_loop},
    report::Row,
    scenarios::{Plan, alternate, arrivals, busiest_second, micros, unix_micros, unlimited},
};

/// A `redis-server` on a free loopback port, without persistence; killed
/// on drop. Debian's package (`scripts/test` installs it).
pub(crate) struct RedisChild {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl RedisChild {
    pub(crate) fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server is needed (apt-get install redis-server): {e}")
            });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..500 {
            if TcpStream::connect(addr).is_ok() {
                return Self { child, addr };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not start on {addr}");
    }

    pub(crate) fn url(&self) -> String {
        format!("--redis-url=redis://{}", self.addr)
    }
}

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const REPLICAS: usize = 3;
const FLEET_BURST: u32 = 5;

/// P7: three replicas, one Redis, 10× the fleet's rate offered evenly.
pub(crate) async fn p7_fleet(plan: &Plan, service_bin: &Path) -> Vec<Row> {
    let fake = spawn_role(&["fake-cognito"]);
    let redis = RedisChild::start();
    let rate = plan.p7_rate;
    let args = vec![
        format!("--rate-limit-rps={rate}"),
        format!("--rate-limit-burst={FLEET_BURST}"),
        redis.url(),
    ];

    let services: Vec<Running> = (0..REPLICAS)
        .map(|_| spawn_service(service_bin, fake.addr, &args))
        .collect();
    let mut calls = Vec::new();
    for service in &services {
        calls.push(clients::grpc(service.addr).await);
    }
    // Each replica connects to Redis in the background: let them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = unix_micros();
    let per_replica = rate * 10.0 / REPLICAS as f64;
    let duration = plan.p7_duration;
    let runs = calls
        .into_iter()
        .map(|call| async move { open_loop(&call, per_replica, duration).await });
    let outcomes: Vec<Outcome> = futures_join(runs).await;
    let mut offered = outcomes.into_iter();
    let mut total = offered.next().expect("three runs");
    for outcome in offered {
        total.merge(&outcome);
    }
    let window_end = started + u64::try_from(plan.p7_duration.as_micros()).unwrap_or(u64::MAX);
    let arrivals = arrivals(fake.addr).await;
    let admitted = arrivals
        .iter()
        .filter(|&&t| t >= started && t < window_end)
        .count() as f64;
    let expected = rate * plan.p7_duration.as_secs_f64();
    let burst = f64::from(FLEET_BURST);
    let busiest = busiest_second(&arrivals);
    let mut redis_errors = 0.0;
    let mut shared_at_end = 0;
    for service in &services {
        let text = metrics_text(service).await;
        redis_errors += sum_of(&text, "session_redis_errors_total");
        shared_at_end +=
            usize::from(sum_of(&text, r#"session_rate_limit_mode{mode="shared"}"#) == 1.0);
    }
    vec![
        Row::ratio(
            &format!(
                "P7 fleet admitted ÷ rate × time ({REPLICAS} replicas, {rate}/s, 10× offered)"
            ),
            format!("{admitted:.0} of {} offered", total.total()),
            format!("{expected:.0} (+ burst {FLEET_BURST})"),
            admitted / expected,
            "1 ± 0.02 (+ burst)",
            admitted >= expected * 0.98 && admitted <= expected * 1.02 + burst,
        ),
        Row::ratio(
            "P7 fleet busiest 1-s window at Cognito ÷ (rate + burst)",
            format!("{busiest}"),
            format!("{rate} + {FLEET_BURST}"),
            busiest as f64 / (rate + burst),
            "≤ 1",
            busiest as f64 <= rate + burst,
        ),
        Row::note(
            "P7 fleet Redis errors (any replica) / replicas shared at the end",
            format!("{redis_errors} / {shared_at_end} of {REPLICAS}"),
        ),
        Row::note(
            "P7 fleet rejection latency p99 / calls",
            format!(
                "{} / {}",
                micros(total.failed.value_at_quantile(0.99)),
                total.codes_text()
            ),
        ),
    ]
}

/// The service's `/metrics` text.
pub(crate) async fn metrics_text(service: &Running) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(addr) = service.metrics_addr() else {
        return String::new();
    };
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = tcp
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = tcp.read_to_string(&mut text).await;
    text
}

/// The sum of the samples whose line starts with `series`.
pub(crate) fn sum_of(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(series))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs the futures at once and returns their outputs in order.
async fn futures_join<F: std::future::Future<Output = Outcome> + Send + 'static>(
    runs: impl Iterator<Item = F>,
) -> Vec<Outcome> {
    let handles: Vec<_> = runs.map(tokio::spawn).collect();
    let mut outcomes = Vec::new();
    for handle in handles {
        outcomes.push(handle.await.expect("a load run"));
    }
    outcomes
}

/// P8: latency at concurrency 1 with the shared budget and without, and the
/// budget script's round trip alone.
pub(crate) async fn p8_redis_cost(plan: &Plan, service_bin: &Path) -> Vec<Row> {
    let fake = spawn_role(&["fake-cognito"]);
    let redis = RedisChild::start();
    let without = spawn_service(service_bin, fake.addr, &unlimited());
    let mut shared_args = unlimited();
    shared_args.push(redis.url());
    let with_service = spawn_service(service_bin, fake.addr, &shared_args);
    let targets = [
        clients::grpc(with_service.addr).await,
        clients::grpc(without.addr).await,
        script_call(redis.addr).await,
    ];
    for target in &targets {
        crate::load::closed_loop(target, 1, Stop::Calls(plan.p1_calls.min(200))).await;
    }
    let (totals, _) = alternate(
        &targets,
        plan.p1_rounds,
        1,
        Stop::Calls(plan.p1_calls),
        with_service.pid(),
    )
    .await;
    let [with, without, script] = &totals[..] else {
        unreachable!("three targets")
    };
    let mut rows = Vec::new();
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let (w, wo, rt) = (
            with.ok.value_at_quantile(q),
            without.ok.value_at_quantile(q),
            script.ok.value_at_quantile(q),
        );
        let added = w.saturating_sub(wo);
        rows.push(Row::ratio(
            &format!("P8 shared budget's added latency {name} ÷ Redis round trip"),
            format!("{} − {}", micros(w), micros(wo)),
            micros(rt),
            added as f64 / rt.max(1) as f64,
            "≤ 1",
            added <= rt,
        ));
    }
    // The service's own view of its script call, to tell the Redis client
    // and runtime's share of the added latency from the rest of the path.
    let text = metrics_text(&with_service).await;
    let sum = sum_of(&text, r#"session_redis_duration_seconds_sum{op="reserve"}"#);
    let count = sum_of(
        &text,
        r#"session_redis_duration_seconds_count{op="reserve"}"#,
    );
    rows.push(Row::note(
        "P8 the service's own script call, mean (session_redis_duration_seconds)",
        format!("{:.0} µs over {count} calls", sum / count.max(1.0) * 1e6),
    ));
    rows.push(Row::note(
        "P8 latency p50 with Redis ÷ without",
        format!(
            "{:.3}",
            with.ok.value_at_quantile(0.5) as f64 / without.ok.value_at_quantile(0.5).max(1) as f64
        ),
    ));
    rows.push(Row::note(
        "P8 calls (with Redis / without / script alone)",
        format!(
            "{} / {} / {}",
            with.codes_text(),
            without.codes_text(),
            script.codes_text()
        ),
    ));
    rows
}

/// One run of the service's budget script, as the service makes it (a
/// `reserve` that is granted at once), from this process.
async fn script_call(redis: SocketAddr) -> Call {
    let client = redis::Client::open(format!("redis://{redis}")).expect("redis url");
    let connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let script = Arc::new(redis::Script::new(include_str!(
        "../../src/limiter/budget.lua"
    )));
    Arc::new(move |_| {
        let mut connection = connection.clone();
        let script = script.clone();
        Box::pin(async move {
            let answer: redis::RedisResult<(i64, i64, String, i64)> = script
                .key("{bench}:budget")
                .key("{bench}:throttle")
                .arg("reserve")
                .arg(1_000_000.0)
                .arg(1_000_000)
                .arg(2_000_000)
                .arg(1.0)
                .arg(1)
                .invoke_async(&mut connection)
                .await;
            match answer {
                Ok((1, ..)) => "OK",
                Ok(_) => "REFUSED",
                Err(_) => "REDIS_ERROR",
            }
        })
    })
}
