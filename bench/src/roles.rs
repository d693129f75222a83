//! The two stand-ins this binary can be: the fake Cognito (upstream that
//! costs almost nothing) and the gRPC floor (a tonic server that does
//! nothing). Each prints `LISTENING <addr>` and serves until killed.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use jsonwebtoken::DecodingKey;
use session_service::proto::{
    GlobalSignOutRequest, GlobalSignOutResponse, VerifyTokenRequest, VerifyTokenResponse,
    WatchRevocationsRequest, WatchRevocationsResponse,
    session_service_server::{SessionService, SessionServiceServer},
};
use tokio::net::TcpListener;

/// Answers every AdminUserGlobalSignOut with HTTP 200 `{}` after `delay`,
/// and every AdminGetUser at once with the name asked for as the user (its
/// sub made from it); `GET /arrivals` lists the sign-outs' arrival times
/// (µs since the Unix epoch), one per line, so the benchmark can count
/// sign-outs per second at Cognito.
pub(crate) async fn fake_cognito(delay: Duration) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("LISTENING {}", listener.local_addr().expect("addr"));
    let arrivals: Arc<Mutex<Vec<u64>>> = Arc::default();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, delay, arrivals.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    delay: Duration,
    arrivals: Arc<Mutex<Vec<u64>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() == "/arrivals" {
        let list = arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        let text: Vec<String> = list.iter().map(u64::to_string).collect();
        return Ok(Response::new(Full::new(Bytes::from(text.join("\n")))));
    }
    let target = request.headers().get("x-amz-target").cloned();
    if target.is_some_and(|t| t.as_bytes().ends_with(b".AdminGetUser")) {
        return Ok(get_user(request).await);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    arrivals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(u64::try_from(now.as_micros()).unwrap_or(u64::MAX));
    let _ = request.into_body().collect().await;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = Response::builder()
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", "b3nch000-0000-4000-8000-000000000000")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap_or_default();
    Ok(response)
}

/// AdminGetUser's answer: the user is the name asked for, its sub a
/// UUID-shaped string derived from it.
async fn get_user(request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let username = body["Username"].as_str().unwrap_or_default();
    let hash = username.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let sub = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        hash >> 32,
        (hash >> 16) & 0xffff,
        hash & 0xfff,
        (hash >> 20) & 0xfff,
        hash & 0xffff_ffff_ffff
    );
    let reply = serde_json::json!({
        "Username": username,
        "UserAttributes": [{ "Name": "sub", "Value": sub }],
        "Enabled": true,
        "UserStatus": "CONFIRMED",
    });
    Response::builder()
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", "b3nch000-0000-4000-8000-000000000001")
        .body(Full::new(Bytes::from(reply.to_string())))
        .unwrap_or_default()
}

/// The same API, answering at once with an empty response: what the gRPC
/// hop alone costs. Given a key, VerifyToken also checks the token's RS256
/// signature with it: the floor of a verification.
struct Floor {
    key: Option<DecodingKey>,
}

#[tonic::async_trait]
impl SessionService for Floor {
    async fn global_sign_out(
        &self,
        _request: tonic::Request<GlobalSignOutRequest>,
    ) -> Result<tonic::Response<GlobalSignOutResponse>, tonic::Status> {
        Ok(tonic::Response::new(GlobalSignOutResponse::default()))
    }

    async fn verify_token(
        &self,
        request: tonic::Request<VerifyTokenRequest>,
    ) -> Result<tonic::Response<VerifyTokenResponse>, tonic::Status> {
        let response = match &self.key {
            Some(key) => crate::verify::floor_verify(key, &request.get_ref().token),
            None => VerifyTokenResponse::default(),
        };
        Ok(tonic::Response::new(response))
    }

    type WatchRevocationsStream = tonic::codegen::BoxStream<WatchRevocationsResponse>;

    /// No benchmark measures watching against a floor.
    async fn watch_revocations(
        &self,
        _request: tonic::Request<WatchRevocationsRequest>,
    ) -> Result<tonic::Response<Self::WatchRevocationsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not part of the floor"))
    }
}

/// Serves [`Floor`] with tonic's defaults; `jwk` is the RSA key (base64url
/// modulus and exponent) VerifyToken checks signatures with.
pub(crate) async fn floor_grpc(jwk: Option<(String, String)>) {
    let key = jwk.map(|(n, e)| DecodingKey::from_rsa_components(&n, &e).expect("valid RSA key"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("LISTENING {}", listener.local_addr().expect("addr"));
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(SessionServiceServer::new(Floor { key }))
        .serve_with_incoming(incoming)
        .await
        .expect("floor server");
}
