//! Command-line and environment configuration. Every flag has an environment
//! variable; `--help` lists both. Values are validated here, once, at start.

mod connections;
mod redis;
mod revocation;
mod security;
mod tokens;
mod users;

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, ValueEnum};
pub use connections::ConnectionConfig;
pub use redis::RedisConfig;
pub use revocation::RevocationConfig;
pub use security::SecurityConfig;
pub use tokens::TokenConfig;
pub use users::UserLookupConfig;

use crate::{
    cognito::UpstreamSettings,
    domain::UserPoolId,
    identity::CallerId,
    limiter::{BudgetSettings, CallerSettings},
    pools::{DefaultPoolNotAllowed, PoolPolicy},
    signout::RetrySettings,
};

/// Signs users out of every device through Amazon Cognito
/// AdminUserGlobalSignOut, as a gRPC service (session.v1.SessionService).
///
/// AWS region and credentials come from the standard AWS chain: AWS_REGION,
/// AWS_PROFILE / shared config files, environment keys, web identity (IRSA),
/// EKS Pod Identity or instance metadata.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "SESSION_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// TLS, identity, authorization and connection bounds.
    #[command(flatten)]
    pub security: SecurityConfig,

    /// How many connections, and what each may cost.
    #[command(flatten)]
    pub connections: ConnectionConfig,

    /// VerifyToken: leeway and JWKS fetching.
    #[command(flatten)]
    pub tokens: TokenConfig,

    /// The fleet's shared budget in Redis, and its local fallback.
    #[command(flatten)]
    pub redis: RedisConfig,

    /// Revocation watermarks: skew, lifetime, watchers.
    #[command(flatten)]
    pub revocation: RevocationConfig,

    /// AdminGetUser before each sign-out: its budget and cache.
    #[command(flatten)]
    pub users: UserLookupConfig,

    /// User pool used when a request leaves user_pool_id empty. Without it,
    /// such requests fail with INVALID_ARGUMENT.
    #[arg(long, env = "SESSION_DEFAULT_USER_POOL_ID", value_name = "POOL_ID")]
    pub default_user_pool_id: Option<UserPoolId>,

    /// Comma-separated user pools this service may act on; any other pool is
    /// refused with PERMISSION_DENIED. Empty allows every pool.
    #[arg(
        long,
        env = "SESSION_ALLOWED_USER_POOL_IDS",
        value_name = "POOL_ID,...",
        value_delimiter = ','
    )]
    pub allowed_user_pool_ids: Vec<UserPoolId>,

    /// Cognito endpoint URL override (a local moto, a VPC endpoint). Default:
    /// the regional endpoint for AWS_REGION.
    #[arg(long, env = "SESSION_COGNITO_ENDPOINT", value_name = "URL", value_parser = parse_endpoint)]
    pub cognito_endpoint: Option<String>,

    /// Timeout to open a connection to Cognito (TCP + TLS).
    #[arg(long, env = "SESSION_UPSTREAM_CONNECT_TIMEOUT", default_value = "3s", value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Timeout of one attempt of the Cognito call.
    #[arg(long, env = "SESSION_UPSTREAM_ATTEMPT_TIMEOUT", default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_attempt_timeout: Duration,

    /// Time a sign-out may take in all: queueing, attempts and pauses. A
    /// caller's shorter grpc-timeout wins.
    #[arg(long, env = "SESSION_UPSTREAM_TIMEOUT", default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Attempts per sign-out, the first included (1 = no retries). Throttling,
    /// HTTP 5xx, timeouts and I/O errors are retried; every attempt takes a
    /// rate-limit permit and all must fit the deadline.
    #[arg(long, env = "SESSION_UPSTREAM_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub upstream_max_attempts: u32,

    /// Pause before the first retry; it doubles each time, with jitter.
    #[arg(long, env = "SESSION_UPSTREAM_INITIAL_BACKOFF", default_value = "200ms", value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_initial_backoff: Duration,

    /// Calls per second to Cognito: this process's, or with --redis-url the
    /// whole fleet's. AdminUserGlobalSignOut shares 25/s per AWS account and
    /// Region with other user-update calls: without Redis and with several
    /// replicas, set it to (account budget ÷ replicas).
    #[arg(long, env = "SESSION_RATE_LIMIT_RPS", default_value_t = 20.0, value_parser = parse_rate)]
    pub rate_limit_rps: f64,

    /// Calls that may go to Cognito at once after a quiet period.
    #[arg(long, env = "SESSION_RATE_LIMIT_BURST", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,

    /// Requests that may wait for a rate-limit permit at once; more are
    /// refused at once with RESOURCE_EXHAUSTED / RATE_LIMITED.
    #[arg(long, env = "SESSION_MAX_QUEUE", default_value_t = 1000)]
    pub max_queue: usize,

    /// Longest a request waits for a permit (a shorter grpc-timeout wins). A
    /// request whose permit would come later is refused at once.
    #[arg(long, env = "SESSION_MAX_QUEUE_WAIT", default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    pub max_queue_wait: Duration,

    /// Cognito calls under way at once; beyond it requests are refused with
    /// RESOURCE_EXHAUSTED / OVERLOADED.
    #[arg(long, env = "SESSION_MAX_IN_FLIGHT", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_in_flight: u64,

    /// Request metadata key that names the calling service, for per-caller
    /// limits and logs. Callers that send none are "anonymous".
    #[arg(long, env = "SESSION_CALLER_ID_HEADER", default_value = "x-caller-id", value_name = "KEY", value_parser = parse_metadata_key)]
    pub caller_id_header: String,

    /// Requests per second each caller may make; unlimited when unset. Checked
    /// before the shared budget, refused with CALLER_RATE_LIMITED. Verified
    /// callers (client certificate, trusted XFCC) and callers named in
    /// --per-caller-rps-overrides each have their own allowance; every other
    /// caller (a self-declared id, or none) shares one, since anyone can
    /// mint a new id per request.
    #[arg(long, env = "SESSION_PER_CALLER_RPS", value_name = "RPS", value_parser = parse_rate)]
    pub per_caller_rps: Option<f64>,

    /// Requests a caller may send at once (default: one second's worth).
    #[arg(long, env = "SESSION_PER_CALLER_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    pub per_caller_burst: Option<u32>,

    /// Comma-separated CALLER=RPS pairs replacing --per-caller-rps for those
    /// callers (works without it too); each named caller gets an allowance of
    /// its own, verified or not.
    #[arg(long, env = "SESSION_PER_CALLER_RPS_OVERRIDES", value_name = "CALLER=RPS,...",
          value_delimiter = ',', value_parser = parse_caller_override)]
    pub per_caller_rps_overrides: Vec<(CallerId, f64)>,

    /// Verified callers whose rate is tracked at once; new ones beyond it
    /// share one allowance, so a flood of identities cannot grow memory.
    #[arg(long, env = "SESSION_MAX_TRACKED_CALLERS", default_value_t = 10_000)]
    pub max_tracked_callers: usize,

    /// On SIGTERM/SIGINT, how long the server keeps serving (health already
    /// NOT_SERVING) so that load balancers and clients stop sending, before
    /// it stops accepting. Use 0s for local runs.
    #[arg(long, env = "SESSION_DRAIN_DELAY", default_value = "5s", value_name = "DURATION", value_parser = parse_duration_or_zero)]
    pub drain_delay: Duration,

    /// After the drain delay, how long in-flight calls may take to finish
    /// before the server exits anyway.
    #[arg(long, env = "SESSION_SHUTDOWN_GRACE", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Age at which a client connection is sent GOAWAY, so that long-lived
    /// HTTP/2 connections rebalance to new pods (clients reconnect).
    #[arg(long, env = "SESSION_MAX_CONNECTION_AGE", default_value = "5m", value_name = "DURATION", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// Interval of HTTP/2 PING keepalives on idle connections, to find dead
    /// peers behind NATs and load balancers.
    #[arg(long, env = "SESSION_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// Time to wait for a keepalive PING's answer before closing the connection.
    #[arg(long, env = "SESSION_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// Address of the admin listener serving Prometheus metrics at /metrics.
    #[arg(long, env = "SESSION_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// Key of the keyed hash (HMAC-SHA256) that stands for usernames in logs.
    /// Set the same secret on every replica to follow a user across them;
    /// without it a random key is drawn at start (hashes then match only
    /// within one process).
    #[arg(
        long,
        env = "SESSION_LOG_USER_HASH_KEY",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub log_user_hash_key: Option<String>,

    /// Like --log-user-hash-key, read from a file (a mounted Secret); a
    /// trailing newline is ignored.
    #[arg(
        long,
        env = "SESSION_LOG_USER_HASH_KEY_FILE",
        value_name = "PATH",
        conflicts_with = "log_user_hash_key"
    )]
    pub log_user_hash_key_file: Option<std::path::PathBuf>,

    /// Also write usernames themselves into access logs (personal data:
    /// explicit opt-in). Spans and metric labels never carry them.
    #[arg(long, env = "SESSION_LOG_USERNAMES")]
    pub log_usernames: bool,

    /// Validate the flags, the environment and the AWS region, print the
    /// result and exit (0 when valid, 64 when not) without serving.
    #[arg(long)]
    pub check_config: bool,

    /// Log line format on stdout. The filter comes from RUST_LOG (default
    /// "info").
    #[arg(long, env = "SESSION_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable text, for terminals.
    Text,
}

impl Config {
    /// The pool policy these flags describe.
    pub fn pool_policy(&self) -> Result<PoolPolicy, DefaultPoolNotAllowed> {
        PoolPolicy::new(
            self.default_user_pool_id.clone(),
            self.allowed_user_pool_ids.clone(),
        )
    }

    /// The upstream settings these flags describe.
    pub fn upstream(&self) -> UpstreamSettings {
        UpstreamSettings {
            endpoint: self.cognito_endpoint.clone(),
            connect_timeout: self.upstream_connect_timeout,
            attempt_timeout: self.upstream_attempt_timeout,
        }
    }

    /// The retry policy these flags describe.
    pub fn retry(&self) -> RetrySettings {
        RetrySettings {
            max_attempts: self.upstream_max_attempts,
            initial_backoff: self.upstream_initial_backoff,
        }
    }

    /// The shared upstream budget these flags describe.
    pub fn budget(&self) -> BudgetSettings {
        BudgetSettings {
            rate_per_sec: self.rate_limit_rps,
            burst: self.rate_limit_burst,
            max_queue: self.max_queue,
            max_wait: self.max_queue_wait,
        }
    }

    /// The AdminGetUser budget these flags describe.
    pub fn user_lookup_budget(&self) -> BudgetSettings {
        self.users.budget(self.max_queue, self.max_queue_wait)
    }

    /// The per-caller limits these flags describe.
    pub fn callers(&self) -> CallerSettings {
        CallerSettings {
            rate_per_sec: self.per_caller_rps,
            burst: self.per_caller_burst,
            overrides: self.per_caller_rps_overrides.clone(),
            max_tracked: self.max_tracked_callers,
        }
    }
}

/// clap's error as one log-friendly line: the message and its details (such
/// as which required flags are missing), without the usage and help hints.
pub fn one_line_error(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more"))
        .filter(|line| !line.is_empty())
        .collect();
    if message.is_empty() {
        "error: invalid arguments".into()
    } else {
        message.join(" ")
    }
}

/// No timing flag needs more than a day; anything longer is a typo, and
/// would overflow the deadline arithmetic on the request path.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 500ms, 2s, 1m)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    if duration > MAX_DURATION {
        return Err("must be at most 24h".into());
    }
    Ok(duration)
}

/// Rates outside this range are typos: below it a permit comes less than
/// once in 16 minutes, above it the limiter would not limit anything real.
const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.001..=1_000_000.0;

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if RATE_RANGE.contains(&rate) => Ok(rate),
        _ => Err(format!(
            "must be a number of requests per second from {} to {}",
            RATE_RANGE.start(),
            RATE_RANGE.end()
        )),
    }
}

fn parse_caller_override(value: &str) -> Result<(CallerId, f64), String> {
    let (caller, rate) = value
        .split_once('=')
        .ok_or("must be CALLER=RPS, e.g. billing=5")?;
    let caller = CallerId::parse(caller).map_err(|e| e.to_string())?;
    Ok((caller, parse_rate(rate)?))
}

fn parse_metadata_key(value: &str) -> Result<String, String> {
    let key = tonic::metadata::AsciiMetadataKey::from_bytes(value.as_bytes())
        .map_err(|_| "must be a lowercase gRPC metadata key such as x-caller-id")?;
    if key.as_str() != value || value.ends_with("-bin") || value.starts_with("grpc-") {
        return Err("must be a lowercase ASCII metadata key, not -bin or grpc-".into());
    }
    Ok(value.to_owned())
}

fn parse_duration_or_zero(value: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 0s, 500ms, 5s)"))?;
    if duration > MAX_DURATION {
        return Err("must be at most 24h".into());
    }
    Ok(duration)
}

fn parse_endpoint(value: &str) -> Result<String, String> {
    let uri: http::Uri = value.parse().map_err(|e| format!("not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(value.trim_end_matches('/').to_owned()),
        _ => Err("must be an http:// or https:// URL with a host".into()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("session-service").chain(args.iter().copied()))
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn defaults_need_no_flags() {
        let config = parse(&[]).expect("defaults parse");
        assert_eq!(config.listen, "0.0.0.0:50051".parse().expect("addr"));
        assert_eq!(config.upstream_max_attempts, 3);
        assert!(config.allowed_user_pool_ids.is_empty());
        let lookups = config.user_lookup_budget();
        assert_eq!((lookups.rate_per_sec, lookups.burst), (25.0, 25));
        assert_eq!(config.users.cache_size(), 100_000);
        assert_eq!(config.users.user_cache_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn allowed_pools_are_a_comma_list() {
        let config =
            parse(&["--allowed-user-pool-ids", "eu-west-1_A,eu-west-1_B"]).expect("parses");
        assert_eq!(config.allowed_user_pool_ids.len(), 2);
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["--listen", "nowhere"][..],
            &["--default-user-pool-id", "not a pool"],
            &["--allowed-user-pool-ids", "eu-west-1_A,bad"],
            &["--cognito-endpoint", "ftp://example.com"],
            &["--upstream-timeout", "0s"],
            &["--upstream-timeout", "soon"],
            &["--upstream-max-attempts", "0"],
            &["--rate-limit-rps", "0"],
            &["--rate-limit-rps", "NaN"],
            &["--rate-limit-rps", "1e-300"],
            &["--upstream-timeout", "100000000000h"],
            &["--max-queue-wait", "25h"],
            &["--rate-limit-rps", "1e7"],
            &["--per-caller-rps", "1e-300"],
            &["--per-caller-rps-overrides", "billing=1e-300"],
            &["--per-caller-rps-overrides", "billing=inf"],
            &["--rate-limit-burst", "0"],
            &["--caller-id-header", "X-Caller-Id"],
            &["--caller-id-header", "grpc-timeout"],
            &["--per-caller-rps-overrides", "billing"],
            &["--per-caller-rps-overrides", "bad caller=5"],
            &["--max-in-flight", "0"],
            &["--max-connections", "0"],
            &["--metrics-max-connections", "5000"],
            &["--first-bytes-timeout", "0s"],
            &["--max-frames-per-second", "1"],
            &["--user-lookup-rate-limit-rps", "0"],
            &["--user-lookup-burst", "0"],
            &["--user-cache-size", "0"],
            &["--user-cache-ttl", "0s"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn a_missing_companion_flag_is_named_on_the_one_line() {
        let error = parse(&["--tls-cert", "cert.pem"]).expect_err("needs --tls-key");
        let line = one_line_error(&error);
        assert!(line.contains("--tls-key"), "{line}");
        assert!(!line.contains('\n') && !line.contains("Usage"), "{line}");
    }

    #[test]
    fn per_caller_overrides_are_caller_equals_rate_pairs() {
        let config = parse(&["--per-caller-rps-overrides", "billing=5,batch=0.5"]).expect("parses");
        assert_eq!(config.per_caller_rps_overrides.len(), 2);
        assert_eq!(config.per_caller_rps_overrides[1].1, 0.5);
    }

    #[test]
    fn a_default_pool_outside_the_allow_list_is_refused() {
        let config = parse(&[
            "--default-user-pool-id",
            "eu-west-1_B",
            "--allowed-user-pool-ids",
            "eu-west-1_A",
        ])
        .expect("parses");
        assert!(config.pool_policy().is_err());
    }
}
