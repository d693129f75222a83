//! Rows 7 and 8: what single requests can make the service log, count and
//! do. A reset loop must not fill the log with errors, a deadline that has
//! passed must not count as a Cognito attempt, and what is not a gRPC
//! request must not reach the handler.

use std::time::Duration;

use session_service::proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient};

use super::{
    Service, figure,
    retirement::{grpc_message, grpc_request, h2_connect},
};
use crate::helpers::{POOL, channel, metrics_text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row7_resets_and_expired_deadlines_are_cancelled_calls_not_server_errors() {
    const RESETS: usize = 200;
    let service = Service::start(None, &[]).await;
    // h2 answers more than 20 resets it has not yet accepted with GOAWAY
    // (rapid reset); how many that is depends on how loaded the machine
    // is, so a connection the server ends is replaced and the loop goes on.
    let builder = h2::client::Builder::new();
    let (mut send, mut driver) = h2_connect(service.addr, &builder).await;
    let mut goaways = 0;
    let mut resets = 0;
    while resets < RESETS {
        let sent = match send.clone().ready().await {
            Ok(ready) => {
                send = ready;
                send.send_request(grpc_request(service.addr), false)
            }
            Err(error) => Err(error),
        };
        match sent {
            Ok((_response, mut body)) => {
                body.send_reset(h2::Reason::CANCEL);
                resets += 1;
            }
            Err(error) => {
                assert!(
                    error.is_go_away(),
                    "only a GOAWAY may end the loop's connection: {error}"
                );
                goaways += 1;
                assert!(goaways < RESETS, "the server ends every connection at once");
                driver.abort();
                (send, driver) = h2_connect(service.addr, &builder).await;
            }
        }
    }
    // A call with a deadline of one nanosecond: over before it starts.
    let mut client = SessionServiceClient::new(channel(service.addr).await);
    let mut request = tonic::Request::new(GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: "alice".into(),
    });
    request.set_timeout(Duration::from_nanos(1));
    let expired = client.global_sign_out(request).await.expect_err("too late");
    // The log and metrics settle once the server has seen every reset.
    let metrics = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = metrics_text(service.metrics_addr).await;
            if text.contains("code=\"DEADLINE_EXCEEDED\"") || text.contains("code=\"CANCELLED\"") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_default();
    let errors = service.log_lines(|l| l.contains("\"level\":\"ERROR\""));
    let log_bytes = service.log_bytes();
    let internal = metrics.contains("code=\"INTERNAL\"");
    let cognito_timeouts = metrics
        .lines()
        .any(|l| l.starts_with("session_cognito_requests_total{outcome=\"Timeout\"}"));
    figure(
        7,
        &format!(
            "{RESETS} HEADERS+RST_STREAM ({goaways} GOAWAYs for rapid reset on the way): {} ERROR lines, {log_bytes} bytes of log in all, code=\"INTERNAL\" counted: {internal}; grpc-timeout 1n: {:?}, Cognito requests {}, counted as a Cognito Timeout: {cognito_timeouts}",
            errors.len(),
            expired.code(),
            service.fake.requests().len()
        ),
    );
    assert!(
        errors.is_empty(),
        "client resets were logged as errors: {:?}",
        &errors[..errors.len().min(3)]
    );
    assert!(!internal, "client resets were counted as INTERNAL");
    assert!(
        log_bytes < RESETS * 1024,
        "{log_bytes} bytes of log for {RESETS} resets"
    );
    assert_eq!(
        service.fake.requests().len(),
        0,
        "an expired call reached Cognito"
    );
    assert!(
        !cognito_timeouts,
        "an expired call counted as a Cognito timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row8_requests_that_are_not_grpc_never_reach_the_handler() {
    let service = Service::start(None, &[]).await;
    let (mut send, _driver) = h2_connect(service.addr, &h2::client::Builder::new()).await;
    let path = format!(
        "http://{}/session.v1.SessionService/GlobalSignOut",
        service.addr
    );
    let mut answers = Vec::new();
    for (method, content_type) in [
        ("POST", Some("text/plain")),
        ("POST", None),
        ("GET", Some("application/grpc")),
        ("PUT", Some("application/grpc")),
    ] {
        let mut request = http::Request::builder().method(method).uri(&path);
        if let Some(value) = content_type {
            request = request.header("content-type", value);
        }
        let request = request.header("te", "trailers").body(()).expect("request");
        send = send.ready().await.expect("ready");
        let (response, mut body) = send.send_request(request, false).expect("send");
        let _ = body.send_data(grpc_message(), true);
        let status = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("an answer")
            .expect("a response")
            .status();
        answers.push((method, content_type, status.as_u16()));
    }
    let signed_out = service.fake.requests().len();
    figure(
        8,
        &format!("{answers:?}; sign-outs that reached Cognito: {signed_out}"),
    );
    assert_eq!(
        signed_out, 0,
        "a request that is not gRPC signed a user out"
    );
    for (method, content_type, status) in answers {
        let expected = if method == "POST" { 415 } else { 405 };
        assert_eq!(status, expected, "{method} {content_type:?}");
    }
    // Without `te: trailers` a gRPC request is still served (see request_guard).
    let request = http::Request::post(&path)
        .header("content-type", "application/grpc")
        .body(())
        .expect("request");
    send = send.ready().await.expect("ready");
    let (response, mut body) = send.send_request(request, false).expect("send");
    body.send_data(grpc_message(), true).expect("body");
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row7_repeated_identical_error_lines_are_rate_limited_and_counted() {
    const CALLS: usize = 60;
    let service = Service::start(
        None,
        &[
            ("SESSION_UPSTREAM_MAX_ATTEMPTS", "1"),
            ("SESSION_RATE_LIMIT_RPS", "1000"),
            ("SESSION_RATE_LIMIT_BURST", "1000"),
        ],
    )
    .await;
    service
        .fake
        .set_reply(crate::fake_cognito::Reply::AwsError {
            status: 500,
            code: "InternalErrorException",
        });
    let channel = channel(service.addr).await;
    for _ in 0..CALLS {
        let _ = SessionServiceClient::new(channel.clone())
            .global_sign_out(GlobalSignOutRequest {
                user_pool_id: POOL.into(),
                username: "alice".into(),
            })
            .await;
    }
    let suppressed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = metrics_text(service.metrics_addr).await;
            if let Some(n) = text.lines().find_map(|l| {
                l.strip_prefix("session_log_lines_suppressed_total ")?
                    .parse::<u64>()
                    .ok()
            }) && n > 0
            {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or(0);
    let failure_lines = service
        .log_lines(|l| l.contains("\"sign-out failed\""))
        .len();
    figure(
        7,
        &format!(
            "{CALLS} calls failing the same way: {failure_lines} 'sign-out failed' ERROR lines written, {suppressed} suppressed (counted)"
        ),
    );
    assert!(
        failure_lines < CALLS / 2,
        "{failure_lines} identical error lines for {CALLS} calls"
    );
    assert!(suppressed > 0, "suppressed lines are not counted");
}
