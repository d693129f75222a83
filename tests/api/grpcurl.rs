//! The real grpcurl binary, with no proto files: everything it knows comes
//! from server reflection.

use std::process::Output;

use tokio::process::Command;

use crate::{
    fake_cognito::{FAKE_REQUEST_ID, FakeCognito, Reply},
    helpers::{POOL, TestApp, test_config},
    tools,
};

async fn grpcurl(args: &[&str]) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(tools::grpcurl())
        .args(args)
        .output()
        .await
        .expect("grpcurl runs");
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    assert!(
        status.success(),
        "grpcurl {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&stderr)
    );
    stdout
}

#[tokio::test]
async fn grpcurl_lists_describes_calls_and_checks_health_through_reflection() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let addr = app.addr.to_string();

    let list = grpcurl(&["-plaintext", &addr, "list"]).await;
    let describe = grpcurl(&["-plaintext", &addr, "describe", "session.v1.SessionService"]).await;
    let call = grpcurl(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"user_pool_id":"{POOL}","username":"alice"}}"#),
        &addr,
        "session.v1.SessionService/GlobalSignOut",
    ])
    .await;
    let health = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]).await;

    for service in [
        "session.v1.SessionService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(list.contains(service), "list is missing {service}: {list}");
    }
    assert!(describe.contains("rpc GlobalSignOut"), "{describe}");
    assert!(
        describe.contains("signs the user out of all devices"),
        "comments reach reflection: {describe}"
    );
    assert!(
        call.contains(FAKE_REQUEST_ID) && call.contains("signedOutAt"),
        "{call}"
    );
    assert!(health.contains("SERVING"), "{health}");
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn grpcurl_shows_error_details_for_a_refused_call() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let addr = app.addr.to_string();

    let output = Command::new(tools::grpcurl())
        .args([
            "-plaintext",
            "-d",
            r#"{"username":"alice"}"#,
            &addr,
            "session.v1.SessionService/GlobalSignOut",
        ])
        .output()
        .await
        .expect("grpcurl runs");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(
        stderr.contains("USER_POOL_REQUIRED"),
        "error details decoded: {stderr}"
    );
}

#[tokio::test]
async fn grpcurl_verifies_a_moto_token() {
    let moto = crate::moto::Moto::start().await;
    let user = crate::moto::seed_signed_in_user(&moto.client()).await;
    let app = TestApp::spawn(test_config(&moto.endpoint)).await;
    let addr = app.addr.to_string();

    let call = grpcurl(&[
        "-plaintext",
        "-d",
        &format!(
            r#"{{"token":"{}","user_pool_id":"{}","token_use":"TOKEN_USE_ACCESS"}}"#,
            user.access_token, user.pool_id
        ),
        &addr,
        "session.v1.SessionService/VerifyToken",
    ])
    .await;

    assert!(call.contains(r#""active": true"#), "{call}");
    assert!(call.contains(&user.client_id), "{call}");
    assert!(call.contains("TOKEN_USE_ACCESS"), "{call}");
}
