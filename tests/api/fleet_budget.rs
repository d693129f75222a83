//! The fleet's budget in Redis, black-box: three service processes (the
//! real binary), one real Redis, a fake Cognito.
//!
//! Cognito's view is what counts: "admitted" is a call the fake received,
//! timed by its arrival stamp, on the monotonic clock the test sends by.
//! The fake runs in the test's runtime, hence two worker threads: its
//! stamps do not wait behind the load the test offers.

use std::{
    future::Future,
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use session_service::proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::{Mutex, mpsc, oneshot},
    task::JoinSet,
};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, assert_error, binary, channel, max_in_window, metrics_text, percentile},
    redis_server::TestRedis,
};

type Client = SessionServiceClient<Channel>;

/// The fleet's budget in every test: Cognito's own quota shape.
const RATE: f64 = 20.0;
const BURST: f64 = 5.0;

/// One fleet at a time: three fleets' processes on two cores would measure
/// the machine, not the budget.
static ONE_FLEET: Mutex<()> = Mutex::const_new(());

/// One service process, on the fleet's budget; killed on drop.
struct Replica {
    _process: tokio::process::Child,
    client: Client,
    metrics_addr: SocketAddr,
}

impl Replica {
    /// The real binary with the fleet's flags, then `flags`; returns once
    /// it serves and its budget is the fleet's (Redis answered).
    async fn start(redis: &TestRedis, cognito: &FakeCognito, flags: &[&str]) -> Self {
        let (rate, burst) = (RATE.to_string(), BURST.to_string());
        let mut process = tokio::process::Command::from(binary())
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "AKIDTESTTESTTESTTEST")
            .env("AWS_SECRET_ACCESS_KEY", "test-secret")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .args(["--cognito-endpoint", &cognito.endpoint()])
            .args(["--redis-url", &redis.url()])
            .args(["--rate-limit-rps", &rate, "--rate-limit-burst", &burst])
            // A Redis call held up 50 ms (the default) by a starved core
            // would put a replica on its fallback budget for a cool-down:
            // that is `redis_failures`' subject; here the fleet's budget
            // alone is measured.
            .args(["--redis-timeout", "1s"])
            .args(crate::helpers::UNLIMITED_LOOKUPS)
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("binary starts");
        // Read the log on a task of its own, which also keeps the pipe
        // drained for as long as the process runs.
        let stdout = process.stdout.take().expect("piped");
        let (lines_tx, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = stdout.next_line().await {
                let _ = lines_tx.send(line);
            }
        });
        let (mut addrs, mut shared) = (None, false);
        while addrs.is_none() || !shared {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.recv())
                .await
                .expect("serving on the fleet's budget within 60 s")
                .expect("the binary is still running");
            let log: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            let addr = |key: &str| log[key].as_str().map(|a| a.parse().expect("address"));
            if let (Some(addr), Some(metrics)) = (addr("addr"), addr("metrics_addr")) {
                addrs = Some((addr, metrics));
            }
            shared |= log["message"] == "rate budget: shared (Redis)";
        }
        let (addr, metrics_addr) = addrs.expect("logged");
        Self {
            _process: process,
            client: SessionServiceClient::new(channel(addr).await),
            metrics_addr,
        }
    }

    /// Fails unless this replica used the fleet's budget throughout: no
    /// Redis call failed, so no request fell back to a local budget.
    async fn assert_stayed_shared(&self) {
        let metrics = metrics_text(self.metrics_addr).await;
        let failed: f64 = metrics
            .lines()
            .filter(|line| line.starts_with("session_redis_errors_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(failed, 0.0, "Redis calls failed:\n{metrics}");
        assert!(
            metrics.contains("session_rate_limit_mode{mode=\"shared\"} 1"),
            "{metrics}"
        );
    }
}

/// One sign-out as it was offered: when, how long the answer took, what.
struct Offered {
    sent: Instant,
    latency: Duration,
    result: Result<(), Status>,
}

async fn sign_out(mut client: Client, caller: &str, username: String) -> Offered {
    let mut request = Request::new(GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username,
    });
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().expect("ascii caller id"));
    let sent = Instant::now();
    let result = client.global_sign_out(request).await.map(drop);
    Offered {
        sent,
        latency: sent.elapsed(),
        result,
    }
}

/// Two sign-outs at once through each replica, so that the calls measured
/// find connections (to Redis, and two to Cognito for a burst) open.
async fn warm_up(replicas: &[&Replica]) {
    let mut calls = JoinSet::new();
    for (i, replica) in replicas.iter().enumerate() {
        for j in 0..2 {
            let username = format!("warm-up-{i}-{j}");
            calls.spawn(sign_out(replica.client.clone(), "warm-up", username));
        }
    }
    for warm in calls.join_all().await {
        warm.result.expect("warm-up sign-out");
    }
}

/// Offers `rate` sign-outs a second as `caller`, to each of `targets` in
/// turn, each for a user of its own, until `stop`; then waits for every
/// answer.
async fn offer(
    targets: Vec<Client>,
    caller: &'static str,
    rate: f64,
    stop: impl Future<Output = ()>,
) -> Vec<Offered> {
    let start = Instant::now();
    let mut calls = JoinSet::new();
    tokio::pin!(stop);
    for i in 0.. {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::select! {
            biased;
            () = &mut stop => break,
            () = tokio::time::sleep_until(at.into()) => {}
        }
        let client = targets[i % targets.len()].clone();
        calls.spawn(sign_out(client, caller, format!("{caller}-{i}")));
    }
    calls.join_all().await
}

/// First and last offered request.
fn offered_span(offered: &[Offered]) -> (Instant, Instant) {
    let sent = offered.iter().map(|o| o.sent);
    let first = sent.clone().min().expect("something offered");
    (first, sent.max().expect("something offered"))
}

fn arrivals(cognito: &FakeCognito) -> Vec<Instant> {
    let mut arrivals: Vec<_> = cognito.requests().iter().map(|r| r.arrived).collect();
    arrivals.sort();
    arrivals
}

/// Arrivals in `[from, to)`.
fn count_between(arrivals: &[Instant], from: Instant, to: Instant) -> usize {
    arrivals.iter().filter(|&&t| from <= t && t < to).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_at_ten_times_the_rate_give_cognito_the_fleet_rate_once() {
    let _one_fleet = ONE_FLEET.lock().await;
    let redis = TestRedis::start();
    let cognito = FakeCognito::start(Reply::Ok).await;
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(Replica::start(&redis, &cognito, &[]).await);
    }
    warm_up(&fleet.iter().collect::<Vec<_>>()).await;
    // The six warm-up slots are paid back at RATE: the burst is whole again
    // within 300 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let span = Duration::from_secs(6);
    let clients = fleet.iter().map(|r| r.client.clone()).collect();
    let offered = offer(clients, "load", 10.0 * RATE, tokio::time::sleep(span)).await;

    // Admitted: what Cognito received from the first offered request (the
    // burst is whole then) to the last. Slots handed out before the last
    // keep reaching Cognito for up to a queue wait (2 s) after it: they
    // belong to no span of offered load, so they are not counted.
    let (first, last) = offered_span(&offered);
    let arrivals = arrivals(&cognito);
    let admitted = count_between(&arrivals, first, last);
    let expected = BURST + RATE * (last - first).as_secs_f64();
    // GCRA's bound: the burst plus a second's worth, in any second.
    let busiest = max_in_window(&arrivals, Duration::from_secs(1));
    let mut refused = Vec::new();
    for o in &offered {
        if let Err(status) = &o.result {
            assert_error(status, Code::ResourceExhausted, "RATE_LIMITED", true);
            let delay = status.get_details_retry_info().and_then(|r| r.retry_delay);
            assert!(delay.is_some_and(|d| d > Duration::ZERO), "{status:?}");
            refused.push(o.latency);
        }
    }
    let signed_out = offered.len() - refused.len();
    refused.sort();
    let refusal_p99 = percentile(&refused, 0.99);
    println!(
        "fleet accuracy: 3 replicas, {RATE}/s burst {BURST}; offered {} over {:.3} s; \
         admitted (Cognito arrivals in that span) {admitted}, expected {expected:.1}; \
         signed out in all {signed_out}; busiest 1-s window {busiest}; \
         refusal latency p99 {refusal_p99:?}",
        offered.len(),
        (last - first).as_secs_f64(),
    );
    for replica in &fleet {
        replica.assert_stayed_shared().await;
    }
    assert_eq!(
        arrivals.len(),
        signed_out + 2 * fleet.len(),
        "every sign-out (and warm-up) reached Cognito once"
    );
    assert!(
        (admitted as f64 - expected).abs() <= 0.02 * expected,
        "admitted {admitted}, expected {expected:.1} ± 2 %"
    );
    assert!(
        busiest as f64 <= RATE + BURST,
        "Cognito saw {busiest} calls in one second"
    );
    // At once, not after the 2 s queue wait; generous for a loaded machine.
    assert!(
        refusal_p99 < Duration::from_secs(1),
        "refusals took up to {refusal_p99:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_spread_over_three_replicas_gets_its_allowance_once() {
    let _one_fleet = ONE_FLEET.lock().await;
    let redis = TestRedis::start();
    let cognito = FakeCognito::start(Reply::Ok).await;
    // A caller named in the overrides has a cell of its own even when its
    // id is only self-declared (plaintext); its burst is a second's worth.
    // The fleet's budget is no limit here (the caller's rate is a quarter
    // of it), so every refusal is the caller's.
    let (caller_rate, caller_burst) = (5.0, 5.0);
    let rate_override = format!("batch={caller_rate}");
    let flags = ["--per-caller-rps-overrides", &rate_override];
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(Replica::start(&redis, &cognito, &flags).await);
    }
    warm_up(&fleet.iter().collect::<Vec<_>>()).await;

    let clients = fleet.iter().map(|r| r.client.clone()).collect();
    let stop = tokio::time::sleep(Duration::from_secs(3));
    let offered = offer(clients, "batch", 30.0, stop).await;

    let (first, last) = offered_span(&offered);
    let allowance = caller_burst + caller_rate * (last - first).as_secs_f64();
    let mut admitted = 0;
    for o in &offered {
        match &o.result {
            Ok(()) => admitted += 1,
            Err(status) => {
                assert_error(status, Code::ResourceExhausted, "CALLER_RATE_LIMITED", true);
            }
        }
    }
    println!(
        "per caller: {caller_rate}/s burst {caller_burst} over 3 replicas; offered {} over \
         {:.3} s; admitted {admitted}; one allowance is {allowance:.1}",
        offered.len(),
        (last - first).as_secs_f64(),
    );
    for replica in &fleet {
        replica.assert_stayed_shared().await;
    }
    // One allowance, give or take the request on the window's edge; three
    // (one per replica) would be about three times as much.
    assert!(
        admitted as f64 <= allowance + 1.0,
        "admitted {admitted}, one allowance is {allowance:.1}"
    );
    assert!(
        admitted as f64 >= allowance - caller_burst,
        "admitted {admitted}: the allowance was not given"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_at_one_replica_halves_the_rate_the_others_get_until_it_recovers() {
    let _one_fleet = ONE_FLEET.lock().await;
    let redis = TestRedis::start();
    let throttling = FakeCognito::start(Reply::AwsError {
        status: 400,
        code: "TooManyRequestsException",
    })
    .await;
    let cognito = FakeCognito::start(Reply::Ok).await;
    // One call, one throttle: no retries at A.
    let a = Replica::start(&redis, &throttling, &["--upstream-max-attempts", "1"]).await;
    // B and C hand out slots at most 100 ms ahead, so what Cognito sees
    // follows the fleet's rate within 100 ms (a slot given keeps its time).
    let queue_wait = ["--max-queue-wait", "100ms"];
    let b = Replica::start(&redis, &cognito, &queue_wait).await;
    let c = Replica::start(&redis, &cognito, &queue_wait).await;
    warm_up(&[&b, &c]).await;

    // B and C ask for three times the rate throughout: they get what the
    // fleet's budget gives.
    let (stop, stopped) = oneshot::channel::<()>();
    let load = tokio::spawn(offer(
        vec![b.client.clone(), c.client.clone()],
        "load",
        3.0 * RATE,
        async {
            let _ = stopped.await;
        },
    ));
    // Two seconds at the full rate to compare with, after the first burst.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let throttled = sign_out(a.client.clone(), "probe", "probe".into()).await;
    let status = throttled.result.expect_err("Cognito throttles A");
    assert_error(&status, Code::ResourceExhausted, "COGNITO_THROTTLED", true);
    let at = throttling.requests()[0].arrived;
    // The rate gets back 10 % of the configured rate per quiet second:
    // 90 % in the fifth second.
    tokio::time::sleep_until((at + Duration::from_secs(5)).into()).await;
    stop.send(()).expect("load still offered");
    let offered = load.await.expect("load task");

    // B+C's calls per second at Cognito, from 2 s before A's throttle.
    let arrivals = arrivals(&cognito);
    let origin = at - Duration::from_secs(2);
    let seconds: Vec<_> = (0..7)
        .map(|k| {
            let from = origin + Duration::from_secs(k);
            count_between(&arrivals, from, from + Duration::from_secs(1))
        })
        .collect();
    let before = (seconds[0] + seconds[1]) as f64 / 2.0;
    let (after, recovered) = (seconds[2] as f64, seconds[6] as f64);
    println!(
        "shared back-off: B+C at Cognito per second from 2 s before A's throttle {seconds:?}: \
         before {before}/s, first second after {after}/s, fifth {recovered}/s; \
         offered {}",
        offered.len(),
    );
    for replica in [&a, &b, &c] {
        replica.assert_stayed_shared().await;
    }
    assert!(
        (0.35..=0.65).contains(&(after / before)),
        "after A's throttle B+C got {after}/s, before {before}/s"
    );
    assert!(
        recovered >= 0.75 * before,
        "B+C got {recovered}/s in the fifth second, before {before}/s"
    );
    assert_eq!(throttling.requests().len(), 1, "A called Cognito once");
}
