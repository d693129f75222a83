//! The revocation watermark flags.

use std::time::Duration;

use clap::Args;

use crate::revocation::RevocationSettings;

/// More skew than a minute would revoke sign-ins that plainly came after
/// the sign-out.
const MAX_SKEW: Duration = Duration::from_secs(60);
/// Cognito's access and ID tokens live 5 minutes to 1 day.
const TTL_RANGE: (Duration, Duration) = (Duration::from_secs(300), Duration::from_secs(86_400));

/// How sign-outs revoke tokens verified without Cognito.
#[derive(Debug, Clone, Args)]
pub struct RevocationConfig {
    /// Added to this host's clock when a sign-out takes its watermark
    /// (0s to 60s): tokens whose auth_time is at most now + skew are
    /// revoked, so a sign-in a moment before the sign-out is caught even if
    /// the clocks differ. A user who signs in again within the skew must
    /// sign in once more.
    #[arg(long, env = "SESSION_REVOCATION_SKEW", default_value = "5s", value_name = "DURATION", value_parser = parse_skew)]
    pub revocation_skew: Duration,

    /// The longest access or ID token lifetime of the pools served (5m to
    /// 24h, Cognito's own limits): a watermark is kept this long plus the
    /// skew, by when every token it revokes has expired.
    #[arg(long, env = "SESSION_REVOCATION_TTL", default_value = "24h", value_name = "DURATION", value_parser = parse_ttl)]
    pub revocation_ttl: Duration,

    /// WatchRevocations streams open at once (1 to 10000); more are refused
    /// with RESOURCE_EXHAUSTED / TOO_MANY_WATCHERS.
    #[arg(long, env = "SESSION_MAX_REVOCATION_WATCHERS", default_value_t = 256, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_revocation_watchers: u32,
}

impl RevocationConfig {
    /// The settings these flags describe.
    pub fn settings(&self) -> RevocationSettings {
        RevocationSettings {
            skew: self.revocation_skew,
            ttl: self.revocation_ttl,
            max_watchers: usize::try_from(self.max_revocation_watchers).unwrap_or(usize::MAX),
        }
    }
}

fn parse_skew(value: &str) -> Result<Duration, String> {
    let skew =
        humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 0s, 5s, 30s)"))?;
    if skew > MAX_SKEW {
        return Err("must be at most 60s".into());
    }
    Ok(skew)
}

fn parse_ttl(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 1h, 24h)"))?;
    if ttl < TTL_RANGE.0 || ttl > TTL_RANGE.1 {
        return Err("must be 5m to 24h".into());
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_and_ttl_stay_in_range() {
        assert_eq!(parse_skew("0s"), Ok(Duration::ZERO));
        assert!(parse_skew("61s").is_err());
        assert!(parse_ttl("4m").is_err());
        assert!(parse_ttl("25h").is_err());
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
    }
}
