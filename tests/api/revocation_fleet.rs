//! Revocation watermarks across a fleet: service processes (the real
//! binary) on one real Redis, a fake Cognito serving the test's own keys.
//! A sign-out on one replica revokes on every other, on replicas started
//! later, and survives Redis losing its data while any replica holds it.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use session_service::{proto::session_service_client::SessionServiceClient, tokens::mint::MintKey};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Code, transport::Channel};

use crate::{
    fake_cognito::{FakeCognito, Reply, synthesized_sub},
    helpers::{POOL, assert_error, binary, channel, percentile},
    redis_server::TestRedis,
    revocation::{fake_with_keys, metric, now, token_for, verdict},
    watch::{end, next, watch},
};

/// Far above the 100 ms the fleet is meant to take, so that a loaded
/// machine never fails the test; the measured delays are printed.
const PROPAGATION_BOUND: Duration = Duration::from_secs(5);
const CAUGHT_UP: &str = "revocation log: caught up; following it";

/// One fleet's processes at a time: two fleets on two cores would measure
/// the machine, not the propagation.
static ONE_FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One service process on the fleet's Redis; killed on drop.
struct Replica {
    name: &'static str,
    _process: tokio::process::Child,
    client: SessionServiceClient<Channel>,
    metrics: SocketAddr,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Replica {
    /// Starts the binary and returns once it has loaded the revocation log.
    async fn start(name: &'static str, redis: &TestRedis, cognito: &FakeCognito) -> Self {
        let mut process = tokio::process::Command::from(binary())
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "AKIDTESTTESTTESTTEST")
            .env("AWS_SECRET_ACCESS_KEY", "test-secret")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--log-format", "json", "--drain-delay", "0s"])
            .args(["--cognito-endpoint", &cognito.endpoint()])
            .args(["--redis-url", &redis.url()])
            // A starved core must not put a replica on its fallback; and
            // after an outage it retries Redis soon.
            .args(["--redis-timeout", "1s", "--redis-cooldown", "200ms"])
            .args(["--rate-limit-rps", "1000", "--rate-limit-burst", "1000"])
            .args(crate::helpers::UNLIMITED_LOOKUPS)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("binary starts");
        let stdout = process.stdout.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        // Also keeps the pipe drained for as long as the process runs.
        tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = stdout.next_line().await {
                let line = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                lines.lock().expect("not poisoned").push(line);
            }
        });
        let started = first_line(name, &log, |line| {
            line["addr"].is_string() && line["metrics_addr"].is_string()
        })
        .await;
        let address = |key: &str| {
            started[key]
                .as_str()
                .and_then(|addr| addr.parse().ok())
                .expect("a socket address")
        };
        let replica = Self {
            name,
            _process: process,
            client: SessionServiceClient::new(channel(address("addr")).await),
            metrics: address("metrics_addr"),
            log,
        };
        replica.wait_for_message(CAUGHT_UP).await;
        replica
    }

    /// The first log line that `matches`, waiting up to 60 s for it.
    async fn wait_for_log(
        &self,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        first_line(self.name, &self.log, matches).await
    }

    async fn wait_for_message(&self, message: &str) -> serde_json::Value {
        self.wait_for_log(|line| line["message"] == message).await
    }

    fn log(&self) -> String {
        let log = self.log.lock().expect("not poisoned");
        log.iter().map(|line| format!("{line}\n")).collect()
    }

    async fn sign_out(&self, username: &str) {
        self.client
            .clone()
            .global_sign_out(session_service::proto::GlobalSignOutRequest {
                user_pool_id: POOL.into(),
                username: username.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{}: sign-out of {username}: {e:?}", self.name));
    }

    async fn verdict(&self, token: &str) -> String {
        verdict(&self.client, token, POOL).await
    }

    /// Polls VerifyToken every millisecond until `token` is revoked; returns
    /// when that was seen.
    async fn wait_until_revoked(&self, token: &str) -> Instant {
        let deadline = Instant::now() + PROPAGATION_BOUND;
        loop {
            if self.verdict(token).await == "revoked" {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{}: not revoked within {PROPAGATION_BOUND:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The first line of `log` that `matches`, waiting up to 60 s for it.
async fn first_line(
    name: &str,
    log: &Mutex<Vec<serde_json::Value>>,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        {
            let log = log.lock().expect("not poisoned");
            if let Some(line) = log.iter().find(|line| matches(line)) {
                return line.clone();
            }
            let all: String = log.iter().map(|line| format!("{line}\n")).collect();
            assert!(
                Instant::now() < deadline,
                "{name}: not logged within 60 s:\n{all}"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A token of `username`'s sub (as the fake resolves it), signed in a
/// minute ago.
fn token_of(key: &MintKey, username: &str) -> String {
    let signed_in = now() - 60;
    token_for(key, &synthesized_sub(username), signed_in, signed_in)
}

#[tokio::test]
async fn a_sign_out_on_one_replica_revokes_on_another_at_once_and_on_one_started_later() {
    let _one_fleet = ONE_FLEET.lock().await;
    let redis = TestRedis::start();
    let (fake, key) = fake_with_keys(Reply::Ok).await;
    let a = Replica::start("A", &redis, &fake).await;
    let b = Replica::start("B", &redis, &fake).await;
    let mut watching_b = watch(&b.client, &[POOL], "").await.expect("watching B");
    // Arrange check, and warms B's keys: what follows measures the log.
    assert_eq!(b.verdict(&token_of(&key, "p-0")).await, "active");

    let (mut from_return, mut from_send) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let user = format!("p-{i}");
        let token = token_of(&key, &user);
        let sent = Instant::now();
        a.sign_out(&user).await;
        let returned = Instant::now();
        let revoked = b.wait_until_revoked(&token).await;
        from_return.push(revoked.saturating_duration_since(returned));
        from_send.push(revoked - sent);
    }
    from_return.sort();
    from_send.sort();
    println!(
        "revocation propagation A -> B over {} sign-outs: from A's answer p50 {:?} p99 {:?} max {:?}; \
         from the request p50 {:?} p99 {:?}",
        from_return.len(),
        percentile(&from_return, 0.5),
        percentile(&from_return, 0.99),
        from_return.last().expect("measured"),
        percentile(&from_send, 0.5),
        percentile(&from_send, 0.99),
    );
    let mut watched = Vec::new();
    for _ in 0..20 {
        watched.push(next(&mut watching_b).await.sub);
    }
    let c = Replica::start("C", &redis, &fake).await;

    let expected: Vec<_> = (0..20)
        .map(|i| synthesized_sub(&format!("p-{i}")))
        .collect();
    assert_eq!(watched, expected, "B's watcher got A's sign-outs, in order");
    assert_eq!(c.verdict(&token_of(&key, "p-0")).await, "revoked");
    assert_eq!(c.verdict(&token_of(&key, "p-19")).await, "revoked");
    assert_eq!(
        c.verdict(&token_of(&key, "never-signed-out")).await,
        "active"
    );
}

#[tokio::test]
async fn redis_losing_the_log_is_logged_counted_and_repaired_from_the_replicas() {
    let _one_fleet = ONE_FLEET.lock().await;
    let mut redis = TestRedis::start();
    let (fake, key) = fake_with_keys(Reply::Ok).await;
    let a = Replica::start("A", &redis, &fake).await;
    a.sign_out("lost-1").await;
    let token = token_of(&key, "lost-1");
    assert_eq!(a.verdict(&token).await, "revoked");
    let mut watching = watch(&a.client, &[POOL], "").await.expect("watching A");
    let before_the_loss = next(&mut watching).await;

    // A restart without persistence: the same port, no data.
    redis.kill();
    redis.restart();

    let lost = a
        .wait_for_log(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.contains("lost the revocation watermarks"))
        })
        .await;
    assert_eq!(lost["level"], "ERROR", "{lost}");
    a.wait_for_message("revocation log: watermarks written back")
        .await;
    let resets = metric(a.metrics, "session_revocation_log_resets_total").await;
    assert_eq!(resets, 1.0, "{}", a.log());
    // From A's own memory, whatever the write-back did: the write-back is
    // checked on D, started after the loss, below.
    assert_eq!(
        a.verdict(&token).await,
        "revoked",
        "A's memory still holds it"
    );
    let status = end(&mut watching).await;
    assert_error(&status, Code::Unavailable, "REVOCATION_LOG_RESET", true);
    // The cursor is of the lost log: resuming with it replays what is live.
    let mut resumed = watch(&a.client, &[POOL], &before_the_loss.cursor)
        .await
        .expect("resumed");
    assert_eq!(next(&mut resumed).await.sub, synthesized_sub("lost-1"));
    let d = Replica::start("D", &redis, &fake).await;
    assert_eq!(d.verdict(&token).await, "revoked", "written back for D");
}
