//! The VerifyToken flags.

use std::time::Duration;

use clap::Args;

use crate::tokens::TokenSettings;

/// The most clock skew a token's `exp` may be given: more would turn the
/// leeway into a second lifetime.
const MAX_LEEWAY: Duration = Duration::from_secs(60);
/// During a penalty a rotated key's tokens are INVALID: minutes at most.
const MAX_PENALTY: Duration = Duration::from_secs(300);
/// A stalled fetch holds up every unknown-kid call of its pool.
const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How tokens are verified.
#[derive(Debug, Clone, Args)]
pub struct TokenConfig {
    /// Clock skew allowed on a token's exp in VerifyToken (0s to 60s): a
    /// token is expired once now ≥ exp + leeway.
    #[arg(long, env = "SESSION_TOKEN_LEEWAY", default_value = "5s", value_name = "DURATION", value_parser = parse_leeway)]
    pub token_leeway: Duration,

    /// After a fetch of a pool's JWKS that failed, or that did not hold the
    /// kid it was made for, no other fetch of that pool for this long (1s to
    /// 5m): tokens with made-up kids cost at most one fetch per period. A
    /// rotated key is found at once (its first token refetches) unless such
    /// a fetch came within the period; its tokens are INVALID until it ends.
    #[arg(long, env = "SESSION_JWKS_REFETCH_PENALTY", default_value = "10s", value_name = "DURATION", value_parser = parse_penalty)]
    pub jwks_refetch_penalty: Duration,

    /// Timeout of one JWKS fetch (connect, TLS and body; at most 30s). A
    /// fetch that fails with no keys cached is UNAVAILABLE / JWKS_UNAVAILABLE
    /// to the caller.
    #[arg(long, env = "SESSION_JWKS_FETCH_TIMEOUT", default_value = "2s", value_name = "DURATION", value_parser = parse_fetch_timeout)]
    pub jwks_fetch_timeout: Duration,
}

impl TokenConfig {
    /// The settings these flags describe.
    pub fn settings(&self) -> TokenSettings {
        TokenSettings {
            leeway: self.token_leeway,
            refetch_penalty: self.jwks_refetch_penalty,
            fetch_timeout: self.jwks_fetch_timeout,
        }
    }
}

fn parse_leeway(value: &str) -> Result<Duration, String> {
    let leeway =
        humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 0s, 5s, 30s)"))?;
    if leeway > MAX_LEEWAY {
        return Err("must be at most 60s".into());
    }
    Ok(leeway)
}

fn parse_penalty(value: &str) -> Result<Duration, String> {
    let penalty = super::parse_duration(value)?;
    if !(Duration::from_secs(1)..=MAX_PENALTY).contains(&penalty) {
        return Err("must be 1s to 5m".into());
    }
    Ok(penalty)
}

fn parse_fetch_timeout(value: &str) -> Result<Duration, String> {
    let timeout = super::parse_duration(value)?;
    if timeout > MAX_FETCH_TIMEOUT {
        return Err("must be at most 30s".into());
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leeway_is_bounded_to_a_minute() {
        assert_eq!(parse_leeway("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_leeway("60s"), Ok(MAX_LEEWAY));
        assert!(parse_leeway("61s").is_err());
        assert!(parse_leeway("soon").is_err());
    }

    #[test]
    fn the_penalty_and_the_fetch_timeout_are_bounded() {
        assert_eq!(parse_penalty("5m"), Ok(MAX_PENALTY));
        for bad in ["500ms", "301s", "1h"] {
            assert!(parse_penalty(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_fetch_timeout("30s"), Ok(MAX_FETCH_TIMEOUT));
        assert!(parse_fetch_timeout("31s").is_err());
        assert!(parse_fetch_timeout("0s").is_err());
    }
}
