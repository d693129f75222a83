//! Requests refused before Cognito: malformed fields, missing or disallowed
//! pools, oversized messages. The fake must record zero requests for each.

use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, SECRET_USERNAME, TestApp, assert_error, test_config},
};

#[tokio::test]
async fn malformed_fields_are_invalid_argument_naming_the_field_and_never_reach_cognito() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let long_username = "a".repeat(129);
    let cases = [
        ("us-east-1 TestPool", SECRET_USERNAME, "user_pool_id"),
        ("no-underscore", SECRET_USERNAME, "user_pool_id"),
        (POOL, "", "username"),
        (POOL, "alice smith", "username"),
        (POOL, "alice\u{7}", "username"),
        (POOL, long_username.as_str(), "username"),
    ];

    for (pool, username, field) in cases {
        let status = app
            .sign_out(pool, username)
            .await
            .expect_err("must be refused");

        assert_error(&status, Code::InvalidArgument, "INVALID_FIELD", false);
        let violations = status
            .get_details_bad_request()
            .expect("bad request")
            .field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, field, "for {pool:?} / {username:?}");
        assert!(!violations[0].description.contains(username) || username.is_empty());
    }
    assert!(
        fake.requests().is_empty(),
        "no upstream call for invalid input"
    );
}

#[tokio::test]
async fn an_empty_pool_without_a_default_is_invalid_argument() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;

    let status = app
        .sign_out("", SECRET_USERNAME)
        .await
        .expect_err("must be refused");

    assert_error(&status, Code::InvalidArgument, "USER_POOL_REQUIRED", false);
    let violations = status
        .get_details_bad_request()
        .expect("bad request")
        .field_violations;
    assert_eq!(violations[0].field, "user_pool_id");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn an_empty_pool_uses_the_configured_default() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.default_user_pool_id = Some(POOL.parse().expect("valid"));
    let app = TestApp::spawn(config).await;

    app.sign_out("", SECRET_USERNAME).await.expect("signed out");

    assert_eq!(fake.requests()[0].body["UserPoolId"], POOL);
}

#[tokio::test]
async fn a_pool_outside_the_allow_list_is_permission_denied_and_never_reaches_cognito() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut config = test_config(&fake.endpoint());
    config.allowed_user_pool_ids = vec![POOL.parse().expect("valid")];
    let app = TestApp::spawn(config).await;

    let status = app
        .sign_out("eu-west-1_Other", SECRET_USERNAME)
        .await
        .expect_err("refused");
    app.sign_out(POOL, SECRET_USERNAME)
        .await
        .expect("allowed pool works");

    assert_error(
        &status,
        Code::PermissionDenied,
        "USER_POOL_NOT_ALLOWED",
        false,
    );
    assert_eq!(
        fake.requests().len(),
        1,
        "only the allowed pool reached Cognito"
    );
}

#[tokio::test]
async fn an_oversized_request_is_refused_without_an_upstream_call() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;

    let status = app
        .sign_out(POOL, &"a".repeat(64 * 1024))
        .await
        .expect_err("refused");

    // tonic refuses a message over the decode limit with OUT_OF_RANGE.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn oversized_metadata_is_refused_without_an_upstream_call() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let mut request = tonic::Request::new(session_service::proto::GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: SECRET_USERNAME.into(),
    });
    let huge = "x".repeat(32 * 1024); // the default header list limit is 16 KiB
    request
        .metadata_mut()
        .insert("x-padding", huge.parse().expect("ascii"));

    let status = app
        .client
        .clone()
        .global_sign_out(request)
        .await
        .expect_err("refused");

    println!(
        "oversized metadata: {:?} {}",
        status.code(),
        status.message()
    );
    // h2 answers an oversized header list with HTTP 431 before any gRPC
    // handler runs; tonic's client maps the missing grpc-status from it.
    assert!(
        status.message().contains("431"),
        "HTTP 431 promised: {:?} {}",
        status.code(),
        status.message()
    );
    assert!(fake.requests().is_empty());
    app.sign_out(POOL, SECRET_USERNAME)
        .await
        .expect("the server still serves normal calls");
}

#[tokio::test]
async fn one_connection_gets_at_most_max_concurrent_streams_calls_at_once() {
    let delay = std::time::Duration::from_millis(150);
    let fake = FakeCognito::start(Reply::Delayed(delay, Box::new(Reply::Ok))).await;
    let mut config = test_config(&fake.endpoint());
    config.security.max_concurrent_streams = 2;
    let app = TestApp::spawn(config).await;

    // The first call brings the server's SETTINGS; before them, a client
    // does not know the limit and the server answers REFUSED_STREAM.
    app.sign_out(POOL, "warm-up@example.com")
        .await
        .expect("warm-up");
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..6 {
        let mut client = app.client.clone();
        calls.spawn(async move {
            client
                .global_sign_out(session_service::proto::GlobalSignOutRequest {
                    user_pool_id: POOL.into(),
                    username: format!("user{n}@example.com"),
                })
                .await
        });
    }
    for result in calls.join_all().await {
        result.expect("every call completes; the client queues the rest");
    }

    // A third stream opens only after one of two in flight has finished, so
    // arrivals two apart are at least one Cognito delay apart.
    let mut arrived: Vec<_> = fake.requests().iter().skip(1).map(|r| r.arrived).collect();
    arrived.sort();
    assert_eq!(arrived.len(), 6);
    for pair in arrived.windows(3) {
        assert!(
            pair[2] - pair[0] >= delay,
            "3 calls overlapped: {arrived:?}"
        );
    }
}
