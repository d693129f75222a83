//! Row 6: SETTINGS / PING / WINDOW_UPDATE / PRIORITY floods. Each frame is a
//! few bytes for the attacker and work for the service (an answer, a state
//! change); each connection's control-frame budget, and the port's total
//! shared among its connections, keep that work bounded however many
//! connections flood.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Service, canary, cpu_secs_of, figure};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small").to_be_bytes();
    let mut bytes = vec![len[1], len[2], len[3], kind, 0];
    bytes.extend(stream.to_be_bytes());
    bytes.extend(payload);
    bytes
}

/// 16 KiB or so of the four control frames, over and over.
fn flood_chunk() -> Vec<u8> {
    let mix = [
        frame(0x4, 0, &[]),                 // SETTINGS (each needs an ACK)
        frame(0x6, 0, &[7; 8]),             // PING (each needs an answer)
        frame(0x8, 0, &1u32.to_be_bytes()), // WINDOW_UPDATE
        frame(0x2, 3, &[0, 0, 0, 0, 16]),   // PRIORITY of an idle stream
    ]
    .concat();
    mix.repeat(16 * 1024 / mix.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row6_control_frame_floods_cost_the_service_a_bounded_share_of_a_core() {
    flood(32, 0.6).await;
}

/// Four times as many connections: the per-connection budgets alone would
/// let four times as many frames through; the port's total holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row6_more_flooding_connections_share_the_same_total() {
    flood(128, 0.5).await;
}

/// `connections` flood for 3 s; the service may spend `max_core` of a core.
async fn flood(connections: usize, max_core: f64) {
    const FLOOD: Duration = Duration::from_secs(3);
    let service = Service::start(None, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let chunk = Arc::new(flood_chunk());
    let addr = service.addr;
    let attackers: Vec<_> = (0..connections)
        .map(|_| {
            let (stop, sent, chunk) = (stop.clone(), sent.clone(), chunk.clone());
            let answered = answered.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                        continue;
                    };
                    let (mut read, mut write) = tcp.into_split();
                    // Read every answer, so the server never stalls on writes.
                    let answered = answered.clone();
                    let drain = tokio::spawn(async move {
                        let mut sink = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = read.read(&mut sink).await {
                            answered.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    });
                    let mut opening = PREFACE.to_vec();
                    opening.extend(frame(0x4, 0, &[]));
                    if write.write_all(&opening).await.is_ok() {
                        while !stop.load(Ordering::Relaxed) {
                            if write.write_all(&chunk).await.is_err() {
                                break;
                            }
                            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        }
                    }
                    drain.abort();
                }
            })
        })
        .collect();

    let (service_cpu, attacker_cpu, started) = (
        service.cpu_secs(),
        cpu_secs_of("/proc/self/stat"),
        Instant::now(),
    );
    // A canary on a new connection every quarter second.
    let mut ok = 0;
    let mut calls = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while started.elapsed() < FLOOD {
        tick.tick().await;
        calls += 1;
        if canary(service.addr, Duration::from_secs(3)).await.is_ok() {
            ok += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let service_cpu = service.cpu_secs() - service_cpu;
    let attacker_cpu = cpu_secs_of("/proc/self/stat") - attacker_cpu;
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.abort();
    }
    let mib = sent.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0);
    // PING and SETTINGS answers are 17 and 9 bytes: a measure of the work done.
    let answers = answered.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0);
    figure(
        6,
        &format!(
            "{connections} connections for {elapsed:.1} s ({mib:.1} MiB of control frames written into the sockets, {answers:.2} MiB of answers back): service {service_cpu:.2} CPU-s, test process (attacker, canaries, fake Cognito) {attacker_cpu:.2} CPU-s; canary calls {ok} of {calls} OK"
        ),
    );
    assert_eq!(ok, calls, "canary calls failed during the flood");
    assert!(
        service_cpu / elapsed < max_core,
        "the flood cost the service {service_cpu:.2} CPU-s in {elapsed:.1} s"
    );
}
