//! A real `redis-server` (Debian's package) for the fleet-budget tests, on a
//! loopback port of its own, without persistence, killed on drop. Missing
//! `redis-server` fails the test (`scripts/test` installs it), never skips.
//! The tests kill it, freeze it (SIGSTOP) and start it again on the same
//! port to play an outage.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{helpers::scratch_dir, pki::TestCa, tools};

pub(crate) fn redis_server_binary() -> PathBuf {
    tools::require("redis-server", "REDIS_SERVER", None)
}

/// How the server is reached.
#[derive(Clone)]
enum Transport {
    Plain,
    /// `rediss://` on redis-server's own TLS port, with a test CA.
    Tls {
        ca_file: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

pub(crate) struct TestRedis {
    child: Option<Child>,
    port: u16,
    transport: Transport,
    password: Option<String>,
}

impl TestRedis {
    /// Plain TCP, no password.
    pub(crate) fn start() -> Self {
        Self::start_with(Transport::Plain, None)
    }

    /// TLS only (`--port 0` turns plain TCP off), with `requirepass`.
    pub(crate) fn start_tls(password: &str) -> Self {
        let dir = scratch_dir("redis-tls");
        let ca = TestCa::new("redis test CA");
        let server = ca.server("redis");
        let file = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write PEM");
            path
        };
        let transport = Transport::Tls {
            ca_file: file("ca.pem", &ca.pem()),
            cert: file("cert.pem", &server.cert_pem),
            key: file("key.pem", &server.key_pem),
        };
        Self::start_with(transport, Some(password.to_owned()))
    }

    /// A server on a port nobody listens on yet, not started (start it with
    /// [`TestRedis::restart`]): the service starts with Redis down.
    pub(crate) fn not_started() -> Self {
        Self {
            child: None,
            port: free_port(),
            transport: Transport::Plain,
            password: None,
        }
    }

    fn start_with(transport: Transport, password: Option<String>) -> Self {
        // The port is free when chosen; if another process takes it before
        // redis-server binds, try another.
        for _ in 0..5 {
            let mut redis = Self {
                child: None,
                port: free_port(),
                transport: transport.clone(),
                password: password.clone(),
            };
            if redis.spawn() {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts it (again) on its port, with no data: what a restart without
    /// persistence looks like.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        assert!(self.spawn(), "redis-server did not start on its old port");
    }

    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let mut command = Command::new(redis_server_binary());
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &self.transport {
            Transport::Plain => {
                command.args(["--port", &port]);
            }
            Transport::Tls { ca_file, cert, key } => {
                command
                    .args(["--port", "0", "--tls-port", &port])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca_file)
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server is required (scripts/test installs it): {e}"));
        for _ in 0..250 {
            if TcpStream::connect(self.addr()).is_ok() {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().ok().flatten().is_some() {
                return false; // exited: the port was taken meanwhile
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The URL the service is given (the password, when there is one, is
    /// passed apart, as a Secret would be).
    pub(crate) fn url(&self) -> String {
        match self.transport {
            Transport::Plain => format!("redis://{}", self.addr()),
            // The certificate names localhost and 127.0.0.1.
            Transport::Tls { .. } => format!("rediss://localhost:{}", self.port),
        }
    }

    /// The test CA's file, for `--redis-ca-file` (TLS servers only).
    pub(crate) fn ca_file(&self) -> &Path {
        match &self.transport {
            Transport::Tls { ca_file, .. } => ca_file,
            Transport::Plain => panic!("not a TLS server"),
        }
    }

    /// SIGKILL: the connection drops at once.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: connections stay open and nothing answers (a hung Redis).
    pub(crate) fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`TestRedis::freeze`].
    pub(crate) fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status();
        assert!(sent.expect("kill runs").success(), "kill {signal} {pid}");
    }

    /// One command on a connection of the test's own, to look at or
    /// change what the service keeps (plain servers only).
    pub(crate) async fn command(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).expect("valid url");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("the test connects to Redis");
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command
            .query_async(&mut connection)
            .await
            .expect("the command runs")
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // SIGKILL ends a stopped process too; the SIGCONT is for the
            // case where the kill fails, so nothing is left stopped.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
