//! Row 5: connections that would otherwise live for ever. No preface; a
//! stream whose request never ends; a peer that never opens its receive
//! window. Each answers PINGs (h2 does), so only a hard end retires it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::{io::AsyncReadExt, net::TcpStream};

use super::{Service, figure};

/// An HTTP/2 connection made with `builder`, driven on a task of its own
/// (which answers the server's PINGs); the task ends when the connection does.
pub(crate) async fn h2_connect(
    addr: std::net::SocketAddr,
    builder: &h2::client::Builder,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = builder.handshake(tcp).await.expect("HTTP/2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send, driver)
}

/// A GlobalSignOut request's headers.
pub(crate) fn grpc_request(addr: std::net::SocketAddr) -> http::Request<()> {
    http::Request::post(format!(
        "http://{addr}/session.v1.SessionService/GlobalSignOut"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("request")
}

/// A gRPC message frame holding a valid GlobalSignOutRequest.
pub(crate) fn grpc_message() -> Bytes {
    use prost::Message;
    let message = session_service::proto::GlobalSignOutRequest {
        user_pool_id: crate::helpers::POOL.into(),
        username: "alice".into(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend(u32::try_from(message.len()).expect("small").to_be_bytes());
    frame.extend(message);
    Bytes::from(frame)
}

/// How long `driver` (a connection's task) lives, up to `limit`.
async fn lifetime(
    started: Instant,
    driver: tokio::task::JoinHandle<()>,
    limit: Duration,
) -> Option<Duration> {
    tokio::time::timeout(limit, driver)
        .await
        .ok()
        .map(|_| started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row5_every_connection_ends_however_the_peer_behaves() {
    let service = Service::start(
        None,
        &[
            ("SESSION_MAX_CONNECTION_AGE", "1s"),
            ("SESSION_MAX_CONNECTION_AGE_GRACE", "1s"),
            ("SESSION_FIRST_BYTES_TIMEOUT", "1s"),
            ("SESSION_REQUEST_BODY_TIMEOUT", "1m"),
        ],
    )
    .await;
    let limit = Duration::from_secs(15);

    // No preface at all.
    let started = Instant::now();
    let mut silent = TcpStream::connect(service.addr).await.expect("connect");
    // Until the server closes it (an older build sent its SETTINGS first).
    let closed = async {
        let mut buf = [0u8; 256];
        while matches!(silent.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let no_preface = tokio::time::timeout(limit, closed)
        .await
        .ok()
        .map(|()| started.elapsed());

    // A request whose body never ends.
    let started = Instant::now();
    let (send, driver) = h2_connect(service.addr, &h2::client::Builder::new()).await;
    let (_response, _body) = send
        .ready()
        .await
        .expect("ready")
        .send_request(grpc_request(service.addr), false)
        .expect("send");
    let endless_body = lifetime(started, driver, limit).await;

    // A complete request whose answer can never be sent: window 0.
    let started = Instant::now();
    let mut closed_window = h2::client::Builder::new();
    closed_window.initial_window_size(0);
    let (send, driver) = h2_connect(service.addr, &closed_window).await;
    let (_response, mut body) = send
        .ready()
        .await
        .expect("ready")
        .send_request(grpc_request(service.addr), false)
        .expect("send");
    body.send_data(grpc_message(), true).expect("body");
    let zero_window = lifetime(started, driver, limit).await;

    // The calls the hard end cut are the peers' doing: CANCELLED at info.
    let settled = async {
        while service
            .log_lines(|l| l.contains("\"target\":\"access\""))
            .len()
            < 2
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), settled).await;
    let access = service.log_lines(|l| l.contains("\"target\":\"access\""));
    let errors = service.log_lines(|l| l.contains("\"level\":\"ERROR\""));
    let metrics = crate::helpers::metrics_text(service.metrics_addr).await;
    let faults = metrics.contains("code=\"UNKNOWN\"") || metrics.contains("code=\"INTERNAL\"");
    figure(
        5,
        &format!(
            "with age 1 s, grace 1 s, first bytes 1 s: no preface closed after {no_preface:.1?}; endless request body closed after {endless_body:.1?}; zero window closed after {zero_window:.1?} (None: still open at {limit:?}); access lines {access:?}; {} ERROR lines; UNKNOWN/INTERNAL counted: {faults}",
            errors.len()
        ),
    );
    assert!(
        errors.is_empty(),
        "the hard end was logged as a server error: {errors:?}"
    );
    assert!(!faults, "the hard end was counted as a server fault");
    assert!(
        no_preface.is_some(),
        "a connection without a preface stayed open"
    );
    assert!(
        endless_body.is_some(),
        "a never-ending request kept its connection"
    );
    assert!(
        zero_window.is_some(),
        "a zero-window peer kept its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row5_a_request_body_that_never_ends_is_aborted_at_its_timeout() {
    let service = Service::start(None, &[("SESSION_REQUEST_BODY_TIMEOUT", "1s")]).await;
    let (send, _driver) = h2_connect(service.addr, &h2::client::Builder::new()).await;
    let started = Instant::now();
    let (response, _body) = send
        .ready()
        .await
        .expect("ready")
        .send_request(grpc_request(service.addr), false)
        .expect("send");
    let response = tokio::time::timeout(Duration::from_secs(15), response).await;
    let elapsed = started.elapsed();
    let status = response
        .ok()
        .and_then(Result::ok)
        .and_then(|r| r.headers().get("grpc-status").cloned());
    figure(
        5,
        &format!("a request body that never ends: grpc-status {status:?} after {elapsed:.1?}"),
    );
    assert_eq!(
        status.as_ref().map(|s| s.as_bytes()),
        Some(&b"10"[..]),
        "not ABORTED"
    );
    assert_eq!(service.fake.requests().len(), 0);
}
