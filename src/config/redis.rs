//! The fleet budget's flags: where Redis is, and what this replica does
//! while it cannot reach it.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::redis::{RedisPassword, RedisSettings, RedisSetupError, RedisUrl};

/// A Redis call is on the request path: more than this is not "short".
const MAX_REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the fleet's budget lives.
#[derive(Debug, Clone, Args)]
pub struct RedisConfig {
    /// Redis holding the fleet's Cognito budget: redis://HOST:PORT or
    /// rediss://HOST:PORT (TLS), optionally redis://:PASSWORD@HOST:PORT.
    /// When set, --rate-limit-rps, --rate-limit-burst and the per-caller
    /// rates are the whole fleet's, shared by every replica. Unset: each
    /// process has its own budget. Never logged.
    // Checked at start, not by clap, whose error would print the URL.
    #[arg(long, env = "SESSION_REDIS_URL", value_name = "URL", hide_env_values = true,
          value_parser = |v: &str| Ok::<_, String>(RedisUrl::unchecked(v)))]
    pub redis_url: Option<RedisUrl>,

    /// Redis password, replacing the URL's (e.g. from a Secret).
    #[arg(long, env = "SESSION_REDIS_PASSWORD", value_name = "PASSWORD", hide_env_values = true,
          value_parser = |v: &str| Ok::<_, String>(RedisPassword::new(v)), conflicts_with = "redis_password_file")]
    pub redis_password: Option<RedisPassword>,

    /// File holding the Redis password (a mounted Secret); read at start.
    #[arg(long, env = "SESSION_REDIS_PASSWORD_FILE", value_name = "PATH")]
    pub redis_password_file: Option<PathBuf>,

    /// PEM file of the CA roots that sign Redis's certificate (rediss://
    /// only); the system's roots when unset.
    #[arg(long, env = "SESSION_REDIS_CA_FILE", value_name = "PATH")]
    pub redis_ca_file: Option<PathBuf>,

    /// Longest a request waits for Redis (at most 5s). A call that times out
    /// or fails switches this replica to its local fallback budget; it is
    /// never sent again.
    #[arg(long, env = "SESSION_REDIS_TIMEOUT", default_value = "50ms", value_name = "DURATION", value_parser = parse_redis_timeout)]
    pub redis_timeout: Duration,

    /// After a Redis failure, how long this replica uses its fallback budget
    /// before a PING tries Redis again (requests do not); also the pause
    /// between connection attempts while Redis is down at start.
    #[arg(long, env = "SESSION_REDIS_COOLDOWN", default_value = "5s", value_name = "DURATION", value_parser = super::parse_duration)]
    pub redis_cooldown: Duration,

    /// Prefix of the budget's Redis keys, which share it as their hash tag
    /// (Redis Cluster). Give each AWS account and Region its own: the quota
    /// is theirs.
    #[arg(long, env = "SESSION_REDIS_KEY_PREFIX", default_value = "session-service", value_name = "PREFIX", value_parser = parse_key_prefix)]
    pub redis_key_prefix: String,

    /// Replicas the fleet usually runs; sets the default fallback rate.
    #[arg(long, env = "SESSION_EXPECTED_REPLICAS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub expected_replicas: u32,

    /// This replica's own rate while it cannot reach Redis (default:
    /// --rate-limit-rps ÷ --expected-replicas). The replicas that still reach
    /// Redis share the fleet's rate meanwhile, so keep (rate + burst) +
    /// replicas × (this + its burst) within Cognito's quota.
    #[arg(long, env = "SESSION_FALLBACK_RATE_LIMIT_RPS", value_name = "RPS", value_parser = super::parse_rate)]
    pub fallback_rate_limit_rps: Option<f64>,

    /// Calls this replica may make at once, in fallback, after a quiet
    /// period.
    #[arg(long, env = "SESSION_FALLBACK_RATE_LIMIT_BURST", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub fallback_rate_limit_burst: u32,
}

impl RedisConfig {
    /// The connection settings, when a Redis URL is set: the URL checked,
    /// the password file read.
    pub fn settings(&self) -> Result<Option<RedisSettings>, RedisSetupError> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        url.check()?;
        let password = match &self.redis_password_file {
            Some(path) => Some(RedisPassword::new(&std::fs::read_to_string(path).map_err(
                |source| RedisSetupError::PasswordFile {
                    path: path.clone(),
                    source,
                },
            )?)),
            None => self.redis_password.clone(),
        };
        Ok(Some(RedisSettings {
            url: url.clone(),
            password,
            ca_file: self.redis_ca_file.clone(),
            timeout: self.redis_timeout,
            reconnect_every: self.redis_cooldown,
        }))
    }

    /// The fallback's rate for a fleet budget of `fleet_rate`.
    pub fn fallback_rate(&self, fleet_rate: f64) -> f64 {
        self.fallback_rate_limit_rps
            .unwrap_or(fleet_rate / f64::from(self.expected_replicas))
    }
}

fn parse_redis_timeout(value: &str) -> Result<Duration, String> {
    let timeout = super::parse_duration(value)?;
    if timeout > MAX_REDIS_TIMEOUT {
        return Err("must be at most 5s: every sign-out may wait this long for Redis".into());
    }
    Ok(timeout)
}

fn parse_key_prefix(value: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-:/".contains(c);
    if value.is_empty() || value.len() > 64 || !value.chars().all(allowed) {
        return Err("1 to 64 characters of A-Z a-z 0-9 . _ - : /".into());
    }
    Ok(value.to_owned())
}
