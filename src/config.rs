//! Command-line and environment configuration. Every flag has an environment
//! variable; `--help` lists both. Values are validated here, once, at start.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, ValueEnum};

use crate::{
    cognito::UpstreamSettings,
    domain::UserPoolId,
    pools::{DefaultPoolNotAllowed, PoolPolicy},
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

    /// Timeout of the whole Cognito call, retries included. A caller's
    /// shorter grpc-timeout wins.
    #[arg(long, env = "SESSION_UPSTREAM_TIMEOUT", default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Attempts per Cognito call, the first included (1 = no retries).
    /// Throttling, HTTP 5xx, timeouts and I/O errors are retried.
    #[arg(long, env = "SESSION_UPSTREAM_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub upstream_max_attempts: u32,

    /// Backoff before the first retry; it grows exponentially with jitter.
    #[arg(long, env = "SESSION_UPSTREAM_INITIAL_BACKOFF", default_value = "200ms", value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_initial_backoff: Duration,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish before
    /// the server exits anyway.
    #[arg(long, env = "SESSION_SHUTDOWN_GRACE", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

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
            operation_timeout: self.upstream_timeout,
            max_attempts: self.upstream_max_attempts,
            initial_backoff: self.upstream_initial_backoff,
        }
    }
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 500ms, 2s, 1m)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
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
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
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
