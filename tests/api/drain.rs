//! Rollout behaviour of the real binary: SIGTERM under load loses nothing.

use std::{
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use session_service::proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient};
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, channel, sigterm, spawn_binary, wait_for_exit},
};

const IN_FLIGHT: usize = 100;
const DRAIN_DELAY: Duration = Duration::from_secs(2);
const GRACE: Duration = Duration::from_secs(10);

/// The binary against `endpoint`, sized so that only the drain matters.
fn start_binary(endpoint: &str) -> (Child, SocketAddr) {
    let drain = format!("{}s", DRAIN_DELAY.as_secs());
    let grace = format!("{}s", GRACE.as_secs());
    let (child, addr, _logs) = spawn_binary(
        &[
            "--cognito-endpoint",
            endpoint,
            "--drain-delay",
            &drain,
            "--shutdown-grace",
            &grace,
            "--rate-limit-rps",
            "10000",
            "--rate-limit-burst",
            "1000",
            "--max-in-flight",
            "1000",
        ],
        &[],
    );
    (child, addr)
}

fn request(i: usize) -> GlobalSignOutRequest {
    GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: format!("user-{i}"),
    }
}

#[tokio::test]
async fn sigterm_under_load_turns_not_serving_completes_every_call_and_exits_zero() {
    let slow = Reply::Delayed(Duration::from_millis(300), Box::new(Reply::Ok));
    let fake = FakeCognito::start(slow).await;
    let (mut child, addr) = start_binary(&fake.endpoint());
    let client = SessionServiceClient::new(channel(addr).await);
    let mut health = HealthClient::new(channel(addr).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("status").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);
    let calls: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move { client.global_sign_out(request(i)).await })
        })
        .collect();
    fake.wait_for(IN_FLIGHT).await;

    let sigterm_at = Instant::now();
    sigterm(&child);

    let next = watch.next().await.expect("status change").expect("ok");
    let not_serving_after = sigterm_at.elapsed();
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    // Within the drain delay, new calls are still served.
    let during_drain = client.clone().global_sign_out(request(IN_FLIGHT)).await;
    let mut completed = 0;
    for call in calls {
        if call.await.expect("task").is_ok() {
            completed += 1;
        }
    }
    // After it, new calls are refused: the listener is closed.
    let refused_after = loop {
        match channel_or_refused(addr).await {
            Some(mut late) => {
                if late.global_sign_out(request(0)).await.is_err() {
                    break sigterm_at.elapsed();
                }
            }
            None => break sigterm_at.elapsed(),
        }
        tokio::task::yield_now().await;
        assert!(
            sigterm_at.elapsed() < DRAIN_DELAY + GRACE,
            "never stopped accepting"
        );
    };
    let status = wait_for_exit(&mut child, DRAIN_DELAY + GRACE);
    let exited_after = sigterm_at.elapsed();

    let lost = IN_FLIGHT - completed;
    println!(
        "drain: in flight {IN_FLIGHT}, completed {completed}, lost {lost}; NOT_SERVING after \
         {not_serving_after:?}; refused new calls after {refused_after:?}; exit {status} after {exited_after:?}"
    );
    assert_eq!(lost, 0);
    assert!(
        during_drain.is_ok(),
        "a call during the drain delay: {during_drain:?}"
    );
    assert!(
        not_serving_after < DRAIN_DELAY,
        "health flipped only after {not_serving_after:?}"
    );
    assert!(
        refused_after >= DRAIN_DELAY,
        "refused too early: {refused_after:?}"
    );
    assert_eq!(status.code(), Some(0));
}

/// A fresh connection to `addr`, or `None` when it is refused.
async fn channel_or_refused(
    addr: SocketAddr,
) -> Option<SessionServiceClient<tonic::transport::Channel>> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
        .ok()
        .map(SessionServiceClient::new)
}
