//! The three things the benchmark calls: the service and the gRPC floor
//! (generated client, several HTTP/2 connections), and the SDK alone.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use aws_config::SdkConfig;
use aws_sdk_cognitoidentityprovider::config::{
    BehaviorVersion, Credentials, Region, SharedCredentialsProvider,
};
use session_service::{
    cognito::{Cognito, UpstreamSettings},
    proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient},
    telemetry::code_name,
};
use tonic::transport::{Channel, Endpoint};

use crate::load::Call;

/// The pool every benchmark call names.
pub(crate) const POOL: &str = "us-east-1_BenchPool1";

/// HTTP/2 connections per gRPC target: below the server's stream limit
/// even at 1,000 calls in flight, as a real client fleet would be.
const CONNECTIONS: usize = 16;

/// [`CONNECTIONS`] clients of `addr`, each on its own HTTP/2 connection.
pub(crate) async fn connect_clients(addr: SocketAddr) -> Arc<Vec<SessionServiceClient<Channel>>> {
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let channel: Channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect");
        clients.push(SessionServiceClient::new(channel));
    }
    Arc::new(clients)
}

/// Calls `GlobalSignOut` on `addr` (the service or the floor), spreading
/// calls over [`CONNECTIONS`] connections; usernames are distinct per call.
pub(crate) async fn grpc(addr: SocketAddr) -> Call {
    let clients = connect_clients(addr).await;
    Arc::new(move |n| {
        let mut client = clients[n as usize % clients.len()].clone();
        Box::pin(async move {
            let request = GlobalSignOutRequest {
                user_pool_id: POOL.into(),
                username: format!("bench-user-{n}"),
            };
            match client.global_sign_out(request).await {
                Ok(_) => "OK",
                Err(status) => code_name(status.code()),
            }
        })
    })
}

/// Calls AdminUserGlobalSignOut on the fake directly, with the SDK client
/// configured exactly as the service configures its own.
pub(crate) fn sdk(cognito: SocketAddr) -> Call {
    let credentials = Credentials::new("AKIDBENCHBENCHBENCH0", "bench-secret", None, None, "bench");
    let sdk_config = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(credentials))
        .build();
    let cognito = Cognito::new(
        &sdk_config,
        &UpstreamSettings {
            endpoint: Some(format!("http://{cognito}")),
            connect_timeout: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(10),
        },
    );
    let client = cognito.sdk_client().clone();
    Arc::new(move |n| {
        let call = client
            .admin_user_global_sign_out()
            .user_pool_id(POOL)
            .username(format!("bench-user-{n}"));
        Box::pin(async move {
            match call.send().await {
                Ok(_) => "OK",
                Err(_) => "SDK_ERROR",
            }
        })
    })
}
