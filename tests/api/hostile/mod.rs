//! The connection-level attacks of issue 17, one test per row of its table,
//! against the real binary on loopback (started under a low open-files limit
//! where that keeps the attack small). Each test prints what it measured
//! (`cargo test --test api hostile -- --nocapture`); the assertions leave
//! wide margins, so a slow machine passes and the old code does not.
//! Settings go in through SESSION_* variables, which an older build ignores
//! when it lacks them, so `HOSTILE_BINARY=path/to/old/session-service` runs
//! the same attacks against another build (the report's "before" column).

mod callers;
mod frames;
mod idle;
mod metrics_port;
mod requests;
mod retirement;
mod silent;

use std::{
    io::BufRead,
    net::SocketAddr,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use session_service::proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient};
use tonic::transport::Channel;

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{POOL, binary},
};

/// The real binary, its addresses, and every log line it wrote.
pub(crate) struct Service {
    child: KillOnDrop,
    pub(crate) addr: SocketAddr,
    pub(crate) metrics_addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    pub(crate) fake: FakeCognito,
}

impl Service {
    /// Starts the binary with `settings` (SESSION_* variables), under
    /// `prlimit --nofile=N` when `nofile` is given, talking to a fake
    /// Cognito that answers OK.
    pub(crate) async fn start(nofile: Option<u32>, settings: &[(&str, &str)]) -> Self {
        let fake = FakeCognito::start(Reply::Ok).await;
        let endpoint = fake.endpoint();
        let program = std::env::var("HOSTILE_BINARY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_session-service").to_owned());
        let template = binary();
        let mut command = std::process::Command::new(crate::tools::prlimit());
        command
            .env_clear()
            .envs(template.get_envs().filter_map(|(k, v)| Some((k, v?))));
        match nofile {
            Some(nofile) => command.arg(format!("--nofile={nofile}")),
            None => command.arg("--nofile=4096"),
        };
        command.args(["--", &program]);
        let child = command
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "AKIDTESTTESTTESTTEST")
            .env("AWS_SECRET_ACCESS_KEY", "test-secret")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--log-format", "json", "--cognito-endpoint", &endpoint])
            .args(["--drain-delay", "0s", "--shutdown-grace", "1s"])
            .envs(settings.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("binary starts");
        // Killed even if a panic below comes before `Service` exists.
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addrs_tx, addrs) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                    && let (Some(addr), Some(metrics)) =
                        (value["addr"].as_str(), value["metrics_addr"].as_str())
                {
                    let _ = addrs_tx.send((addr.to_owned(), metrics.to_owned()));
                }
                sink.lock().expect("log").push(line);
            }
        });
        let (addr, metrics_addr) = addrs
            .recv_timeout(Duration::from_secs(60))
            .expect("the binary logs its addresses within 60 s");
        Self {
            child,
            addr: addr.parse().expect("address"),
            metrics_addr: metrics_addr.parse().expect("address"),
            log,
            fake,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Open file descriptors now.
    pub(crate) fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(Iterator::count)
            .unwrap_or(0)
    }

    /// Resident memory now, in MiB.
    pub(crate) fn rss_mib(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib / 1024.0
    }

    /// CPU seconds (user + system) the service has used so far.
    pub(crate) fn cpu_secs(&self) -> f64 {
        cpu_secs_of(&format!("/proc/{}/stat", self.pid()))
    }

    /// Log lines so far matching `pred`.
    pub(crate) fn log_lines(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|line| pred(line))
            .cloned()
            .collect()
    }
}

/// The binary's process, killed and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of a `/proc/.../stat` file, in seconds (USER_HZ is 100).
pub(crate) fn cpu_secs_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).expect("/proc stat");
    // Fields after the parenthesised command name, which may hold spaces.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

/// One sign-out on a channel of its own (a new connection), within `limit`:
/// how long it took, or why it failed.
pub(crate) async fn canary(addr: SocketAddr, limit: Duration) -> Result<Duration, String> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(limit)
        .connect_lazy();
    call_on(channel, limit).await
}

/// One sign-out on `channel`, within `limit`.
pub(crate) async fn call_on(channel: Channel, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut client = SessionServiceClient::new(channel);
    let call = client.global_sign_out(GlobalSignOutRequest {
        user_pool_id: POOL.into(),
        username: "canary".into(),
    });
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Opens up to `n` TCP connections to `addr` that send nothing, each given
/// `connect_limit` to connect (connections beyond the server's backlog are
/// not completed by the kernel).
pub(crate) async fn idle_connections(
    addr: SocketAddr,
    n: usize,
    connect_limit: Duration,
) -> Vec<tokio::net::TcpStream> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        set.spawn(async move {
            tokio::time::timeout(connect_limit, tokio::net::TcpStream::connect(addr))
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    set.join_all().await.into_iter().flatten().collect()
}

/// Prints one measured figure for the report.
pub(crate) fn figure(row: u32, what: &str) {
    println!("hostile row {row}: {what}");
}
