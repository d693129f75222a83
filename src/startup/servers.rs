//! The side servers that run beside the API: /metrics, and the plaintext
//! health port for kubelet probes.

use std::sync::Arc;

use tokio::{
    net::TcpListener,
    sync::{Semaphore, oneshot},
};
use tonic::transport::Server;
use tonic_health::pb::health_server::{Health, HealthServer};
use tracing_appender::non_blocking::ErrorCounter;

use crate::{
    connections::{ConnectionLimits, CountOpenCallsLayer},
    incoming,
    metrics::{self, Metrics, Sampled},
    signout::SignOutFlow,
};

/// Serves /metrics until the returned sender is used (or dropped). It stays
/// up through the drain so the last scrape sees the shutdown.
pub(super) fn spawn_metrics_server(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    flow: SignOutFlow,
    log_drops: Option<ErrorCounter>,
    max_connections: u64,
) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
        metrics.render(Sampled {
            queue_depth: flow.budget().queue_depth(),
            in_flight: flow.in_flight(),
            current_rate: flow.budget().current_rate(),
            log_lines_dropped: log_drops.as_ref().map_or(0, |c| c.dropped_lines() as u64),
            log_lines_suppressed: crate::telemetry::LOG_LINES_SUPPRESSED
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    });
    let budget = Arc::new(Semaphore::new(
        usize::try_from(max_connections).unwrap_or(usize::MAX),
    ));
    tokio::spawn(metrics::serve_metrics(listener, render, budget, async {
        let _ = stopped.await;
    }));
    stop
}

/// Serves grpc.health.v1 alone, in plaintext, for kubelet probes (which
/// cannot speak TLS), until the returned sender is used.
pub(super) fn spawn_health_server(
    listener: TcpListener,
    health_service: HealthServer<impl Health>,
    limits: ConnectionLimits,
) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = incoming::accept(listener, None, limits);
    tokio::spawn(
        Server::builder()
            // A Watch stream is a call open: its connection is not idle.
            .layer(CountOpenCallsLayer)
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    stop
}
