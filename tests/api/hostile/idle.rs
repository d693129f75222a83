//! The headline, in its last form: connections that send the HTTP/2
//! preface and SETTINGS, then idle (answering nothing, closing nothing),
//! each holding a place in the connection budget. They must lose it to the
//! idle timeout (with a GOAWAY first), while a connection whose call is
//! waiting on a slow Cognito, sending no bytes, keeps its own.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use super::{Service, call_on, canary, figure};
use crate::fake_cognito::Reply;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// What an idle attacker saw: when the server closed on it, and whether a
/// GOAWAY came first.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    closed_after: Option<Duration>,
    goaway: bool,
}

/// Opens a connection that sends the preface and SETTINGS, then nothing,
/// reading (never answering) until the server closes it.
fn idle_attacker(
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        if tcp.write_all(&[PREFACE, SETTINGS].concat()).await.is_err() {
            return;
        }
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
            received.extend_from_slice(&buf[..n]);
        }
        let mut seen = seen.lock().expect("seen");
        seen.closed_after = Some(started.elapsed());
        seen.goaway = frame_types(&received).contains(&0x7);
    })
}

/// The types of the HTTP/2 frames in `bytes` (a server's whole output).
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_that_sent_the_preface_cannot_hold_the_budget_from_new_callers() {
    const BUDGET: usize = 8;
    const ATTACKERS: usize = 2 * BUDGET;
    const IDLE: Duration = Duration::from_secs(3);
    const COGNITO_DELAY: Duration = Duration::from_secs(6);
    let service = Service::start(
        Some(256),
        &[
            ("SESSION_MAX_CONNECTIONS", "8"),
            ("SESSION_IDLE_TIMEOUT", "3s"),
            ("SESSION_FIRST_BYTES_TIMEOUT", "1s"),
            // A slow Cognito, not a failing one: attempts may take 6 s.
            ("SESSION_UPSTREAM_ATTEMPT_TIMEOUT", "10s"),
            ("SESSION_UPSTREAM_TIMEOUT", "15s"),
        ],
    )
    .await;

    // A caller whose sign-out waits on Cognito, its connection silent.
    let slow_channel = Channel::from_shared(format!("http://{}", service.addr))
        .expect("uri")
        .connect_lazy();
    service
        .fake
        .set_reply(Reply::Delayed(COGNITO_DELAY, Box::new(Reply::Ok)));
    let slow_call = tokio::spawn(call_on(slow_channel.clone(), Duration::from_secs(20)));
    tokio::time::timeout(Duration::from_secs(10), service.fake.wait_for(1))
        .await
        .expect("the slow sign-out reaches Cognito");
    service.fake.set_reply(Reply::Ok);
    let (fds_before, rss_before) = (service.fds(), service.rss_mib());

    // Twice the budget in idle connections: the first fill it, the rest
    // wait in the backlog to take each place that frees.
    let started = Instant::now();
    let seen: Vec<_> = (0..ATTACKERS)
        .map(|_| Arc::new(Mutex::new(Seen::default())))
        .collect();
    let attackers: Vec<_> = seen
        .iter()
        .map(|seen| idle_attacker(service.addr, seen.clone()))
        .collect();
    let full = async {
        while service.fds() < fds_before + BUDGET - 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), full).await;
    let fds_full = service.fds();

    let fresh = canary(service.addr, IDLE + Duration::from_secs(5)).await;
    let fresh_at = started.elapsed();
    let slow = slow_call.await.expect("task");
    // The slow caller's channel, idle since, was closed; its next call
    // reconnects.
    tokio::time::sleep(IDLE + Duration::from_secs(1)).await;
    let again = call_on(slow_channel, Duration::from_secs(5)).await;
    let settled = async {
        while attackers.iter().any(|a| !a.is_finished()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), settled).await;
    let seen: Vec<Seen> = seen.iter().map(|s| *s.lock().expect("seen")).collect();
    let closed = seen.iter().filter(|s| s.closed_after.is_some()).count();
    let goaways = seen.iter().filter(|s| s.goaway).count();
    let (fds_after, rss_after) = (service.fds(), service.rss_mib());
    figure(
        17,
        &format!(
            "budget {BUDGET}, idle timeout {IDLE:?} (first bytes 1 s under pressure), {ATTACKERS} connections sending the preface + SETTINGS then idling: new channel {fresh:?} at {fresh_at:.1?}; sign-out waiting {COGNITO_DELAY:?} on Cognito {slow:?}; its channel after idling {again:?}; {closed} of {ATTACKERS} idle connections closed ({goaways} with a GOAWAY first); fds {fds_before} -> {fds_full} full -> {fds_after}; RSS {rss_before:.1} -> {rss_after:.1} MiB"
        ),
    );
    for attacker in attackers {
        attacker.abort();
    }
    assert!(
        fresh.is_ok(),
        "a new caller could not get through: {fresh:?}"
    );
    let slow = slow.expect("the call waiting on Cognito was cut");
    assert!(slow >= COGNITO_DELAY, "{slow:?}");
    assert!(
        again.is_ok(),
        "an idle channel did not reconnect: {again:?}"
    );
    assert_eq!(closed, ATTACKERS, "idle connections still open: {seen:?}");
    assert_eq!(goaways, ATTACKERS, "closed without a GOAWAY: {seen:?}");
    assert!(
        fds_after <= fds_before + 2,
        "descriptors not given back: {fds_before} -> {fds_after}"
    );
}
