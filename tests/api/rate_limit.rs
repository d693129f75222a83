//! Overload behaviour against a fake Cognito that records arrival times:
//! the shared budget, per-caller fairness, coalescing, throttling feedback
//! and the in-flight bound.

use std::time::{Duration, Instant};

use session_service::{identity::CallerId, proto::session_service_client::SessionServiceClient};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, TestApp, assert_error, max_in_window, metrics_text, percentile, test_config},
};

type CallResult = Result<String, Status>;
type Client = SessionServiceClient<Channel>;

/// One sign-out as `caller`, answering the request id or the status.
async fn sign_out_as(mut client: Client, caller: &str, username: &str) -> CallResult {
    let mut request = Request::new(session_service::proto::GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: username.into(),
    });
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().expect("ascii caller id"));
    client
        .global_sign_out(request)
        .await
        .map(|response| response.into_inner().aws_request_id)
}

/// Offers `rate` requests per second for `span` as `caller`, each for a
/// different user; returns each result with its latency.
async fn offer(
    app: &TestApp,
    caller: &str,
    rate: u32,
    span: Duration,
) -> Vec<(CallResult, Duration)> {
    let start = tokio::time::Instant::now();
    let count = (rate as f64 * span.as_secs_f64()) as u32;
    let calls: Vec<_> = (0..count)
        .map(|i| {
            let (client, caller) = (app.client.clone(), caller.to_owned());
            let at = start + Duration::from_secs_f64(f64::from(i) / f64::from(rate));
            tokio::spawn(async move {
                // Pacing the offered load, not waiting for a result.
                tokio::time::sleep_until(at).await;
                let sent = Instant::now();
                let result = sign_out_as(client, &caller, &format!("user-{caller}-{i}")).await;
                (result, sent.elapsed())
            })
        })
        .collect();
    let mut results = Vec::with_capacity(calls.len());
    for call in calls {
        results.push(call.await.expect("call task"));
    }
    results
}

#[tokio::test]
async fn ten_times_the_rate_never_exceeds_the_budget_at_cognito_and_rejects_at_once() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.rate_limit_rps = 20.0;
    config.rate_limit_burst = 5;
    config.max_queue_wait = Duration::from_secs(2);
    let app = TestApp::spawn(config).await;
    // One call first, so the SDK's lazy first-use work (connection, signing
    // setup) does not delay the burst's arrivals and skew the windows.
    sign_out_as(app.client.clone(), "load", "warm-up")
        .await
        .expect("warm-up");

    let results = offer(&app, "load", 200, Duration::from_secs(3)).await;

    let admitted = results.iter().filter(|(r, _)| r.is_ok()).count();
    let mut rejection_latency = Vec::new();
    for (result, latency) in &results {
        if let Err(status) = result {
            assert_error(status, Code::ResourceExhausted, "RATE_LIMITED", true);
            let delay = status.get_details_retry_info().and_then(|r| r.retry_delay);
            assert!(delay.is_some_and(|d| d > Duration::ZERO), "{status:?}");
            rejection_latency.push(*latency);
        }
    }
    rejection_latency.sort();
    let arrivals: Vec<_> = fake.requests().iter().map(|r| r.arrived).collect();
    let max_per_second = max_in_window(&arrivals, Duration::from_secs(1));
    let (p50, p99) = (
        percentile(&rejection_latency, 0.5),
        percentile(&rejection_latency, 0.99),
    );
    println!(
        "overload: offered {} at 200/s for 3 s against 20/s burst 5; admitted {admitted}; \
         rejected {}; Cognito max per 1-s window {max_per_second}; rejection latency p50 {p50:?} p99 {p99:?}",
        results.len(),
        rejection_latency.len(),
    );
    assert_eq!(
        arrivals.len(),
        admitted + 1,
        "every admitted call (and the warm-up) reached Cognito once"
    );
    assert!(
        max_per_second <= 25,
        "Cognito saw {max_per_second} calls in one second"
    );
    // "At once" rather than after the 2 s queue wait; generous for slow machines.
    assert!(
        p99 < Duration::from_secs(1),
        "rejections took up to {p99:?}"
    );
    assert!(admitted > 0 && !rejection_latency.is_empty());
}

#[tokio::test]
async fn a_noisy_caller_at_ten_times_its_share_does_not_hurt_a_quiet_one() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.rate_limit_rps = 20.0;
    config.per_caller_rps = Some(5.0);
    // Self-declared ids have allowances of their own only when named.
    config.per_caller_rps_overrides = ["noisy", "quiet"]
        .map(|id| (CallerId::parse(id).expect("caller id"), 5.0))
        .to_vec();
    let app = TestApp::spawn(config).await;

    let (noisy, quiet) = tokio::join!(
        offer(&app, "noisy", 50, Duration::from_secs(2)),
        offer(&app, "quiet", 2, Duration::from_secs(2)),
    );

    assert!(
        quiet.iter().all(|(r, _)| r.is_ok()),
        "quiet caller: {quiet:?}"
    );
    let refused: Vec<_> = noisy.iter().filter_map(|(r, _)| r.as_ref().err()).collect();
    assert!(!refused.is_empty());
    for status in refused {
        assert_error(status, Code::ResourceExhausted, "CALLER_RATE_LIMITED", true);
    }
}

/// A server at `rate`/s, burst 1, whose only burst permit a warm-up call
/// has taken; from then on the fake holds every call for 1 s.
async fn spent_burst_then_slow_cognito(rate: f64) -> (FakeCognito, TestApp) {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.rate_limit_rps = rate;
    config.rate_limit_burst = 1;
    let app = TestApp::spawn(config).await;
    sign_out_as(app.client.clone(), "svc", "warm-up")
        .await
        .expect("takes the only burst permit");
    fake.set_reply(Reply::Delayed(Duration::from_secs(1), Box::new(Reply::Ok)));
    (fake, app)
}

/// Waits (at most 10 s) until `/metrics` shows `depth` requests queued.
async fn wait_until_queued(app: &TestApp, depth: usize) {
    let expected = format!("session_rate_limit_queue_depth {depth}");
    let queued = async {
        while !metrics_text(app.metrics_addr).await.contains(&expected) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .expect("the request queues");
}

#[tokio::test]
async fn queued_duplicates_share_one_call_but_not_one_already_in_flight() {
    let (fake, app) = spent_burst_then_slow_cognito(1.0).await;

    // 50 sign-outs of one user, all queued behind the next permit (1 s away).
    let joined: Vec<_> = (0..50)
        .map(|_| {
            let client = app.client.clone();
            tokio::spawn(async move { sign_out_as(client, "svc", "alice").await })
        })
        .collect();
    let alice_calls = || {
        fake.requests()
            .iter()
            .filter(|r| r.body["Username"] == "alice")
            .count()
    };
    fake.wait_for(2).await;
    // That call is in flight now (the fake holds it for 1 s): a new
    // request for alice must not join it. It reaches the service (queued
    // for the next permit) while the fake still holds the first call.
    let late = tokio::spawn(sign_out_as(app.client.clone(), "svc", "alice"));
    wait_until_queued(&app, 1).await;
    assert!(
        joined.iter().all(|call| !call.is_finished()),
        "the first call was still held when the late request queued"
    );

    let mut ids = Vec::new();
    for call in joined {
        ids.push(call.await.expect("task").expect("signed out"));
    }
    let late_id = late.await.expect("task").expect("signed out");
    ids.dedup();
    assert_eq!(ids.len(), 1, "all 50 got the same outcome: {ids:?}");
    assert_ne!(late_id, ids[0], "the late request made its own call");
    assert_eq!(alice_calls(), 2);
}

#[tokio::test]
async fn cognito_throttling_slows_the_budget_and_ends_in_cognito_throttled() {
    let throttled = Reply::AwsError {
        status: 400,
        code: "TooManyRequestsException",
    };
    let fake = FakeCognito::start(throttled).await;
    let mut config = test_config(&fake.endpoint());
    config.rate_limit_rps = 5.0;
    config.rate_limit_burst = 1;
    config.upstream_max_attempts = 3;
    let app = TestApp::spawn(config).await;
    let mut request = Request::new(session_service::proto::GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: "alice".into(),
    });
    request.set_timeout(Duration::from_secs(5));

    let status = app
        .client
        .clone()
        .global_sign_out(request)
        .await
        .expect_err("throttled");

    assert_error(&status, Code::ResourceExhausted, "COGNITO_THROTTLED", true);
    let arrivals: Vec<_> = fake.requests().iter().map(|r| r.arrived).collect();
    assert_eq!(arrivals.len(), 3, "all attempts fit the 5 s deadline");
    // At 5/s permits are 200 ms apart; after the first throttle the budget
    // halves to 2.5/s, so the third attempt comes 400 ms after the second.
    let gap = arrivals[2] - arrivals[1];
    assert!(gap >= Duration::from_millis(300), "no slow-down: {gap:?}");
}

#[tokio::test]
async fn calls_beyond_max_in_flight_are_shed() {
    let slow = Reply::Delayed(Duration::from_millis(500), Box::new(Reply::Ok));
    let fake = FakeCognito::start(slow).await;
    let mut config = test_config(&fake.endpoint());
    config.rate_limit_rps = 1000.0;
    config.rate_limit_burst = 100;
    config.max_in_flight = 2;
    let app = TestApp::spawn(config).await;

    let calls: Vec<_> = (0..5)
        .map(|i| {
            let client = app.client.clone();
            tokio::spawn(async move { sign_out_as(client, "svc", &format!("user-{i}")).await })
        })
        .collect();
    let mut shed = 0;
    for call in calls {
        if let Err(status) = call.await.expect("task") {
            assert_error(&status, Code::ResourceExhausted, "OVERLOADED", true);
            shed += 1;
        }
    }

    assert_eq!(shed, 3);
    assert_eq!(fake.requests().len(), 2);
}

/// A sign-out of alice as `caller` with `timeout` as its grpc-timeout.
async fn sign_out_within(client: Client, caller: &str, timeout: Duration) -> CallResult {
    let mut request = Request::new(session_service::proto::GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: "alice".into(),
    });
    request.set_timeout(timeout);
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().expect("ascii caller id"));
    let mut client = client;
    client
        .global_sign_out(request)
        .await
        .map(|response| response.into_inner().aws_request_id)
}

#[tokio::test]
async fn each_joiner_keeps_its_own_deadline() {
    // The next permit is 2 s after the warm-up; Cognito then takes 1 s.
    let (fake, app) = spent_burst_then_slow_cognito(0.5).await;

    // First in: enough time for the permit, not for Cognito's answer.
    let short = tokio::spawn(sign_out_within(
        app.client.clone(),
        "web",
        Duration::from_millis(2500),
    ));
    wait_until_queued(&app, 1).await;
    // Joins with plenty of time: gets the sign-out done.
    let long = tokio::spawn(sign_out_within(
        app.client.clone(),
        "batch",
        Duration::from_secs(10),
    ));
    // Cannot wait for the permit at all: refused at once, not left to time out.
    let asked = Instant::now();
    let hasty = sign_out_within(app.client.clone(), "cli", Duration::from_millis(500)).await;
    let hasty_latency = asked.elapsed();

    // RATE_LIMITED is decided at arrival; waiting would have ended in
    // DEADLINE_EXCEEDED. The latency is printed, not asserted: speed never
    // fails a test (the flow's unit test asserts "at once" on paused time).
    println!("the hasty joiner was refused after {hasty_latency:?}");
    let hasty = hasty.expect_err("its deadline is before the permit");
    assert_error(&hasty, Code::ResourceExhausted, "RATE_LIMITED", true);
    long.await
        .expect("task")
        .expect("the long joiner is not cut short by the first caller's deadline");
    let short = short
        .await
        .expect("task")
        .expect_err("no time for the answer");
    assert_eq!(short.code(), Code::DeadlineExceeded, "{short:?}");
    assert_eq!(fake.requests().len(), 2, "warm-up and one call for alice");
}
