//! The one Redis connection the service holds: connected in the background
//! (the service starts whether Redis is up or not), every call bounded by
//! `--redis-timeout`, measured, and its failures classified. Its users
//! decide what a failure means (the budget falls back to a local one).
//!
//! A call that timed out is never sent again: it may have run. The only
//! resend is redis-rs's own on NOSCRIPT (EVALSHA, then SCRIPT LOAD and
//! EVALSHA once), and a NOSCRIPT reply means the first one did not run.

use std::{
    fmt,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use ::redis::{
    Client, ConnectionInfo, FromRedisValue, IntoConnectionInfo, Script, ScriptInvocation,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use arc_swap::ArcSwapOption;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio_util::task::AbortOnDropHandle;

/// Redis latency buckets in seconds: loopback to a slow cross-zone hop.
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// Kinds of failure, as `session_redis_errors_total{kind}` counts them.
const ERROR_KINDS: &[&str] = &["timeout", "connection", "script", "other"];

/// A Redis URL as given: `redis://` or `rediss://`. It may carry a password,
/// so it never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Accepts what redis-rs can connect to over TCP, with or without TLS.
    /// The error never quotes the URL: it may hold a password.
    pub fn parse(url: &str) -> Result<Self, RedisSetupError> {
        let url = Self::unchecked(url);
        url.check()?;
        Ok(url)
    }

    /// Takes the text as given, for a command-line parser whose own error
    /// would print it; [`RedisUrl::check`] it before use.
    pub fn unchecked(url: &str) -> Self {
        Self(url.to_owned())
    }

    /// Whether redis-rs can connect to it.
    pub fn check(&self) -> Result<(), RedisSetupError> {
        if !(self.0.starts_with("redis://") || self.0.starts_with("rediss://")) {
            return Err(RedisSetupError::InvalidUrl(
                "expected redis://HOST:PORT or rediss://HOST:PORT",
            ));
        }
        // The library's own parser decides; its message may quote the URL,
        // so it is not passed on.
        self.0.as_str().into_connection_info().map_err(|_| {
            RedisSetupError::InvalidUrl("expected redis://[:PASSWORD@]HOST[:PORT][/DB]")
        })?;
        Ok(())
    }

    fn is_tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisUrl(<redacted>)")
    }
}

/// A password that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisPassword(String);

impl RedisPassword {
    /// A password as read from a file or the environment; a trailing newline
    /// (as `echo` or a Secret's editor leaves) is not part of it.
    pub fn new(password: &str) -> Self {
        Self(password.trim_end_matches(['\r', '\n']).to_owned())
    }
}

impl fmt::Debug for RedisPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisPassword(<redacted>)")
    }
}

/// Where Redis is and how to reach it.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://`.
    pub url: RedisUrl,
    /// Replaces the URL's password when set.
    pub password: Option<RedisPassword>,
    /// PEM roots for `rediss://`; the system's roots when unset.
    pub ca_file: Option<PathBuf>,
    /// Bound on every call.
    pub timeout: Duration,
    /// Pause between connection attempts while Redis cannot be reached.
    pub reconnect_every: Duration,
}

/// Why a Redis client could not be built (start-up errors).
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// `--redis-ca-file` could not be read.
    #[error("cannot read --redis-ca-file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--redis-url` is not one redis-rs can use (the URL is not quoted).
    #[error("--redis-url is not a valid Redis URL: {0}")]
    InvalidUrl(&'static str),
    /// `--redis-password-file` could not be read.
    #[error("cannot read --redis-password-file {path}: {source}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--redis-ca-file` given with a `redis://` URL.
    #[error("--redis-ca-file needs a rediss:// URL")]
    CaWithoutTls,
    /// redis-rs refused the settings (its message quotes no secret).
    #[error("invalid Redis settings: {0}")]
    Invalid(String),
}

/// Why a call failed; `kind()` is its metric label.
#[derive(Debug, thiserror::Error)]
pub enum RedisCallError {
    /// Not connected yet (start-up with Redis down).
    #[error("not connected to Redis")]
    NotConnected,
    /// No answer within `--redis-timeout`; the call may have run.
    #[error("no answer from Redis within {0:?}")]
    Timeout(Duration),
    /// redis-rs gave up waiting (connecting, or a reconnection it made).
    #[error("Redis timed out: {0}")]
    ClientTimeout(::redis::RedisError),
    /// The connection failed or dropped.
    #[error("Redis connection error: {0}")]
    Connection(::redis::RedisError),
    /// Redis ran the script and it failed, or its answer had another shape.
    #[error("Redis script error: {0}")]
    Script(::redis::RedisError),
    /// Anything else (authentication, a read-only replica, ...).
    #[error("Redis error: {0}")]
    Other(::redis::RedisError),
}

impl RedisCallError {
    fn from_redis(error: ::redis::RedisError) -> Self {
        use ::redis::{ErrorKind, ServerErrorKind};
        if error.is_timeout() {
            // redis-rs's own timeouts (connecting) count as ours.
            return Self::ClientTimeout(error);
        }
        if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal() {
            return Self::Connection(error);
        }
        match error.kind() {
            ErrorKind::Server(ServerErrorKind::NoScript)
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Parse => Self::Script(error),
            ErrorKind::Server(ServerErrorKind::ResponseError) if is_script_failure(&error) => {
                Self::Script(error)
            }
            _ => Self::Other(error),
        }
    }

    /// The `kind` label of `session_redis_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotConnected | Self::Connection(_) => "connection",
            Self::Timeout(_) | Self::ClientTimeout(_) => "timeout",
            Self::Script(_) => "script",
            Self::Other(_) => "other",
        }
    }
}

/// A Lua error (`ERR user_script:…`). Redis 7 names the script in other
/// errors too (`READONLY … script: …`, `OOM … script: …`): those are not
/// the script's fault.
fn is_script_failure(error: &::redis::RedisError) -> bool {
    error.code() == Some("ERR") && error.to_string().contains("script")
}

/// Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

/// A connection of its own (its own DNS lookup, TCP, TLS and AUTH), made to
/// find out whether Redis works before the replica relies on it again.
#[derive(Debug)]
pub struct FreshConnection(ConnectionManager);

#[derive(Debug)]
struct Inner {
    /// The connection every call uses; replaced when a probe's fresh one
    /// works, so a connection that died silently (no reset, no answer) is
    /// not kept for ever.
    manager: ArcSwapOption<ConnectionManager>,
    /// Becomes true once, when the first connection is made.
    connected: tokio::sync::watch::Sender<bool>,
    client: Client,
    config: ConnectionManagerConfig,
    connect_timeout: Duration,
    /// Loaded on every new connection, so that its first calls are one
    /// EVALSHA each, not three round trips (NOSCRIPT, SCRIPT LOAD, EVALSHA)
    /// inside one `--redis-timeout`.
    preload: Vec<Script>,
    /// Counts the connections adopted: a failure on one already replaced
    /// says nothing about the current one.
    generation: std::sync::atomic::AtomicU64,
    timeout: Duration,
    duration: HistogramVec,
    errors: IntCounterVec,
    connector: OnceLock<AbortOnDropHandle<()>>,
}

impl Redis {
    /// Builds the client and starts connecting in the background; calls
    /// fail with [`RedisCallError::NotConnected`] until it is connected.
    /// Registers `session_redis_*` in `registry`.
    /// `preload` are loaded once connected, so that the first calls are one
    /// EVALSHA each, not three round trips (NOSCRIPT, SCRIPT LOAD, EVALSHA).
    pub fn connect(
        settings: &RedisSettings,
        registry: &Registry,
        preload: Vec<Script>,
    ) -> Result<Self, RedisSetupError> {
        let client = client(settings)?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "session_redis_duration_seconds",
                "Duration of Redis calls by operation, timeouts included (at --redis-timeout).",
            )
            .buckets(REDIS_BUCKETS.to_vec()),
            &["op"],
        )
        .expect("valid histogram");
        let errors = IntCounterVec::new(
            Opts::new(
                "session_redis_errors_total",
                "Redis calls that failed, by kind (timeout, connection, script, other).",
            ),
            &["kind"],
        )
        .expect("valid counter");
        for kind in ERROR_KINDS {
            errors.with_label_values(&[*kind]);
        }
        // A second service in one process (tests) shares the registry's
        // first registration; the counters then only count that one.
        let _ = registry.register(Box::new(duration.clone()));
        let _ = registry.register(Box::new(errors.clone()));
        // Connecting (TCP, TLS, AUTH) takes longer than a call, and happens
        // off the request path (at start and in probes); the call timeout
        // still bounds every request that waits on a reconnection.
        let connect_timeout = Duration::from_secs(5);
        let redis = Self {
            inner: Arc::new(Inner {
                manager: ArcSwapOption::empty(),
                connected: tokio::sync::watch::Sender::new(false),
                client,
                config: ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(settings.reconnect_every),
                connect_timeout,
                preload,
                generation: std::sync::atomic::AtomicU64::new(0),
                timeout: settings.timeout,
                duration,
                errors,
                connector: OnceLock::new(),
            }),
        };
        let task = tokio::spawn(connect_until_connected(
            settings.reconnect_every,
            Arc::downgrade(&redis.inner),
        ));
        let _ = redis.inner.connector.set(AbortOnDropHandle::new(task));
        Ok(redis)
    }

    /// True once the first connection was made (it reconnects by itself
    /// after that).
    pub fn is_connected(&self) -> bool {
        self.inner.manager.load().is_some()
    }

    /// A new connection, not yet used by anyone else, with the scripts
    /// loaded; bounded by the connect timeout (5 s).
    pub async fn connect_anew(&self) -> Result<FreshConnection, RedisCallError> {
        self.connect_with(self.inner.config.clone()).await
    }

    /// A new connection for blocking reads (`XREAD BLOCK`): redis-rs's own
    /// response timeout (500 ms) is off, so every call on it must pass its
    /// own bound to [`Redis::query_on`].
    pub async fn connect_for_blocking_reads(&self) -> Result<FreshConnection, RedisCallError> {
        self.connect_with(self.inner.config.clone().set_response_timeout(None))
            .await
    }

    async fn connect_with(
        &self,
        config: ConnectionManagerConfig,
    ) -> Result<FreshConnection, RedisCallError> {
        let inner = &self.inner;
        let made = tokio::time::timeout(
            inner.connect_timeout,
            inner.client.get_connection_manager_with_config(config),
        )
        .await;
        let mut manager = match made {
            Err(_) => Err(RedisCallError::Timeout(inner.connect_timeout)),
            Ok(made) => made.map_err(RedisCallError::from_redis),
        }
        .inspect_err(|error| self.count(error))?;
        for script in &inner.preload {
            // A failure here costs only the first call's NOSCRIPT.
            let _ =
                tokio::time::timeout(inner.connect_timeout, script.load_async(&mut manager)).await;
        }
        Ok(FreshConnection(manager))
    }

    /// Every call from now on uses `connection`.
    pub fn adopt(&self, connection: FreshConnection) {
        self.inner.manager.store(Some(Arc::new(connection.0)));
        self.inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Which adopted connection calls use now; compare before and after a
    /// failed call to tell a failure of the current connection from one of
    /// a connection already replaced.
    pub fn generation(&self) -> u64 {
        self.inner
            .generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Turns true once, when the first connection is made. The receiver
    /// does not keep the client alive.
    pub fn connected_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }

    /// Runs a script, bounded by `--redis-timeout`; `op` labels its metrics.
    pub async fn run_script<T: FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisCallError> {
        self.bounded(op, self.shared_connection()?, invocation)
            .await
    }

    /// Runs a script on `connection` rather than the shared one.
    pub async fn run_script_on<T: FromRedisValue>(
        &self,
        connection: &FreshConnection,
        op: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisCallError> {
        self.bounded(op, connection.0.clone(), invocation).await
    }

    /// One script call: timed, bounded, its failure classified and counted.
    /// A call that times out is dropped, not re-sent (it may have run); the
    /// only resend is redis-rs's own after NOSCRIPT, which means the script
    /// did not run.
    async fn bounded<T: FromRedisValue>(
        &self,
        op: &'static str,
        mut connection: ConnectionManager,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisCallError> {
        self.measured(
            op,
            self.inner.timeout,
            invocation.invoke_async(&mut connection),
        )
        .await
    }

    /// Runs a command on the shared connection, bounded by `--redis-timeout`.
    pub async fn query<T: FromRedisValue>(
        &self,
        op: &'static str,
        command: &::redis::Cmd,
    ) -> Result<T, RedisCallError> {
        let mut connection = self.shared_connection()?;
        self.measured(op, self.inner.timeout, command.query_async(&mut connection))
            .await
    }

    /// Sends a pipeline on the shared connection, bounded by `timeout`.
    pub async fn pipeline<T: FromRedisValue>(
        &self,
        op: &'static str,
        pipeline: &::redis::Pipeline,
        timeout: Duration,
    ) -> Result<T, RedisCallError> {
        let mut connection = self.shared_connection()?;
        self.measured(op, timeout, pipeline.query_async(&mut connection))
            .await
    }

    /// Runs a command on `connection`, bounded by `timeout` (for a blocking
    /// read: its block time plus `--redis-timeout`).
    pub async fn query_on<T: FromRedisValue>(
        &self,
        connection: &FreshConnection,
        op: &'static str,
        command: &::redis::Cmd,
        timeout: Duration,
    ) -> Result<T, RedisCallError> {
        let mut connection = connection.0.clone();
        self.measured(op, timeout, command.query_async(&mut connection))
            .await
    }

    /// `--redis-timeout`.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// One call: timed, bounded, its failure classified and counted.
    async fn measured<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        call: impl std::future::Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, RedisCallError> {
        let started = tokio::time::Instant::now();
        let answer = tokio::time::timeout(timeout, call).await;
        // Timeouts are observed too: a slow Redis shows in the histogram.
        self.inner
            .duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Err(_) => Err(RedisCallError::Timeout(timeout)),
            Ok(answer) => answer.map_err(RedisCallError::from_redis),
        }
        .inspect_err(|error| self.count(error))
    }

    /// The connection every call uses; NotConnected (counted) before the
    /// first one is made.
    fn shared_connection(&self) -> Result<ConnectionManager, RedisCallError> {
        match self.inner.manager.load_full() {
            Some(manager) => Ok(ConnectionManager::clone(&manager)),
            None => {
                let error = RedisCallError::NotConnected;
                self.count(&error);
                Err(error)
            }
        }
    }

    /// `session_redis_errors_total{kind}`.
    fn count(&self, error: &RedisCallError) {
        self.inner.errors.with_label_values(&[error.kind()]).inc();
    }
}

/// Checks the settings without connecting (reads the CA file).
pub fn check(settings: &RedisSettings) -> Result<(), RedisSetupError> {
    settings.url.check()?;
    client(settings).map(|_| ())
}

/// The client for `settings`: the password replaced when one is given
/// apart from the URL, and the CA roots loaded for `rediss://`.
fn client(settings: &RedisSettings) -> Result<Client, RedisSetupError> {
    let invalid =
        |error: ::redis::RedisError| RedisSetupError::Invalid(format!("{:?}", error.kind()));
    let mut info: ConnectionInfo = settings
        .url
        .0
        .as_str()
        .into_connection_info()
        .map_err(invalid)?;
    if let Some(password) = &settings.password {
        let redis = info.redis_settings().clone().set_password(&password.0);
        info = info.set_redis_settings(redis);
    }
    match &settings.ca_file {
        None => Client::open(info).map_err(invalid),
        Some(_) if !settings.url.is_tls() => Err(RedisSetupError::CaWithoutTls),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| RedisSetupError::CaFile {
                path: path.clone(),
                source,
            })?;
            let certificates = ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            Client::build_with_tls(info, certificates).map_err(invalid)
        }
    }
}

/// Connects, retrying every `reconnect_every` while Redis cannot be
/// reached, then hands the connection over and ends (the connection
/// manager reconnects by itself from then on, and probes replace it).
async fn connect_until_connected(reconnect_every: Duration, inner: std::sync::Weak<Inner>) {
    let mut logged = false;
    loop {
        let Some(redis) = inner.upgrade().map(|inner| Redis { inner }) else {
            return;
        };
        match redis.connect_anew().await {
            Ok(connection) => {
                redis.adopt(connection);
                redis.inner.connected.send_replace(true);
                tracing::info!("connected to Redis");
                return;
            }
            Err(error) if !logged => {
                tracing::warn!(
                    %error,
                    retry_every = ?reconnect_every,
                    "cannot connect to Redis; retrying in the background"
                );
                logged = true;
            }
            Err(_) => {}
        }
        drop(redis);
        tokio::time::sleep(reconnect_every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_never_printed() {
        let url = RedisUrl::parse("rediss://:s3cret@cache.example:6379").expect("valid");
        assert!(url.is_tls());
        assert!(!format!("{url:?}").contains("s3cret"));
        assert!(RedisUrl::parse("http://cache.example").is_err());
        let bad = RedisUrl::parse("redis://:s3cret@cache:notaport").expect_err("no port");
        assert!(!bad.to_string().contains("s3cret"), "{bad}");
        let password = RedisPassword::new("hunter2\n");
        assert_eq!(
            password.0, "hunter2",
            "the file's newline is not the password's"
        );
        assert!(!format!("{password:?}").contains("hunter2"));
    }

    #[test]
    fn a_ca_file_needs_tls_and_must_be_readable() {
        let settings = |url: &str, ca: &str| RedisSettings {
            url: RedisUrl::parse(url).expect("valid"),
            password: None,
            ca_file: Some(PathBuf::from(ca)),
            timeout: Duration::from_millis(50),
            reconnect_every: Duration::from_secs(1),
        };
        assert!(matches!(
            client(&settings("redis://127.0.0.1:1", "/nonexistent")),
            Err(RedisSetupError::CaWithoutTls)
        ));
        assert!(matches!(
            client(&settings("rediss://127.0.0.1:1", "/nonexistent")),
            Err(RedisSetupError::CaFile { .. })
        ));
    }
}
