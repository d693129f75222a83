//! Health and graceful shutdown.

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, SECRET_USERNAME, TestApp, channel, test_config},
};

const API: &str = "session.v1.SessionService";

#[tokio::test]
async fn the_server_and_the_api_report_serving_once_ready() {
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let mut health = HealthClient::new(channel(app.addr).await);

    for service in ["", API] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn shutdown_reports_not_serving_and_lets_in_flight_calls_finish() {
    let slow = Reply::Delayed(Duration::from_millis(500), Box::new(Reply::Ok));
    let fake = FakeCognito::start(slow).await;
    let mut app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let mut health = HealthClient::new(channel(app.addr).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: API.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("first status").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);
    let client = app.client.clone();
    let in_flight = tokio::spawn(async move {
        let mut client = client;
        client
            .global_sign_out(session_service::proto::GlobalSignOutRequest {
                user_pool_id: POOL.into(),
                username: SECRET_USERNAME.into(),
            })
            .await
    });
    fake.wait_for(1).await;

    let server = app.shut_down();

    let next = watch.next().await.expect("status change").expect("ok");
    assert_eq!(next.status(), ServingStatus::NotServing);
    let result = in_flight.await.expect("task");
    assert!(result.is_ok(), "in-flight call finished: {result:?}");
    // The open Watch stream would hold tonic's drain forever; the grace
    // (5 s in tests) bounds it and the server task still ends.
    drop(watch);
    server.await.expect("server task ends");
}

#[tokio::test]
async fn reflection_v1_lists_the_api_and_health() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let fake = FakeCognito::start(Reply::Ok).await;
    let app = TestApp::spawn(test_config(&fake.endpoint())).await;
    let mut reflection = ServerReflectionClient::new(channel(app.addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };

    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let response = responses.next().await.expect("one response").expect("ok");

    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&API.to_owned()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}
