//! P1–P5: each starts what it needs, measures, and returns its rows.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    children::{Running, cpu_time, rss_kib, spawn_role, spawn_service, start_service},
    clients,
    load::{Call, Outcome, Stop, closed_loop, open_loop},
    report::Row,
};

/// Sizes of a run: the full benchmark, or the smoke run the tests do.
pub(crate) struct Plan {
    /// P1: calls per target per round, and rounds (targets alternate).
    pub(crate) p1_calls: u64,
    pub(crate) p1_rounds: usize,
    /// P2: time per target per round, and rounds.
    pub(crate) p2_duration: Duration,
    pub(crate) p2_rounds: usize,
    /// P3: configured rate and how long 10× of it is offered.
    pub(crate) p3_rate: f64,
    pub(crate) p3_duration: Duration,
    /// P4: calls in flight per round, the fake's answer delay, rounds.
    pub(crate) p4_calls: u64,
    pub(crate) p4_delay: Duration,
    pub(crate) p4_rounds: usize,
    /// P5: cold starts measured.
    pub(crate) p5_starts: usize,
    /// P7: the fleet's rate and how long 10× of it is offered.
    pub(crate) p7_rate: f64,
    pub(crate) p7_duration: Duration,
    /// P9: live watermarks in the revocation log the service loads.
    pub(crate) p9_watermarks: u64,
}

impl Plan {
    /// About six minutes on two cores.
    pub(crate) const FULL: Self = Self {
        p1_calls: 1000,
        p1_rounds: 5,
        p2_duration: Duration::from_secs(5),
        p2_rounds: 3,
        p3_rate: 20.0,
        p3_duration: Duration::from_secs(10),
        p4_calls: 1000,
        p4_delay: Duration::from_secs(2),
        p4_rounds: 3,
        p5_starts: 10,
        p7_rate: 20.0,
        p7_duration: Duration::from_secs(10),
        p9_watermarks: 1_000_000,
    };

    /// Every scenario once, in seconds: proves the benchmark still runs.
    pub(crate) const SMOKE: Self = Self {
        p1_calls: 20,
        p1_rounds: 1,
        p2_duration: Duration::from_millis(300),
        p2_rounds: 1,
        p3_rate: 20.0,
        p3_duration: Duration::from_secs(1),
        p4_calls: 50,
        p4_delay: Duration::from_millis(300),
        p4_rounds: 3,
        p5_starts: 1,
        p7_rate: 20.0,
        p7_duration: Duration::from_secs(1),
        p9_watermarks: 20_000,
    };
}

/// Service flags that keep the limits out of the way (all but P3). The
/// in-flight bound stays well above P4's 1,000 calls but finite: the
/// service sets aside one descriptor per in-flight call (its upstream
/// connection) when it sizes its connection budget from the fd limit.
pub(crate) fn unlimited() -> Vec<String> {
    [
        "--rate-limit-rps=1000000",
        "--rate-limit-burst=1000000",
        "--max-queue=1000000",
        "--max-in-flight=4096",
        "--upstream-attempt-timeout=20s",
        "--upstream-timeout=30s",
    ]
    .map(String::from)
    .to_vec()
}

pub(crate) fn micros(value: u64) -> String {
    format!("{:.0} µs", value as f64)
}

/// Runs each target in turn, `rounds` times over, so that drift on a shared
/// machine hits them alike; merges each target's outcomes. Also returns the
/// CPU time process `pid` (the service) used while target 0 ran.
pub(crate) async fn alternate(
    targets: &[Call],
    rounds: usize,
    concurrency: usize,
    stop: Stop,
    pid: u32,
) -> (Vec<Outcome>, Duration) {
    let mut totals: Vec<Outcome> = Vec::new();
    let mut cpu = Duration::ZERO;
    for round in 0..rounds {
        for (i, target) in targets.iter().enumerate() {
            let cpu_before = cpu_time(pid);
            let outcome = closed_loop(target, concurrency, stop).await;
            if i == 0 {
                cpu += cpu_time(pid) - cpu_before;
            }
            if round == 0 {
                totals.push(outcome);
            } else {
                totals[i].merge(&outcome);
            }
        }
    }
    (totals, cpu)
}

/// P1: latency at concurrency 1, service vs floor 1 + floor 2.
pub(crate) async fn p1_latency(plan: &Plan, service_bin: &Path) -> Vec<Row> {
    let fake = spawn_role(&["fake-cognito"]);
    let floor = spawn_role(&["floor-grpc"]);
    let service = spawn_service(service_bin, fake.addr, &unlimited());
    let targets = [
        clients::grpc(service.addr).await,
        clients::grpc(floor.addr).await,
        clients::sdk(fake.addr),
    ];
    for target in &targets {
        closed_loop(target, 1, Stop::Calls(plan.p1_calls.min(200))).await;
    }
    let (totals, service_cpu) = alternate(
        &targets,
        plan.p1_rounds,
        1,
        Stop::Calls(plan.p1_calls),
        service.pid(),
    )
    .await;
    let [service, grpc_floor, sdk_floor] = &totals[..] else {
        unreachable!("three targets")
    };
    let mut rows = Vec::new();
    for (name, q, goal) in [("p50", 0.5, 1.15), ("p99", 0.99, 1.15)] {
        let s = service.ok.value_at_quantile(q);
        let floor = grpc_floor.ok.value_at_quantile(q) + sdk_floor.ok.value_at_quantile(q);
        rows.push(Row::ratio(
            &format!("P1 latency {name}, concurrency 1"),
            micros(s),
            format!(
                "{} + {}",
                micros(grpc_floor.ok.value_at_quantile(q)),
                micros(sdk_floor.ok.value_at_quantile(q))
            ),
            s as f64 / floor as f64,
            &format!("≤ {goal}"),
            s as f64 / floor as f64 <= goal,
        ));
    }
    rows.push(Row::note(
        "P1 service CPU per call (user + system)",
        micros(u64::try_from(service_cpu.as_micros()).unwrap_or(0) / service.total().max(1)),
    ));
    rows.push(Row::note(
        "P1 calls (service / gRPC floor / SDK floor)",
        format!(
            "{} / {} / {}",
            service.codes_text(),
            grpc_floor.codes_text(),
            sdk_floor.codes_text()
        ),
    ));
    rows
}

/// P2: throughput at concurrency 64, service vs floor 2.
pub(crate) async fn p2_throughput(plan: &Plan, service_bin: &Path) -> Vec<Row> {
    let fake = spawn_role(&["fake-cognito"]);
    let floor = spawn_role(&["floor-grpc"]);
    let service = spawn_service(service_bin, fake.addr, &unlimited());
    let targets = [
        clients::grpc(service.addr).await,
        clients::sdk(fake.addr),
        clients::grpc(floor.addr).await,
    ];
    for target in &targets {
        closed_loop(target, 64, Stop::Calls(640)).await;
    }
    let (totals, _) = alternate(
        &targets,
        plan.p2_rounds,
        64,
        Stop::After(plan.p2_duration),
        service.pid(),
    )
    .await;
    let [service, sdk_floor, grpc_floor] = &totals[..] else {
        unreachable!("three targets")
    };
    let ratio = service.ok_per_sec() / sdk_floor.ok_per_sec();
    let all_ok = service.ok_count() == service.total();
    vec![
        Row::ratio(
            "P2 throughput, concurrency 64",
            format!("{:.0} req/s", service.ok_per_sec()),
            format!("{:.0} req/s (SDK alone)", sdk_floor.ok_per_sec()),
            ratio,
            "≥ 0.85, all OK",
            ratio >= 0.85 && all_ok,
        ),
        // With every core busy, the service's path costs at least the CPU
        // of both floors per call: 1/(1/sdk + 1/grpc) is its ceiling.
        Row::note(
            "P2 ceiling if the service itself cost nothing (both floors' CPU)",
            format!(
                "{:.0} req/s, ratio {:.3}",
                1.0 / (1.0 / sdk_floor.ok_per_sec() + 1.0 / grpc_floor.ok_per_sec()),
                grpc_floor.ok_per_sec() / (sdk_floor.ok_per_sec() + grpc_floor.ok_per_sec())
            ),
        ),
        Row::note(
            "P2 calls (service / SDK floor / gRPC floor req/s)",
            format!(
                "{} / {} / {:.0} req/s",
                service.codes_text(),
                sdk_floor.codes_text(),
                grpc_floor.ok_per_sec()
            ),
        ),
    ]
}

/// P3: 10× the configured rate offered; what reaches the fake.
pub(crate) async fn p3_limiter(plan: &Plan, service_bin: &Path) -> Vec<Row> {
    let fake = spawn_role(&["fake-cognito"]);
    let rate = plan.p3_rate;
    let args = vec![
        format!("--rate-limit-rps={rate}"),
        "--rate-limit-burst=1".into(),
    ];
    let service = spawn_service(service_bin, fake.addr, &args);
    let call = clients::grpc(service.addr).await;
    let started = unix_micros();
    let outcome = open_loop(&call, rate * 10.0, plan.p3_duration).await;
    let window_end = started + u64::try_from(plan.p3_duration.as_micros()).unwrap_or(u64::MAX);
    let arrivals = arrivals(fake.addr).await;
    let in_window = arrivals
        .iter()
        .filter(|&&t| t >= started && t < window_end)
        .count();
    let configured = rate * plan.p3_duration.as_secs_f64();
    let accuracy = in_window as f64 / configured;
    let busiest = busiest_second(&arrivals);
    let rejected_p99 = outcome.failed.value_at_quantile(0.99);
    vec![
        Row::ratio(
            &format!("P3 admitted ÷ configured ({rate}/s, 10× offered)"),
            format!("{in_window} in {:.0} s", plan.p3_duration.as_secs_f64()),
            format!("{configured:.0}"),
            accuracy,
            "1 ± 0.02",
            (accuracy - 1.0).abs() <= 0.02,
        ),
        Row::ratio(
            "P3 busiest 1-s window at Cognito ÷ rate",
            format!("{busiest}"),
            format!("{rate}/s"),
            busiest as f64 / rate,
            "≤ 1 (+ burst 1)",
            busiest as f64 <= rate + 1.0,
        ),
        Row::note(
            "P3 rejection latency p99 / calls",
            format!("{} / {}", micros(rejected_p99), outcome.codes_text()),
        ),
    ]
}

/// P4: RSS idle, with calls in flight against a slow fake, and after.
pub(crate) async fn p4_memory(plan: &Plan, service_bin: &Path) -> Vec<Row> {
    let fake = spawn_role(&[
        "fake-cognito",
        "--delay",
        &format!("{}ms", plan.p4_delay.as_millis()),
    ]);
    let service = spawn_service(service_bin, fake.addr, &unlimited());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = rss_kib(service.pid());
    let call = clients::grpc(service.addr).await;
    let mut peaks = Vec::new();
    let mut afters = Vec::new();
    for _ in 0..plan.p4_rounds {
        let (peak, after) = in_flight_round(&service, &call, plan.p4_calls).await;
        peaks.push(peak);
        afters.push(after);
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let peak = peaks.iter().copied().max().unwrap_or(0);
    let growth = mib(*afters.last().unwrap_or(&0)) - mib(afters[0]);
    let list = |v: &[u64]| {
        v.iter()
            .map(|k| format!("{:.1}", mib(*k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![
        Row::value(
            "P4 RSS idle",
            format!("{:.1} MiB", mib(idle)),
            "≤ 15 MB",
            mib(idle) <= 15.0,
        ),
        Row::value(
            &format!(
                "P4 RSS peak, {} in flight (rounds: {} MiB)",
                plan.p4_calls,
                list(&peaks)
            ),
            format!("{:.1} MiB", mib(peak)),
            "≤ 64 MB",
            mib(peak) <= 64.0,
        ),
        Row::value(
            &format!("P4 RSS after each round ({} MiB)", list(&afters)),
            format!("{growth:+.1} MiB round 1 → {}", plan.p4_rounds),
            "no growth",
            growth <= 1.0,
        ),
    ]
}

/// One round of `calls` at once; RSS sampled every 20 ms. Returns the peak
/// and the RSS 1.5 s after the last answer (jemalloc returns freed pages
/// within a second; see `.cargo/config.toml`).
async fn in_flight_round(service: &Running, call: &Call, calls: u64) -> (u64, u64) {
    let load = closed_loop(
        call,
        usize::try_from(calls).unwrap_or(1000),
        Stop::Calls(calls),
    );
    tokio::pin!(load);
    let mut peak = 0;
    let mut sampler = tokio::time::interval(Duration::from_millis(20));
    let outcome = loop {
        tokio::select! {
            outcome = &mut load => break outcome,
            _ = sampler.tick() => peak = peak.max(rss_kib(service.pid())),
        }
    };
    assert_eq!(
        outcome.ok_count(),
        calls,
        "P4 calls: {}",
        outcome.codes_text()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    (peak, rss_kib(service.pid()))
}

/// P5: process start to SERVING, and the binary's size.
pub(crate) async fn p5_startup(plan: &Plan, service_bin: &Path) -> Vec<Row> {
    let fake = spawn_role(&["fake-cognito"]);
    let mut times = Vec::new();
    for _ in 0..plan.p5_starts {
        times.push(start_to_serving(service_bin, fake.addr).await);
    }
    times.sort();
    let median = times[times.len() / 2];
    let size = std::fs::metadata(service_bin).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
    vec![
        Row::value(
            &format!(
                "P5 start → SERVING, median of {} (max {:.1} ms)",
                times.len(),
                ms(times[times.len() - 1])
            ),
            format!("{:.1} ms", ms(median)),
            "≤ 100 ms",
            ms(median) <= 100.0,
        ),
        Row::value(
            "P5 binary size (stripped)",
            format!("{size:.1} MB"),
            "≤ 20 MB",
            size <= 20.0,
        ),
    ]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn start_to_serving(service_bin: &Path, cognito: SocketAddr) -> Duration {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let started = Instant::now();
    let _service = start_service(service_bin, cognito, listen);
    let uri = format!("http://{listen}");
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(uri.clone())
            .expect("uri")
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let request = tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(response) = health.check(request).await
                && response.into_inner().status == 1
            {
                return started.elapsed();
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never SERVING");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(crate) fn unix_micros() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_micros()).unwrap_or(u64::MAX)
}

/// The fake's arrival times (µs since the epoch), sorted.
pub(crate) async fn arrivals(fake: SocketAddr) -> Vec<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(fake).await.expect("fake");
    tcp.write_all(b"GET /arrivals HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n")
        .await
        .expect("ask");
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.expect("read");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let mut times: Vec<u64> = body.lines().filter_map(|l| l.trim().parse().ok()).collect();
    times.sort_unstable();
    times
}

/// Most arrivals in any 1-second window (sliding, not aligned).
pub(crate) fn busiest_second(sorted: &[u64]) -> usize {
    let mut start = 0;
    let mut best = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= 1_000_000 {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}
