//! Calls that end without an answer from the handler: the client resets the
//! stream, or the path is not one of ours. Each is still counted and logged
//! once, with a bounded method label.

use std::time::Duration;

use session_service::proto::{GlobalSignOutRequest, GlobalSignOutResponse};
use tonic::{Code, Request, codegen::http::uri::PathAndQuery};

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, TestApp, channel, metrics_text, test_config},
};

/// The count of `session_rpc_duration_seconds` for one method and code.
async fn rpc_count(app: &TestApp, method: &str, code: &str) -> Option<u64> {
    let prefix =
        format!("session_rpc_duration_seconds_count{{code=\"{code}\",method=\"{method}\"}} ");
    metrics_text(app.metrics_addr)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
}

#[tokio::test]
async fn a_call_the_client_resets_is_still_counted_as_cancelled() {
    let slow = Reply::Delayed(Duration::from_secs(2), Box::new(Reply::Ok));
    let fake = FakeCognito::start(slow).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let call = tokio::spawn({
        let mut client = app.client.clone();
        async move {
            client
                .global_sign_out(GlobalSignOutRequest {
                    user_pool_id: POOL.into(),
                    username: "alice".into(),
                })
                .await
        }
    });
    fake.wait_for(1).await;

    // Dropping the client's call resets its HTTP/2 stream.
    call.abort();

    let counted = async {
        while rpc_count(&app, "GlobalSignOut", "CANCELLED")
            .await
            .is_none()
        {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), counted)
        .await
        .expect("the reset call is counted");
    assert_eq!(rpc_count(&app, "GlobalSignOut", "CANCELLED").await, Some(1));
}

#[tokio::test]
async fn a_path_the_proto_does_not_declare_is_labelled_unknown() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let mut grpc = tonic::client::Grpc::new(channel(app.addr).await);

    for bogus in ["Bogus", "Bogus2", "globalsignout"] {
        grpc.ready().await.expect("ready");
        let path = PathAndQuery::from_maybe_shared(format!("/session.v1.SessionService/{bogus}"))
            .expect("path");
        let status = grpc
            .unary::<_, GlobalSignOutResponse, _>(
                Request::new(GlobalSignOutRequest::default()),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .expect_err("no such method");
        assert_eq!(status.code(), Code::Unimplemented);
    }

    assert_eq!(rpc_count(&app, "unknown", "UNIMPLEMENTED").await, Some(3));
    let text = metrics_text(app.metrics_addr).await;
    assert!(
        !text.contains("Bogus"),
        "no label minted by the caller:\n{text}"
    );
    assert!(fake.requests().is_empty());
}
