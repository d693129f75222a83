//! Starts the real server on port 0 and hands out a generated client.

use std::{net::SocketAddr, sync::Once, time::Duration};

use aws_config::SdkConfig;
use aws_sdk_cognitoidentityprovider::config::{
    BehaviorVersion, Credentials, Region, SharedCredentialsProvider,
};
use clap::Parser;
use session_service::{
    config::{Config, LogFormat},
    proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient},
    startup::Application,
    telemetry,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

/// A username no error message may ever repeat.
pub(crate) const SECRET_USERNAME: &str = "alice.secret@example.com";
pub(crate) const POOL: &str = "us-east-1_TestPool1";

/// Logs go to the test output only when TEST_LOG is set.
fn init_test_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            telemetry::init(telemetry::subscriber(
                LogFormat::Text,
                "debug",
                std::io::stdout,
                None,
            ));
        }
    });
}

/// Flags for a test server talking to `endpoint`; tests adjust fields.
pub(crate) fn test_config(endpoint: &str) -> Config {
    Config::try_parse_from([
        "session-service",
        "--listen",
        "127.0.0.1:0",
        "--cognito-endpoint",
        endpoint,
        "--upstream-initial-backoff",
        "1ms",
        "--shutdown-grace",
        "5s",
        "--drain-delay",
        "0s",
        "--metrics-listen",
        "127.0.0.1:0",
        // Tests send many users at the sign-out budget: the lookups' own
        // budget stays out of their way (user_lookup.rs tests it).
        "--user-lookup-rate-limit-rps",
        "1000000",
        "--user-lookup-burst",
        "1000000",
    ])
    .expect("test flags parse")
}

/// AWS settings with fixed test credentials: nothing is read from the machine.
pub(crate) fn test_sdk_config() -> SdkConfig {
    sdk_config_with(SharedCredentialsProvider::new(Credentials::new(
        "AKIDTESTTESTTESTTEST",
        "test-secret",
        None,
        None,
        "session-service-tests",
    )))
}

pub(crate) fn sdk_config_with(credentials: SharedCredentialsProvider) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(credentials)
        .build()
}

pub(crate) struct TestApp {
    pub(crate) addr: SocketAddr,
    pub(crate) metrics_addr: SocketAddr,
    pub(crate) health_addr: Option<SocketAddr>,
    pub(crate) client: SessionServiceClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl TestApp {
    pub(crate) async fn spawn(config: Config) -> Self {
        Self::spawn_with(config, test_sdk_config()).await
    }

    pub(crate) async fn spawn_with(config: Config, sdk_config: SdkConfig) -> Self {
        init_test_logging();
        let app = Application::build(&config, &sdk_config)
            .await
            .expect("application builds");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let health_addr = app.health_addr();
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            app.run_until_stopped(async {
                let _ = stop.await;
            })
            .await
            .expect("server runs");
        });
        let client = SessionServiceClient::new(channel(addr).await);
        Self {
            addr,
            metrics_addr,
            health_addr,
            client,
            shutdown: Some(shutdown),
            server: Some(server),
        }
    }

    /// Asks for a graceful shutdown; returns the server task to await.
    pub(crate) fn shut_down(&mut self) -> JoinHandle<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.server.take().expect("server not shut down yet")
    }

    pub(crate) async fn sign_out(
        &self,
        user_pool_id: &str,
        username: &str,
    ) -> Result<tonic::Response<session_service::proto::GlobalSignOutResponse>, Status> {
        self.client
            .clone()
            .global_sign_out(GlobalSignOutRequest {
                user_pool_id: user_pool_id.into(),
                username: username.into(),
            })
            .await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}

/// A plaintext channel; it connects on first use (a TLS server's tests make
/// their own).
pub(crate) async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// GET /metrics: asserts a 200 in the Prometheus text format, returns the body.
pub(crate) async fn metrics_text(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// The most of `arrivals` in any window `[a, a + window)` starting at one
/// of them (the busiest second at a fake Cognito, say).
pub(crate) fn max_in_window(arrivals: &[std::time::Instant], window: Duration) -> usize {
    let mut sorted = arrivals.to_vec();
    sorted.sort();
    (0..sorted.len())
        .map(|i| sorted[i..].partition_point(|&t| t < sorted[i] + window))
        .max()
        .unwrap_or(0)
}

/// The `p` quantile (0..=1) of `sorted`, nearest rank; zero when empty.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A fresh directory of this test's own under the target's temp dir.
pub(crate) fn scratch_dir(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Asserts code, ErrorInfo (domain and reason), RetryInfo presence, and that
/// the message does not leak the username.
pub(crate) fn assert_error(status: &Status, code: Code, reason: &str, retryable: bool) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "session-service");
    assert_eq!(info.reason, reason);
    assert_eq!(
        status.get_details_retry_info().is_some(),
        retryable,
        "RetryInfo presence for {reason}"
    );
    assert!(!status.message().contains(SECRET_USERNAME));
    assert!(
        !status.message().contains("fake error message"),
        "echoed upstream text"
    );
}

/// Waits for `child` to exit, killing it and failing after `limit`.
pub(crate) fn wait_for_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Flags that keep the AdminGetUser budget out of the way of tests that
/// send many users at the sign-out path (user_lookup.rs tests it).
pub(crate) const UNLIMITED_LOOKUPS: [&str; 4] = [
    "--user-lookup-rate-limit-rps",
    "1000000",
    "--user-lookup-burst",
    "1000000",
];

/// The real binary with an explicit, minimal environment: no inherited AWS
/// or SESSION_ settings, no AWS profile files, no instance metadata. The test
/// process's own environment is never changed.
pub(crate) fn binary() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_session-service"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", env!("CARGO_TARGET_TMPDIR"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    command
}

/// The real binary, started with test AWS credentials, ports 0, JSON logs,
/// `extra_args` and `extra_env` (set on the child only). Returns the child,
/// its gRPC address and a channel of its log lines.
pub(crate) fn spawn_binary(
    extra_args: &[&str],
    extra_env: &[(&str, &str)],
) -> (
    std::process::Child,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::BufRead;
    let mut child = binary()
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "AKIDTESTTESTTESTTEST")
        .env("AWS_SECRET_ACCESS_KEY", "test-secret")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .envs(extra_env.iter().copied())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .args(UNLIMITED_LOOKUPS)
        .args(extra_args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("binary starts");
    // Read the log on a thread of its own (it also keeps the pipe drained),
    // and give up, rather than hang, if no address shows up.
    let stdout = child.stdout.take().expect("piped");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let addr = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the binary logs its address within 60 s");
        let log: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        if let Some(addr) = log["addr"].as_str() {
            break addr.parse().expect("socket address");
        }
    };
    (child, addr, lines)
}

/// Sends SIGTERM to `child`.
pub(crate) fn sigterm(child: &std::process::Child) {
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(kill.expect("kill runs").success());
}

/// SIGTERM, then the exit status (waited for off the async runtime).
pub(crate) async fn terminate(mut child: std::process::Child) -> std::process::ExitStatus {
    sigterm(&child);
    tokio::task::spawn_blocking(move || wait_for_exit(&mut child, Duration::from_secs(30)))
        .await
        .expect("wait task")
}
