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
async fn row7_resets_mid_body_are_cancelled_calls_at_info_not_server_errors() {
    const PARKED: usize = 20;
    let service = Service::start(None, &[]).await;
    let (mut send, _driver) = h2_connect(service.addr, &h2::client::Builder::new()).await;
    // Streams whose handlers are reading a body that has not ended: HEADERS
    // and 2 bytes of the 5-byte gRPC prefix.
    let mut parked = Vec::new();
    for _ in 0..PARKED {
        send = send.ready().await.expect("ready");
        let (response, mut body) = send
            .send_request(grpc_request(service.addr), false)
            .expect("send");
        body.send_data(bytes::Bytes::from_static(&[0, 0]), false)
            .expect("partial body");
        parked.push((response, body));
    }
    // The server dispatches a connection's streams in order, so once a
    // complete call on it is answered, every parked handler is reading.
    send = send.ready().await.expect("ready");
    let (response, mut body) = send
        .send_request(grpc_request(service.addr), false)
        .expect("send");
    body.send_data(grpc_message(), true).expect("body");
    let answered = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .expect("the complete call is answered")
        .expect("a response");
    assert_eq!(answered.status(), 200);
    for (_response, body) in &mut parked {
        body.send_reset(h2::Reason::CANCEL);
    }
    let cancelled =
        |l: &str| l.contains("\"target\":\"access\"") && l.contains("\"code\":\"CANCELLED\"");
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while service.log_lines(cancelled).len() < PARKED
            && service
                .log_lines(|l| l.contains("\"level\":\"ERROR\""))
                .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Give a stray late line the chance to appear before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancelled = service.log_lines(cancelled);
    let at_info = cancelled
        .iter()
        .filter(|l| l.contains("\"level\":\"INFO\""))
        .count();
    let errors = service.log_lines(|l| l.contains("\"level\":\"ERROR\""));
    let metrics = metrics_text(service.metrics_addr).await;
    let internal = metrics.contains("code=\"INTERNAL\"") || metrics.contains("code=\"UNKNOWN\"");
    figure(
        7,
        &format!(
            "{PARKED} streams reset mid-body: {} CANCELLED access lines ({at_info} at info), {} ERROR lines, INTERNAL/UNKNOWN counted: {internal}",
            cancelled.len(),
            errors.len(),
        ),
    );
    assert!(
        errors.is_empty(),
        "client resets were logged as errors: {:?}",
        &errors[..errors.len().min(3)]
    );
    assert_eq!(at_info, PARKED, "CANCELLED access lines at info");
    assert_eq!(cancelled.len(), PARKED, "CANCELLED access lines");
    assert!(!internal, "client resets were counted as server faults");
}

/// `grpc-timeout: 1n` sent as is (tonic's client would refuse it locally),
/// and calls whose deadline passes while they wait for the rate budget:
/// the caller's outcome (DEADLINE_EXCEEDED or RATE_LIMITED, at info), never
/// a Cognito attempt, an UPSTREAM_TIMEOUT or an ERROR line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row7_expired_and_queued_out_deadlines_are_the_callers_outcome() {
    const QUEUED: usize = 6;
    let service = Service::start(
        None,
        &[
            ("SESSION_RATE_LIMIT_RPS", "1"),
            ("SESSION_RATE_LIMIT_BURST", "1"),
        ],
    )
    .await;
    let (mut send, _driver) = h2_connect(service.addr, &h2::client::Builder::new()).await;
    let mut codes = Vec::new();
    let mut timeouts = vec!["1n"];
    timeouts.extend(std::iter::repeat_n("200m", QUEUED));
    for timeout in timeouts {
        let mut request = grpc_request(service.addr);
        request
            .headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static(timeout));
        send = send.ready().await.expect("ready");
        let (response, mut body) = send.send_request(request, false).expect("send");
        body.send_data(grpc_message(), true).expect("body");
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("an answer")
            .expect("a response");
        let mut headers = response.headers().clone();
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let _ = chunk;
        }
        if let Ok(Some(trailers)) = body.trailers().await {
            headers.extend(trailers);
        }
        let status = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        codes.push((timeout, status("grpc-status"), status("grpc-message")));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = metrics_text(service.metrics_addr).await;
    let errors = service.log_lines(|l| l.contains("\"level\":\"ERROR\""));
    let upstream_timeouts = service.log_lines(|l| l.contains("UPSTREAM_TIMEOUT"));
    let cognito_timeouts = metrics
        .lines()
        .any(|l| l.starts_with("session_cognito_requests_total{outcome=\"Timeout\"}"));
    let reached = service.fake.requests().len();
    figure(
        7,
        &format!(
            "grpc-timeout 1n then {QUEUED} x 200m at 1 rps, burst 1: (timeout, grpc-status, message) {codes:?}; Cognito requests {reached}; {} ERROR lines; {} UPSTREAM_TIMEOUT lines; counted as a Cognito Timeout: {cognito_timeouts}",
            errors.len(),
            upstream_timeouts.len()
        ),
    );
    let (_, expired, _) = &codes[0];
    assert!(
        expired == "4" || expired == "1",
        "1n: grpc-status {expired}, expected DEADLINE_EXCEEDED (4) or CANCELLED (1)"
    );
    assert!(
        errors.is_empty(),
        "expired deadlines were logged as errors: {:?}",
        &errors[..errors.len().min(3)]
    );
    assert!(
        upstream_timeouts.is_empty(),
        "expired deadlines were upstream timeouts: {upstream_timeouts:?}"
    );
    assert!(reached <= 1, "{reached} calls reached Cognito at 1 rps");
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
