//! Rows 1 and 2: connections that never say anything, on the TLS port and
//! in their thousands on the plaintext gRPC port.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use super::{Service, call_on, canary, figure, idle_connections};
use crate::{
    helpers::scratch_dir,
    pki::{ServerFiles, TestCa},
};

/// What each of row 1's attackers sends before it stalls.
#[derive(Debug, Clone, Copy)]
enum Opening {
    Nothing,
    /// The first byte of a TLS record (a handshake record's content type).
    OneByte,
    /// A whole, real ClientHello.
    ClientHello,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row1_silent_connections_to_the_tls_port_do_not_hold_up_real_handshakes() {
    row1(Opening::Nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row1_connections_that_send_one_byte_and_stall_do_not_hold_up_real_handshakes() {
    row1(Opening::OneByte).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row1_connections_that_send_a_client_hello_and_stall_do_not_hold_up_real_handshakes() {
    row1(Opening::ClientHello).await;
}

async fn row1(opening: Opening) {
    let ca = TestCa::new("test CA");
    let files = ServerFiles::write(&scratch_dir("hostile-tls"), &ca.server("server"), &ca);
    let (cert, key) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
    );
    let service = Service::start(
        None,
        &[("SESSION_TLS_CERT", &cert), ("SESSION_TLS_KEY", &key)],
    )
    .await;
    let hello: &'static [u8] = match opening {
        Opening::Nothing => &[],
        Opening::OneByte => &[0x16],
        Opening::ClientHello => client_hello().leak(),
    };
    // 300 clients that connect, send `opening` and then nothing, reconnecting
    // whenever the server closes on them.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = service.addr;
    let attackers: Vec<_> = (0..300)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await {
                        let _ = tcp.write_all(hello).await;
                        // Whatever the server answers (a ServerHello, an
                        // alert), read on until it closes.
                        while matches!(tcp.read(&mut [0u8; 4096]).await, Ok(n) if n > 0) {}
                    }
                }
            })
        })
        .collect();
    let settled = async {
        while service.fds() < 250 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), settled).await;

    let mut ok = 0;
    let mut failures = Vec::new();
    for _ in 0..12 {
        match tls_call(service.addr, &ca, Duration::from_secs(3)).await {
            Ok(_) => ok += 1,
            Err(why) => failures.push(why),
        }
    }
    figure(
        1,
        &format!(
            "attackers sending {opening:?}: {ok} of 12 new TLS calls succeeded during the attack ({failures:?}); service RSS {:.1} MiB, {} fds",
            service.rss_mib(),
            service.fds()
        ),
    );
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.abort();
    }
    assert_eq!(
        ok, 12,
        "TLS calls failed while clients sending {opening:?} stalled: {failures:?}"
    );
}

/// The bytes a real TLS client opens with.
fn client_hello() -> Vec<u8> {
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("ClientHello");
    assert!(
        hello.len() > 100,
        "a whole ClientHello: {} bytes",
        hello.len()
    );
    hello
}

/// One sign-out over a new TLS connection.
async fn tls_call(
    addr: std::net::SocketAddr,
    ca: &TestCa,
    limit: Duration,
) -> Result<Duration, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("client TLS config")
        .connect_timeout(limit)
        .connect_lazy();
    call_on(channel, limit).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row2_a_flood_of_idle_connections_leaves_fds_memory_and_new_callers_alone() {
    const NOFILE: u32 = 256;
    let service = Service::start(
        Some(NOFILE),
        &[
            ("SESSION_FIRST_BYTES_TIMEOUT", "1s"),
            ("SESSION_MAX_IN_FLIGHT", "10"),
        ],
    )
    .await;
    // A channel connected before the flood: it must keep working through it.
    let long_lived = Channel::from_shared(format!("http://{}", service.addr))
        .expect("uri")
        .connect_lazy();
    call_on(long_lived.clone(), Duration::from_secs(10))
        .await
        .expect("a call before the flood");
    let (rss_before, fds_before) = (service.rss_mib(), service.fds());

    // Half again as many connections as the process may have files, none of
    // which ever sends the HTTP/2 preface.
    let flood = idle_connections(service.addr, 400, Duration::from_secs(2)).await;
    let mut fds_peak = service.fds();
    let during = call_on(long_lived, Duration::from_secs(5)).await;
    let fresh = canary(service.addr, Duration::from_secs(20)).await;
    fds_peak = fds_peak.max(service.fds());
    let rss_after = service.rss_mib();
    let accept_errors = service.log_lines(|l| l.contains("accept failed")).len();
    figure(
        2,
        &format!(
            "{} flood connections; fds {fds_before} -> peak {fds_peak} (limit {NOFILE}); RSS {rss_before:.1} -> {rss_after:.1} MiB; long-lived channel {during:?}; new channel {fresh:?}; {accept_errors} 'accept failed' lines",
            flood.len()
        ),
    );
    drop(flood);
    assert!(during.is_ok(), "the long-lived channel failed: {during:?}");
    assert!(
        fresh.is_ok(),
        "a new caller could not get through: {fresh:?}"
    );
    assert_eq!(accept_errors, 0, "the listener ran out of descriptors");
    assert!(
        rss_after - rss_before < 32.0,
        "RSS grew {rss_before} -> {rss_after} MiB"
    );
}
