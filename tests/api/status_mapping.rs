//! One test per row of the status table, against a fake Cognito over HTTP.

use std::time::{Duration, Instant};

use aws_credential_types::provider::{ProvideCredentials, error::CredentialsError, future};
use aws_sdk_cognitoidentityprovider::config::SharedCredentialsProvider;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    fake_cognito::{FAKE_REQUEST_ID, FakeCognito, Reply, ok_request_id},
    helpers::{POOL, SECRET_USERNAME, TestApp, assert_error, sdk_config_with, test_config},
};

/// Starts a fake answering `reply` and a server on it with `attempts`.
async fn app_against(reply: Reply, attempts: u32) -> (TestApp, FakeCognito) {
    let fake = FakeCognito::start(reply).await;
    let mut config = test_config(&fake.endpoint());
    config.upstream_max_attempts = attempts;
    (TestApp::spawn(config).await, fake)
}

/// Runs one sign-out against a fake that always answers `cognito_code`
/// and checks the status, its details, and how many attempts were made:
/// all of them for retryable errors, one otherwise.
async fn assert_cognito_error(
    reply: (u16, &'static str),
    attempts: u32,
    code: Code,
    reason: &str,
    retryable: bool,
) {
    let (http_status, cognito_code) = reply;
    let reply = Reply::AwsError {
        status: http_status,
        code: cognito_code,
    };
    let (app, fake) = app_against(reply, attempts).await;

    let status = app
        .sign_out(POOL, SECRET_USERNAME)
        .await
        .expect_err("must fail");

    assert_error(&status, code, reason, retryable);
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.metadata["aws_request_id"], FAKE_REQUEST_ID);
    assert_eq!(info.metadata["cognito_error_code"], cognito_code);
    let expected_attempts = if retryable { attempts } else { 1 };
    assert_eq!(
        fake.requests().len(),
        expected_attempts as usize,
        "attempts made for {cognito_code}"
    );
}

/// A non-retryable Cognito error row.
async fn assert_cognito_error_maps_to(
    http_status: u16,
    cognito_code: &'static str,
    code: Code,
    reason: &str,
) {
    assert_cognito_error((http_status, cognito_code), 3, code, reason, false).await;
}

#[tokio::test]
async fn success_returns_the_request_id_and_sends_the_documented_request() {
    let (app, fake) = app_against(Reply::Ok, 3).await;

    let response = app
        .sign_out(POOL, SECRET_USERNAME)
        .await
        .expect("ok")
        .into_inner();

    assert_eq!(response.aws_request_id, ok_request_id(1));
    assert!(response.signed_out_at.is_some());
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        request.target.as_deref(),
        Some("AWSCognitoIdentityProviderService.AdminUserGlobalSignOut")
    );
    assert_eq!(
        request.content_type.as_deref(),
        Some("application/x-amz-json-1.1")
    );
    assert!(request.signed, "request carries a SigV4 signature");
    assert_eq!(
        request.body,
        serde_json::json!({ "UserPoolId": POOL, "Username": SECRET_USERNAME })
    );
}

#[tokio::test]
async fn user_not_found_is_not_found() {
    assert_cognito_error_maps_to(
        400,
        "UserNotFoundException",
        Code::NotFound,
        "USER_NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn resource_not_found_is_user_pool_not_found() {
    assert_cognito_error_maps_to(
        400,
        "ResourceNotFoundException",
        Code::NotFound,
        "USER_POOL_NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn invalid_parameter_is_invalid_argument() {
    assert_cognito_error_maps_to(
        400,
        "InvalidParameterException",
        Code::InvalidArgument,
        "COGNITO_INVALID_PARAMETER",
    )
    .await;
}

#[tokio::test]
async fn not_authorized_is_permission_denied() {
    assert_cognito_error_maps_to(
        400,
        "NotAuthorizedException",
        Code::PermissionDenied,
        "COGNITO_NOT_AUTHORIZED",
    )
    .await;
}

#[tokio::test]
async fn operation_not_enabled_is_failed_precondition() {
    assert_cognito_error_maps_to(
        400,
        "OperationNotEnabledException",
        Code::FailedPrecondition,
        "COGNITO_OPERATION_NOT_ENABLED",
    )
    .await;
}

#[tokio::test]
async fn aws_identity_errors_are_internal_upstream_auth_failed() {
    for code in [
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
    ] {
        assert_cognito_error_maps_to(400, code, Code::Internal, "UPSTREAM_AUTH_FAILED").await;
    }
}

#[tokio::test]
async fn an_unknown_cognito_error_is_internal_unexpected() {
    assert_cognito_error_maps_to(
        400,
        "BrandNewException",
        Code::Internal,
        "COGNITO_UNEXPECTED_ERROR",
    )
    .await;
}

#[tokio::test]
async fn throttling_after_the_sdk_retries_is_resource_exhausted_and_retryable() {
    let reply = (400, "TooManyRequestsException");
    assert_cognito_error(reply, 2, Code::ResourceExhausted, "COGNITO_THROTTLED", true).await;
}

#[tokio::test]
async fn internal_error_500_is_retried_then_unavailable() {
    let reply = (500, "InternalErrorException");
    assert_cognito_error(reply, 3, Code::Unavailable, "COGNITO_INTERNAL_ERROR", true).await;
}

#[tokio::test]
async fn sdk_attempt_timeouts_are_retried_then_deadline_exceeded() {
    let slow = Reply::Delayed(Duration::from_secs(30), Box::new(Reply::Ok));
    let fake = FakeCognito::start(slow).await;
    let mut config = test_config(&fake.endpoint());
    config.upstream_max_attempts = 2;
    config.upstream_attempt_timeout = Duration::from_millis(200);
    config.upstream_timeout = Duration::from_secs(20);
    let app = TestApp::spawn(config).await;

    let status = app
        .sign_out(POOL, SECRET_USERNAME)
        .await
        .expect_err("must time out");

    assert_error(&status, Code::DeadlineExceeded, "UPSTREAM_TIMEOUT", false);
    assert_eq!(
        fake.requests().len(),
        2,
        "each of the 2 attempts reached the fake"
    );
}

#[tokio::test]
async fn a_caller_deadline_shorter_than_cognito_gives_deadline_exceeded_promptly() {
    let slow = Reply::Delayed(Duration::from_secs(30), Box::new(Reply::Ok));
    let fake = FakeCognito::start(slow).await;
    let mut config = test_config(&fake.endpoint());
    config.upstream_attempt_timeout = Duration::from_secs(20);
    config.upstream_timeout = Duration::from_secs(20);
    let app = TestApp::spawn(config).await;
    let mut request = tonic::Request::new(session_service::proto::GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: SECRET_USERNAME.into(),
    });
    request.set_timeout(Duration::from_millis(300));

    let started = Instant::now();
    let status = app
        .client
        .clone()
        .global_sign_out(request)
        .await
        .expect_err("must time out");

    assert_error(&status, Code::DeadlineExceeded, "UPSTREAM_TIMEOUT", false);
    // Not a speed test: only "well before the fake's 30 s answer".
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn connection_refused_is_unavailable_unreachable() {
    let unused = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", unused.local_addr().expect("addr"));
    drop(unused);
    let mut config = test_config(&endpoint);
    config.upstream_max_attempts = 2;
    let app = TestApp::spawn(config).await;

    let status = app
        .sign_out(POOL, SECRET_USERNAME)
        .await
        .expect_err("must fail");

    assert_error(&status, Code::Unavailable, "COGNITO_UNREACHABLE", true);
}

#[tokio::test]
async fn an_unparseable_error_reply_is_unavailable_bad_response() {
    let (app, _fake) = app_against(
        Reply::Raw {
            status: 502,
            content_type: "text/html",
            body: "<html>Bad Gateway</html>",
        },
        1,
    )
    .await;

    let status = app
        .sign_out(POOL, SECRET_USERNAME)
        .await
        .expect_err("must fail");

    assert_error(&status, Code::Unavailable, "COGNITO_BAD_RESPONSE", true);
}

#[derive(Debug)]
struct NoCredentials;

impl ProvideCredentials for NoCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(Err(CredentialsError::not_loaded(
            "no credentials in the chain",
        )))
    }
}

#[tokio::test]
async fn missing_credentials_are_internal_upstream_auth_failed_with_no_request_sent() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let sdk_config = sdk_config_with(SharedCredentialsProvider::new(NoCredentials));
    let app = TestApp::spawn_with(test_config(&fake.endpoint()), sdk_config).await;

    let status = app
        .sign_out(POOL, SECRET_USERNAME)
        .await
        .expect_err("must fail");

    assert_error(&status, Code::Internal, "UPSTREAM_AUTH_FAILED", false);
    assert!(fake.requests().is_empty());
}
