//! A throw-away `redis-server` for the library's tests (Debian's package;
//! the tests fail, never skip, without it).

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

use redis::aio::MultiplexedConnection;

/// A throw-away Redis on a free loopback port, killed on drop.
pub(crate) struct TestRedis {
    child: Child,
    port: u16,
}

impl TestRedis {
    pub(crate) fn start() -> Self {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            if let Some(child) = spawn_on(port) {
                return Self { child, port };
            }
        }
        panic!("redis-server did not start");
    }

    /// SIGKILL, then a new empty server on the same port.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn restart(&mut self) {
        self.child = spawn_on(self.port).expect("redis-server restarts on its port");
    }

    pub(crate) async fn connection(&self) -> MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("connected")
    }
}

/// A redis-server on `port`, once it accepts connections; `None` if it
/// exited (the port was taken meanwhile).
fn spawn_on(port: u16) -> Option<Child> {
    let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let mut child = Command::new(&binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("redis-server is required (scripts/test installs it): {e}"));
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(child);
        }
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestRedis {
    /// `redis://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
