//! The processes a benchmark run starts: the fake Cognito and the gRPC floor
//! (this binary in another role) and the service itself (the release binary).
//! Each is killed when its handle drops.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// A child process and the address it serves on.
pub(crate) struct Running {
    child: Child,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// The line that named the address (the service's names its metrics
    /// port too).
    announced: String,
}

impl Running {
    /// The process id, for reading its RSS.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The service's metrics port, as its start-up line names it.
    pub(crate) fn metrics_addr(&self) -> Option<SocketAddr> {
        let line = &self.announced;
        let start = line.find(r#""metrics_addr":""#)? + 16;
        let end = start + line[start..].find('"')?;
        line[start..end].parse().ok()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This binary in another role (`fake-cognito`, `floor-grpc`); it prints
/// `LISTENING <addr>` first.
pub(crate) fn spawn_role(args: &[&str]) -> Running {
    let exe = std::env::current_exe().expect("own path");
    let mut command = Command::new(exe);
    command.args(args);
    spawn(command, |line| {
        line.strip_prefix("LISTENING ")
            .and_then(|addr| addr.parse().ok())
    })
}

/// The service binary with test credentials, no AWS files or instance
/// metadata, `cognito` as its endpoint and a loopback metrics port.
fn service_command(bin: &Path, cognito: SocketAddr) -> Command {
    let mut command = Command::new(bin);
    command
        .env_clear()
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "AKIDBENCHBENCHBENCH0")
        .env("AWS_SECRET_ACCESS_KEY", "bench-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("SESSION_LOG_USER_HASH_KEY", "bench")
        // Runtime experiments: `TOKIO_WORKER_THREADS=1 scripts/bench`.
        .envs(std::env::vars().filter(|(k, _)| k == "TOKIO_WORKER_THREADS"))
        .args(["--cognito-endpoint", &format!("http://{cognito}")])
        .args(["--metrics-listen", "127.0.0.1:0", "--drain-delay", "0s"])
        // Every call names a user of its own, so each one is looked up; the
        // scenarios measure the sign-out budget (P3, P7), not the lookups'.
        .args(["--user-lookup-rate-limit-rps", "1000000"])
        .args(["--user-lookup-burst", "1000000"]);
    command
}

/// The service on port 0, with `args` on top of [`service_command`]; returns
/// once its JSON log names its address.
pub(crate) fn spawn_service(bin: &Path, cognito: SocketAddr, args: &[String]) -> Running {
    let mut command = service_command(bin, cognito);
    command.args(["--listen", "127.0.0.1:0"]).args(args);
    spawn(command, |line| {
        let start = line.find(r#""addr":""#)? + 8;
        let end = start + line[start..].find('"')?;
        line[start..end].parse().ok()
    })
}

/// The service on `listen`, returned at once, its output discarded: for
/// timing how long it takes to serve.
pub(crate) fn start_service(bin: &Path, cognito: SocketAddr, listen: SocketAddr) -> Running {
    let child = service_command(bin, cognito)
        .args(["--listen", &listen.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    Running {
        child,
        addr: listen,
        announced: String::new(),
    }
}

/// Starts `command`, waits for the line that names its address, and keeps
/// draining its stdout (a service under load logs a line per call).
fn spawn(mut command: Command, address: impl Fn(&str) -> Option<SocketAddr>) -> Running {
    let mut running = Running {
        child: command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}")),
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        announced: String::new(),
    };
    let stdout = running.child.stdout.take().expect("piped stdout");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    loop {
        // On a panic here, dropping `running` kills the child.
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{command:?} did not name its address"));
        if let Some(addr) = address(&line) {
            // Keep the pipe drained; the lines themselves are not needed.
            std::thread::spawn(move || while lines.recv().is_ok() {});
            running.addr = addr;
            running.announced = line;
            return running;
        }
    }
}

/// CPU time (user + system) `pid` has used so far (Linux, clock ticks of
/// 10 ms: use over many calls).
pub(crate) fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Resident set size of `pid`, in KiB (Linux).
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
