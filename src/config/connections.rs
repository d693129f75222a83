//! What connections may cost: how many, how long before their first bytes,
//! how long at most, how many frames per second.

use std::time::Duration;

use clap::Args;

use super::parse_duration;

/// Flags bounding connections on every listener.
#[derive(Debug, Clone, Args)]
pub struct ConnectionConfig {
    /// Client connections the gRPC port holds at once; further clients wait
    /// in the kernel's backlog until one closes. Default: what the
    /// open-files limit leaves (the soft limit is raised to the hard one at
    /// start), at most 4096. Start fails if the limit cannot hold the number.
    #[arg(long, env = "SESSION_MAX_CONNECTIONS", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: Option<u64>,

    /// Connections the metrics port (and, separately, the health port) holds
    /// at once: scrapers and probes are few.
    #[arg(long, env = "SESSION_METRICS_MAX_CONNECTIONS", default_value_t = 16, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub metrics_max_connections: u64,

    /// Time a new connection has to send its first bytes: the TLS ClientHello,
    /// then (after the handshake, or at once in plaintext) the HTTP/2 preface.
    /// Silent connections are closed after it.
    #[arg(long, env = "SESSION_FIRST_BYTES_TIMEOUT", default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub first_bytes_timeout: Duration,

    /// Time a connection may go with no call open before the server sends
    /// GOAWAY and closes it (clients reconnect on their next call). PINGs
    /// and other control frames do not count as activity; a call waiting
    /// for Cognito, or a streaming call, does. While the connection budget
    /// runs short (an eighth of it or less free), the shorter of this and
    /// --first-bytes-timeout applies, so connections that open and then
    /// idle cannot hold the budget any longer than silent ones.
    #[arg(long, env = "SESSION_IDLE_TIMEOUT", default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// After --max-connection-age has sent GOAWAY, time left for the calls
    /// under way; then the connection is closed whatever its state (a stream
    /// that never ends, a peer that never reads).
    #[arg(long, env = "SESSION_MAX_CONNECTION_AGE_GRACE", default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,

    /// Time a call's request body has to arrive in full after its headers;
    /// later, the call ends with ABORTED. Reflection streams are exempt.
    #[arg(long, env = "SESSION_REQUEST_BODY_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub request_body_timeout: Duration,

    /// HTTP/2 control frames (SETTINGS, PING, WINDOW_UPDATE, PRIORITY,
    /// RST_STREAM, empty DATA that ends nothing, unknown types) per second
    /// one connection may send (one second's worth may come at once); past
    /// it the server reads nothing more from that connection until the rate
    /// allows. Frames carrying calls (HEADERS, DATA) are not counted; a
    /// client sends a few control frames per connection plus keepalive PINGs
    /// and window updates.
    #[arg(long, env = "SESSION_MAX_FRAMES_PER_SECOND", default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u32).range(10..=10_000_000))]
    pub max_frames_per_second: u32,

    /// HTTP/2 control frames per second all connections to the gRPC port
    /// may send together (the health port has the same total for its own).
    /// The total is shared equally among the connections open: each may
    /// send the smaller of --max-frames-per-second and total / open (at
    /// least 1 a second, 10 banked), so many flooding connections cost the
    /// service no more than a few, and a quiet client keeps its share.
    #[arg(long, env = "SESSION_MAX_FRAMES_PER_SECOND_TOTAL", default_value_t = 2000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(10..=100_000_000))]
    pub max_frames_per_second_total: u32,
}
