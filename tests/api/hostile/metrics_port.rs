//! Rows 3 and 4: the metrics port flooded with idle connections, and with
//! header blocks that never end (in bulk, and one byte at a time).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Service, canary, figure, idle_connections};
use crate::helpers::metrics_text;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row3_a_flood_of_the_metrics_port_neither_starves_the_grpc_port_nor_spins() {
    const NOFILE: u32 = 256;
    let service = Service::start(Some(NOFILE), &[("SESSION_MAX_IN_FLIGHT", "10")]).await;
    let flood = idle_connections(service.metrics_addr, 400, Duration::from_secs(2)).await;
    let fds = service.fds();
    let cpu_before = service.cpu_secs();
    let started = Instant::now();
    let fresh = canary(service.addr, Duration::from_secs(10)).await;
    // The CPU the service burns while the flood just sits there.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;
    let cpu = (service.cpu_secs() - cpu_before) / started.elapsed().as_secs_f64();
    let accept_errors = service.log_lines(|l| l.contains("accept failed")).len();
    figure(
        3,
        &format!(
            "{} flood connections on the metrics port; service fds {fds} (limit {NOFILE}); new gRPC channel {fresh:?}; service CPU {:.0} % of a core while flooded; {accept_errors} 'accept failed' lines",
            flood.len(),
            cpu * 100.0
        ),
    );
    drop(flood);
    assert!(fresh.is_ok(), "the gRPC port was starved: {fresh:?}");
    assert!(
        cpu < 0.5,
        "the service spun at {:.0} % of a core",
        cpu * 100.0
    );
    assert_eq!(accept_errors, 0, "the listeners ran out of descriptors");
    // Once the flood is gone, scrapes work again.
    let text = tokio::time::timeout(Duration::from_secs(30), metrics_text(service.metrics_addr))
        .await
        .expect("a scrape after the flood");
    assert!(text.contains("session_build_info"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row4_header_blocks_that_never_end_cost_neither_memory_nor_time() {
    const CONNECTIONS: usize = 100;
    const HEADER_BYTES: usize = 390 * 1024;
    let service = Service::start(None, &[]).await;
    let rss_before = service.rss_mib();
    let mut set = tokio::task::JoinSet::new();
    let addr = service.metrics_addr;
    for _ in 0..CONNECTIONS {
        set.spawn(async move {
            let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
                return None;
            };
            let mut header = b"GET /metrics HTTP/1.1\r\nX-Fill: ".to_vec();
            header.resize(HEADER_BYTES, b'a');
            let _ = tokio::time::timeout(Duration::from_secs(3), tcp.write_all(&header)).await;
            Some(tcp)
        });
    }
    let held: Vec<_> = set.join_all().await.into_iter().flatten().collect();
    let rss_after = service.rss_mib();

    // One header byte every half second: the server must give up on it.
    let mut drip = tokio::net::TcpStream::connect(addr).await.expect("connect");
    drip.write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if drip.write_all(b"X").await.is_err() {
                return;
            }
            let mut byte = [0u8; 64];
            // Closed (after a 408 or 431, perhaps), or half a second passed.
            let read = tokio::time::timeout(Duration::from_millis(500), drip.read(&mut byte));
            if let Ok(Ok(0) | Err(_)) = read.await {
                return;
            }
        }
    })
    .await;
    let drip_lifetime = started.elapsed();
    figure(
        4,
        &format!(
            "{} connections x {} KiB of unfinished header: RSS {rss_before:.1} -> {rss_after:.1} MiB; a one-byte-per-0.5 s header was cut after {drip_lifetime:.1?} ({})",
            held.len(),
            HEADER_BYTES / 1024,
            if closed.is_ok() {
                "closed"
            } else {
                "still open at 20 s"
            }
        ),
    );
    drop(held);
    assert!(
        rss_after - rss_before < 6.0,
        "RSS grew {rss_before:.1} -> {rss_after:.1} MiB"
    );
    assert!(
        closed.is_ok(),
        "a dripping header kept its connection for 20 s"
    );
}
