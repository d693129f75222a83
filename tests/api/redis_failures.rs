//! Redis trouble never stops sign-outs and never overruns the quota:
//! the real binary against a real Redis that is killed, frozen, started
//! late, flushed, or reached over TLS.
//!
//! Every replica has a 1 s cool-down, so that an outage and the way back
//! fit in a few seconds, and the default 50 ms Redis timeout where an outage
//! is the point. Each test prints what it measured (run with `--nocapture`).
//! Latency bounds add [`MARGIN`] for a busy machine: a test fails for the
//! service's delays, never for the machine's.

use std::{
    ffi::{OsStr, OsString},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use session_service::proto::{GlobalSignOutRequest, session_service_client::SessionServiceClient};
use tonic::{Code, Status, transport::Channel};

use crate::{
    fake_cognito::{FakeCognito, Reply},
    helpers::{self, POOL, assert_error, max_in_window},
    redis_server::TestRedis,
};

/// The default `--redis-timeout`, for the tests about outages.
const REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// For the tests about something else: a busy machine's stall must not
/// count as a Redis failure there.
const PATIENT: Duration = Duration::from_secs(1);
const COOLDOWN: Duration = Duration::from_secs(1);
/// What a slow machine may add to a bound.
const MARGIN: Duration = Duration::from_secs(1);
/// The fleet's rate: above anything a test offers, so shared mode never
/// makes a call wait.
const FLEET_RPS: u32 = 40;
/// Each replica's own rate and burst while Redis is away.
const FALLBACK_RPS: u32 = 5;
const FALLBACK_BURST: u32 = 1;

const SHARED: &str = "rate budget: shared (Redis)";
const LOCAL: &str = "rate budget: Redis unavailable, local fallback";
const CONNECTED: &str = "connected to Redis";
const CANNOT_CONNECT: &str = "cannot connect to Redis; retrying in the background";
const PASSWORD: &str = "tls-test-password-9f3c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_costs_no_sign_out_and_each_replica_keeps_to_its_fallback_rate() {
    // Arrange: two replicas on one Redis. `steady` offers less than the
    // fallback rate, so every call of it must succeed; `busy` offers four
    // times the fallback rate, so Cognito shows whether the cap holds.
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut redis = TestRedis::start();
    let url = redis.url();
    let steady = Replica::spawn("steady", &fake, REDIS_TIMEOUT, &["--redis-url", &url]).await;
    let busy = Replica::spawn("busy", &fake, REDIS_TIMEOUT, &["--redis-url", &url]).await;
    steady.reach_shared_mode().await;
    busy.reach_shared_mode().await;
    let (steady_every, busy_every) = (Duration::from_millis(333), Duration::from_millis(50));

    // Act: 1.5 s shared, 3 s without Redis, then Redis back, empty.
    let start = Instant::now();
    let until = start + Duration::from_secs(8);
    let steady_load = steady.offer(steady_every, until);
    let busy_load = busy.offer(busy_every, until);
    let watches = [steady.watch(until), busy.watch(until)];
    sleep_until(start + Duration::from_millis(1500)).await;
    let killed = Instant::now();
    redis.kill();
    // Each replica is local once its next call has met the dead Redis:
    // within one call interval and one timeout (earlier if a call timed out
    // on a busy machine).
    for (replica, every) in [(&busy, busy_every), (&steady, steady_every)] {
        sleep_until(killed + every + REDIS_TIMEOUT + MARGIN).await;
        assert_eq!(replica.mode().await, "local", "{}", replica.name);
    }
    sleep_until(killed + Duration::from_secs(3)).await;
    let restarted = Instant::now();
    tokio::task::block_in_place(|| redis.restart());
    // The background probe comes at most one cool-down after the restart,
    // whatever the calls do.
    let back_limit = COOLDOWN + REDIS_TIMEOUT + MARGIN;
    let steady_back = steady.wait_for_log(SHARED, restarted, back_limit).await;
    let busy_back = busy.wait_for_log(SHARED, restarted, back_limit).await;
    let steady_calls = steady_load.await.expect("load task");
    let busy_calls = busy_load.await.expect("load task");

    // Assert
    let requests = fake.requests();
    let mut timeline = Timeline::new(start);
    for watch in watches {
        timeline.events.extend(watch.await.expect("watch task"));
    }
    timeline.event(killed, "redis-server SIGKILLed");
    timeline.event(restarted, "redis-server restarted, empty, same port");
    for (replica, back) in [(&steady, steady_back), (&busy, busy_back)] {
        for (at, line) in replica.lines(LOCAL, start) {
            let kind = line["kind"].as_str().unwrap_or_default();
            timeline.event(at, &format!("{}: {LOCAL} ({kind})", replica.name));
        }
        timeline.event(back, &format!("{}: {SHARED}", replica.name));
        let outage: Vec<Instant> = replica
            .arrivals(&requests)
            .into_iter()
            .filter(|at| (killed..restarted).contains(at))
            .collect();
        let busiest = max_in_window(&outage, Duration::from_secs(1));
        timeline.note(format!(
            "{}: Cognito calls during the outage {}, at most {busiest} in one second \
             (cap {FALLBACK_RPS} + {FALLBACK_BURST}); Redis errors {}",
            replica.name,
            outage.len(),
            replica.redis_errors().await
        ));
        assert!(
            busiest <= (FALLBACK_RPS + FALLBACK_BURST) as usize,
            "{}: {busiest} Cognito calls in one second of the outage",
            replica.name
        );
    }
    // Within the fallback rate a call waits for nothing but Redis, at most
    // one timeout.
    for call in &steady_calls {
        let latency = call.latency;
        assert!(
            call.outcome.is_ok(),
            "a call within the fallback rate failed: {:?}",
            call.outcome
        );
        assert!(latency <= REDIS_TIMEOUT + MARGIN, "a call took {latency:?}");
    }
    // Beyond the fallback rate a call may be refused by the budget, as
    // without Redis; never for Redis's sake.
    for call in &busy_calls {
        if let Err(status) = &call.outcome {
            assert_error(status, Code::ResourceExhausted, "RATE_LIMITED", true);
        }
    }
    let busy_served = busy
        .arrivals(&requests)
        .into_iter()
        .filter(|at| (killed..restarted).contains(at))
        .count();
    assert!(
        busy_served >= FALLBACK_RPS as usize,
        "sign-outs stopped: {busy_served} in a 3 s outage"
    );
    timeline.note(format!(
        "steady: {} calls, all OK, slowest {:?}; busy: {} calls, {} OK, {} RATE_LIMITED",
        steady_calls.len(),
        steady_calls
            .iter()
            .map(|c| c.latency)
            .max()
            .unwrap_or_default(),
        busy_calls.len(),
        busy_calls.iter().filter(|c| c.outcome.is_ok()).count(),
        busy_calls.iter().filter(|c| c.outcome.is_err()).count(),
    ));
    timeline.cognito_per_second(&requests, &[&steady, &busy], until);
    timeline.print("Redis killed mid-run");
    steady.stop().await;
    busy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_probe_after_redis_is_back_finds_it() {
    // Arrange: a replica in local mode after a kill, probing Redis in the
    // background once per cool-down, while calls go on within the fallback
    // rate.
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut redis = TestRedis::start();
    let replica = Replica::spawn("prober", &fake, PATIENT, &["--redis-url", &redis.url()]).await;
    replica.reach_shared_mode().await;
    let every = Duration::from_millis(250);
    let start = Instant::now();
    let until = start + Duration::from_secs(6);
    let load = replica.offer(every, until);
    let watch = replica.watch(until);
    sleep_until(start + Duration::from_millis(500)).await;
    let killed = Instant::now();
    redis.kill();

    // Act: Redis back just after a probe failed (the switch is the first
    // error, that probe the second), and after redis-rs's own retry of the
    // reconnection that probe started (within 200 ms). The next probe, a
    // cool-down later, must find Redis: on a connection of its own, not one
    // that hands it the failure of a reconnection tried during the outage.
    let probed = replica
        .wait_for_redis_errors(2.0, COOLDOWN + every + REDIS_TIMEOUT + MARGIN)
        .await;
    sleep_until(probed + Duration::from_millis(300)).await;
    let restarted = Instant::now();
    tokio::task::block_in_place(|| redis.restart());
    let errors_before = replica.redis_error_count().await;
    let back = replica
        .wait_for_log(
            SHARED,
            restarted,
            2 * (COOLDOWN + every) + REDIS_TIMEOUT + MARGIN,
        )
        .await;
    let errors_after = replica.redis_error_count().await - errors_before;
    let calls = load.await.expect("load task");

    // Assert
    let mut timeline = Timeline::new(start);
    timeline.events.extend(watch.await.expect("watch task"));
    timeline.event(killed, "redis-server SIGKILLed");
    timeline.event(probed, "a probe failed (seen in the metrics)");
    timeline.event(restarted, "redis-server restarted, empty, same port");
    timeline.event(back, SHARED);
    timeline.note(format!(
        "back to shared {:?} after the restart; Redis errors of calls made with Redis back: \
         {errors_after}",
        back - restarted
    ));
    timeline.print("the first probe after Redis is back");
    assert!(calls.iter().all(|c| c.outcome.is_ok()));
    // Shared one cool-down after the failed probe, not two: half a
    // cool-down of room either way for a slow machine.
    assert!(
        back - probed < COOLDOWN + COOLDOWN / 2,
        "shared {:?} after the failed probe (cool-down {COOLDOWN:?}); \
         {errors_after} Redis errors after the restart",
        back - probed
    );
    assert!(
        errors_after <= 1.0,
        "at most the stale reconnection's failure: {errors_after}"
    );
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_while_redis_is_frozen_wait_at_most_one_redis_timeout() {
    // Arrange: a hung Redis keeps its connection open and answers nothing;
    // only the timeout can tell.
    let fake = FakeCognito::start(Reply::Ok).await;
    let redis = TestRedis::start();
    let replica = Replica::spawn(
        "frozen",
        &fake,
        REDIS_TIMEOUT,
        &["--redis-url", &redis.url()],
    )
    .await;
    replica.reach_shared_mode().await;

    // Act: calls within the fallback rate, 2.5 s of them against a frozen
    // Redis.
    let start = Instant::now();
    let until = start + Duration::from_secs(5);
    let every = Duration::from_millis(250);
    let load = replica.offer(every, until);
    let watch = replica.watch(until);
    sleep_until(start + Duration::from_millis(500)).await;
    let frozen = Instant::now();
    redis.freeze();
    // The next call times out and switches it (or an earlier one did, on a
    // busy machine).
    sleep_until(frozen + every + REDIS_TIMEOUT + MARGIN).await;
    assert_eq!(replica.mode().await, "local", "still shared, Redis frozen");
    sleep_until(frozen + Duration::from_millis(2500)).await;
    let thawed = Instant::now();
    redis.thaw();
    // The connection survives a freeze: the next probe finds Redis.
    let back_limit = COOLDOWN + REDIS_TIMEOUT + MARGIN;
    let back = replica.wait_for_log(SHARED, thawed, back_limit).await;
    let calls = load.await.expect("load task");

    // Assert
    let mut timeline = Timeline::new(start);
    timeline.events.extend(watch.await.expect("watch task"));
    timeline.event(frozen, "redis-server SIGSTOPped");
    timeline.event(thawed, "redis-server SIGCONTed");
    for (at, line) in replica.lines(LOCAL, start) {
        let kind = line["kind"].as_str().unwrap_or_default();
        timeline.event(at, &format!("{LOCAL} ({kind})"));
    }
    timeline.event(back, SHARED);
    for call in &calls {
        assert!(call.outcome.is_ok(), "{:?}", call.outcome);
        timeline.event(
            call.sent,
            &format!("call answered in {:>4} ms", call.latency.as_millis()),
        );
        // Redis's share of a call is at most one timeout; the margin is the
        // machine's.
        assert!(
            call.latency <= REDIS_TIMEOUT + MARGIN,
            "a call took {:?}",
            call.latency
        );
    }
    // A hung Redis is seen as timeouts only.
    let errors = replica.redis_errors().await;
    assert!(
        errors.starts_with("timeout ") && !errors.contains(','),
        "{errors}"
    );
    timeline.note(format!(
        "Redis errors: {errors} (one per cool-down while frozen); back to shared {:?} after \
         the thaw",
        back - thawed
    ));
    timeline.print("Redis frozen");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_redis_signs_out_locally_then_shares_the_budget() {
    // Arrange: Redis's port is chosen but nothing listens on it yet.
    let fake = FakeCognito::start(Reply::Ok).await;
    let mut redis = TestRedis::not_started();
    let start = Instant::now();
    let replica = Replica::spawn("late", &fake, PATIENT, &["--redis-url", &redis.url()]).await;
    let mut timeline = Timeline::new(start);

    // Act and assert: local first; sign-outs are served.
    let down = replica.wait_for_log(CANNOT_CONNECT, start, MARGIN).await;
    timeline.event(down, CANNOT_CONNECT);
    replica.sign_out().await.expect("signed out without Redis");
    assert_eq!(replica.mode().await, "local");

    let started = Instant::now();
    tokio::task::block_in_place(|| redis.restart());
    timeline.event(started, "redis-server started");
    // The background task tries again once per cool-down; connected is
    // shared, before any call.
    let connected = replica
        .wait_for_log(CONNECTED, started, COOLDOWN + MARGIN)
        .await;
    timeline.event(connected, CONNECTED);
    let shared = replica.wait_for_log(SHARED, started, MARGIN).await;
    timeline.event(shared, SHARED);
    assert_eq!(replica.mode().await, "shared");
    replica.sign_out().await.expect("signed out");
    let answered = "session_redis_duration_seconds_count{op=\"reserve\"}";
    assert_eq!(
        replica.metric(answered).await,
        1.0,
        "the call went to Redis"
    );
    timeline.print("Redis started after the service");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_flush_between_calls_costs_one_reload_not_a_failure() {
    // Arrange
    let fake = FakeCognito::start(Reply::Ok).await;
    let redis = TestRedis::start();
    let replica = Replica::spawn("flushed", &fake, PATIENT, &["--redis-url", &redis.url()]).await;
    replica.reach_shared_mode().await;
    let since = Instant::now();

    for round in 1..=3 {
        // Act
        redis.command(&["SCRIPT", "FLUSH"]).await;
        redis.command(&["CONFIG", "RESETSTAT"]).await;
        replica
            .sign_out()
            .await
            .expect("signed out after SCRIPT FLUSH");

        // Assert: each script's EVALSHA met NOSCRIPT, redis-rs loaded the
        // script and sent EVALSHA again, which ran: one reload per script,
        // no error. The scripts are the budget's and the revocation log's
        // (the watermark, written beside the Cognito call, and the
        // follower's epoch check now and then): wait for the watermark's.
        let written = "session_revocations_recorded_total{result=\"logged\"}";
        let again = "session_revocations_recorded_total{result=\"already_logged\"}";
        let (mut stats, mut memory) = (String::new(), String::new());
        for _ in 0..100 {
            // Memory first: a load between the two reads then shows as one
            // load more than scripts cached, and the loop goes round again.
            memory = info(&redis, "memory").await;
            stats = info(&redis, "commandstats").await;
            let recorded = replica.metric(written).await + replica.metric(again).await;
            // Every NOSCRIPT reloaded and sent again (the follower's epoch
            // check may be half-way through its reload).
            let refused = stat(&stats, "cmdstat_evalsha", "failed_calls");
            let loads = stat(&stats, "cmdstat_script|load", "calls");
            let settled = refused == loads
                && stat(&stats, "cmdstat_evalsha", "calls") >= 2 * refused
                && memory.contains(&format!("number_of_cached_scripts:{loads}\r"));
            if recorded >= f64::from(round) && settled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("SCRIPT FLUSH round {round}:\n{stats}");
        let refused = stat(&stats, "cmdstat_evalsha", "failed_calls");
        let loads = stat(&stats, "cmdstat_script|load", "calls");
        assert!(refused >= 2, "the budget's and the watermark's: {stats}");
        assert_eq!(refused, loads, "one reload per NOSCRIPT: {stats}");
        assert!(
            stat(&stats, "cmdstat_evalsha", "calls") >= 2 * refused,
            "each sent again: {stats}"
        );
        assert!(
            memory.contains(&format!("number_of_cached_scripts:{loads}\r")),
            "each loaded once: {memory}"
        );
    }
    assert_eq!(replica.logged_at(LOCAL, since), None, "{}", replica.log());
    assert_eq!(replica.mode().await, "shared");
    assert_eq!(replica.redis_errors().await, "none");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_test_ca_and_a_password_file_shares_the_budget() {
    // Arrange: the password comes from a file, as a mounted Secret would,
    // with the newline `echo` leaves.
    let fake = FakeCognito::start(Reply::Ok).await;
    let redis = TestRedis::start_tls(PASSWORD);
    let password_file = password_file(PASSWORD);
    let flags = tls_flags(&redis, true, &password_file);
    let replica = Replica::spawn("tls", &fake, PATIENT, &flags).await;

    // Act and assert
    replica.reach_shared_mode().await;
    assert!(!replica.log().contains(PASSWORD), "{}", replica.log());
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_wrong_password_or_an_unknown_ca_still_signs_out_locally() {
    // Arrange
    let fake = FakeCognito::start(Reply::Ok).await;
    let redis = TestRedis::start_tls(PASSWORD);
    let wrong_file = password_file("not-the-password-4d1e");
    let right_file = password_file(PASSWORD);
    let start = Instant::now();
    let wrong_flags = tls_flags(&redis, true, &wrong_file);
    let wrong_password = Replica::spawn("wrong-password", &fake, PATIENT, &wrong_flags).await;
    let no_ca_flags = tls_flags(&redis, false, &right_file);
    let no_ca = Replica::spawn("no-ca", &fake, PATIENT, &no_ca_flags).await;

    for replica in [&wrong_password, &no_ca] {
        // Act
        let refused = replica
            .wait_for_log(CANNOT_CONNECT, start, COOLDOWN + MARGIN)
            .await;
        replica.sign_out().await.expect("signed out without Redis");
        // Past its next connection attempt, a cool-down later: still local,
        // still serving.
        sleep_until(refused + COOLDOWN + REDIS_TIMEOUT).await;
        replica.sign_out().await.expect("signed out without Redis");

        // Assert
        assert_eq!(replica.mode().await, "local", "{}", replica.name);
        assert_eq!(
            replica.logged_at(CONNECTED, start),
            None,
            "{}",
            replica.log()
        );
        let log = replica.log();
        assert!(!log.contains(PASSWORD) && !log.contains("4d1e"), "{log}");
        println!(
            "{}: {}",
            replica.name,
            replica.line(CANNOT_CONNECT, start)["error"]
        );
    }
    wrong_password.stop().await;
    no_ca.stop().await;
}

// === impl Replica ===

/// One service process with Redis flags, the metrics address it logs at
/// start, and each log line with the moment it arrived.
struct Replica {
    name: &'static str,
    spawned: Instant,
    child: Option<Child>,
    metrics: SocketAddr,
    client: SessionServiceClient<Channel>,
    /// Sign-outs made so far: each names a user of its own, since the
    /// service merges sign-outs of one user that wait for a slot.
    made: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<(Instant, serde_json::Value)>>>,
}

/// One sign-out as the caller saw it.
struct Call {
    sent: Instant,
    latency: Duration,
    outcome: Result<(), Status>,
}

impl Replica {
    /// Starts the binary as `helpers::spawn_binary` does, keeping the
    /// metrics address (`--metrics-listen` cannot be given twice). Its
    /// sign-outs name users `name-N`, so Cognito's log tells replicas apart.
    async fn spawn(
        name: &'static str,
        fake: &FakeCognito,
        redis_timeout: Duration,
        redis_flags: &[impl AsRef<OsStr>],
    ) -> Self {
        use std::io::BufRead;
        let spawned = Instant::now();
        let mut child = helpers::binary()
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "AKIDTESTTESTTESTTEST")
            .env("AWS_SECRET_ACCESS_KEY", "test-secret")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--log-format", "json", "--drain-delay", "0s"])
            .args(["--cognito-endpoint", &fake.endpoint()])
            .args(["--upstream-initial-backoff", "1ms"])
            .args(helpers::UNLIMITED_LOOKUPS)
            .args(["--rate-limit-rps", &FLEET_RPS.to_string()])
            .args(["--rate-limit-burst", "10"])
            .args(["--fallback-rate-limit-rps", &FALLBACK_RPS.to_string()])
            .args(["--fallback-rate-limit-burst", &FALLBACK_BURST.to_string()])
            .arg(format!("--redis-timeout={}ms", redis_timeout.as_millis()))
            .arg(format!("--redis-cooldown={}ms", COOLDOWN.as_millis()))
            .args(redis_flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("binary starts");
        let stdout = child.stdout.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut started_tx = Some(started_tx);
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let at = Instant::now();
                let line = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                let addrs = (line["addr"].as_str(), line["metrics_addr"].as_str());
                if let (Some(addr), Some(metrics)) = addrs {
                    let parse = |a: &str| a.parse::<SocketAddr>().expect("socket address");
                    if let Some(tx) = started_tx.take() {
                        let _ = tx.send((parse(addr), parse(metrics)));
                    }
                }
                lines.lock().expect("not poisoned").push((at, line));
            }
        });
        let (addr, metrics) = tokio::time::timeout(Duration::from_secs(60), started)
            .await
            .expect("the binary logs its addresses within 60 s")
            .expect("the binary logs its addresses");
        Self {
            name,
            spawned,
            child: Some(child),
            metrics,
            client: SessionServiceClient::new(helpers::channel(addr).await),
            made: Arc::default(),
            log,
        }
    }

    /// Waits for shared mode, then signs out through Redis once.
    async fn reach_shared_mode(&self) {
        self.wait_for_log(SHARED, self.spawned, Duration::from_secs(5))
            .await;
        assert_eq!(self.mode().await, "shared", "{}", self.name);
        self.sign_out().await.expect("signed out");
        // One reservation; two if the user's lookup ended more than a
        // permit interval after it (a slow machine).
        let answered = "session_redis_duration_seconds_count{op=\"reserve\"}";
        assert!(self.metric(answered).await >= 1.0, "{}", self.name);
    }

    async fn sign_out(&self) -> Result<(), Status> {
        sign_out(self.client.clone(), self.name, &self.made).await
    }

    /// Offers a sign-out every `every` until `until`, each on a task of its
    /// own (a waiting call delays no other); a late tick is skipped, so a
    /// stall never bunches calls up.
    fn offer(&self, every: Duration, until: Instant) -> tokio::task::JoinHandle<Vec<Call>> {
        let client = self.client.clone();
        let (name, made) = (self.name, self.made.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut calls = Vec::new();
            while ticks.tick().await.into_std() < until {
                let (client, made) = (client.clone(), made.clone());
                calls.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let outcome = sign_out(client, name, &made).await;
                    Call {
                        sent,
                        latency: sent.elapsed(),
                        outcome,
                    }
                }));
            }
            let mut done = Vec::new();
            for call in calls {
                done.push(call.await.expect("call task"));
            }
            done
        })
    }

    /// When this replica's sign-outs reached Cognito.
    fn arrivals(&self, requests: &[crate::fake_cognito::Recorded]) -> Vec<Instant> {
        requests
            .iter()
            .filter(|r| {
                let user = r.body["Username"].as_str().unwrap_or_default();
                user.strip_prefix(self.name)
                    .is_some_and(|n| n.starts_with('-'))
            })
            .map(|r| r.arrived)
            .collect()
    }

    /// The first line logging `message` at or after `since`, and when.
    fn first(&self, message: &str, since: Instant) -> Option<(Instant, serde_json::Value)> {
        self.lines(message, since).into_iter().next()
    }

    /// Every line logging `message` at or after `since`, and when.
    fn lines(&self, message: &str, since: Instant) -> Vec<(Instant, serde_json::Value)> {
        let log = self.log.lock().expect("not poisoned");
        log.iter()
            .filter(|(at, line)| *at >= since && line["message"] == message)
            .cloned()
            .collect()
    }

    fn line(&self, message: &str, since: Instant) -> serde_json::Value {
        let (_, line) = self
            .first(message, since)
            .unwrap_or_else(|| panic!("{}: no {message:?}", self.name));
        line
    }

    fn logged_at(&self, message: &str, since: Instant) -> Option<Instant> {
        self.first(message, since).map(|(at, _)| at)
    }

    async fn wait_for_log(&self, message: &str, since: Instant, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.logged_at(message, since) {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {message:?} within {limit:?}\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The whole log, one JSON object a line.
    fn log(&self) -> String {
        let log = self.log.lock().expect("not poisoned");
        log.iter().map(|(_, line)| format!("{line}\n")).collect()
    }

    /// The value of one series, e.g. `name{label="value"}`.
    async fn metric(&self, series: &str) -> f64 {
        value(&helpers::metrics_text(self.metrics).await, series)
    }

    /// `session_rate_limit_mode`: the one mode at 1.
    async fn mode(&self) -> &'static str {
        mode(&helpers::metrics_text(self.metrics).await)
    }

    /// `session_redis_errors_total`, the kinds counted only.
    async fn redis_errors(&self) -> String {
        redis_errors(&helpers::metrics_text(self.metrics).await)
    }

    /// Redis errors of every kind so far.
    async fn redis_error_count(&self) -> f64 {
        let metrics = helpers::metrics_text(self.metrics).await;
        errors_by_kind(&metrics).iter().map(|(_, n)| n).sum()
    }

    /// When the metrics first showed at least `count` Redis errors.
    async fn wait_for_redis_errors(&self, count: f64, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            if self.redis_error_count().await >= count {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{}: fewer than {count} Redis errors",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Scrapes the mode and the Redis errors every 50 ms until `until`,
    /// noting each change: the mode switches and probes as the metrics
    /// show them.
    fn watch(&self, until: Instant) -> tokio::task::JoinHandle<Vec<(Instant, String)>> {
        let (name, metrics) = (self.name, self.metrics);
        tokio::spawn(async move {
            let mut changes = Vec::new();
            let mut last = String::new();
            while Instant::now() < until {
                let text = helpers::metrics_text(metrics).await;
                let now = Instant::now();
                let state = format!("mode {}, Redis errors {}", mode(&text), redis_errors(&text));
                if state != last {
                    changes.push((now, format!("{name} (metrics): {state}")));
                    last = state;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            changes
        })
    }

    /// SIGTERM; it must exit cleanly, Redis or not.
    async fn stop(mut self) {
        let child = self.child.take().expect("running");
        let status = helpers::terminate(child).await;
        assert_eq!(status.code(), Some(0), "{}\n{}", self.name, self.log());
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Signs out user `name-N`, N counting `made`.
async fn sign_out(
    mut client: SessionServiceClient<Channel>,
    name: &str,
    made: &AtomicUsize,
) -> Result<(), Status> {
    let n = made.fetch_add(1, Ordering::Relaxed);
    client
        .global_sign_out(GlobalSignOutRequest {
            user_pool_id: POOL.into(),
            username: format!("{name}-{n}"),
        })
        .await
        .map(|_| ())
}

// === Measuring ===

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

fn mode(metrics: &str) -> &'static str {
    let shared = value(metrics, "session_rate_limit_mode{mode=\"shared\"}");
    let local = value(metrics, "session_rate_limit_mode{mode=\"local\"}");
    match (shared, local) {
        (1.0, 0.0) => "shared",
        (0.0, 1.0) => "local",
        other => panic!("mode gauge {other:?}"),
    }
}

fn errors_by_kind(metrics: &str) -> Vec<(&'static str, f64)> {
    ["timeout", "connection", "script", "other"]
        .into_iter()
        .map(|kind| {
            let series = format!("session_redis_errors_total{{kind=\"{kind}\"}}");
            (kind, value(metrics, &series))
        })
        .collect()
}

/// The kinds of Redis error counted, e.g. "connection 2", or "none".
fn redis_errors(metrics: &str) -> String {
    let counted: Vec<String> = errors_by_kind(metrics)
        .into_iter()
        .filter(|(_, count)| *count > 0.0)
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect();
    if counted.is_empty() {
        "none".into()
    } else {
        counted.join(", ")
    }
}

/// Events and notes of one test, printed in order, in ms from its start.
struct Timeline {
    start: Instant,
    events: Vec<(Instant, String)>,
    notes: Vec<String>,
}

impl Timeline {
    fn new(start: Instant) -> Self {
        Self {
            start,
            events: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn event(&mut self, at: Instant, what: &str) {
        self.events.push((at, what.to_owned()));
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Cognito calls per replica in each second from the start to `end`.
    fn cognito_per_second(
        &mut self,
        requests: &[crate::fake_cognito::Recorded],
        replicas: &[&Replica],
        end: Instant,
    ) {
        let mut second = self.start;
        while second < end {
            let next = second + Duration::from_secs(1);
            let counts: Vec<String> = replicas
                .iter()
                .map(|r| {
                    let n = r
                        .arrivals(requests)
                        .into_iter()
                        .filter(|at| (second..next).contains(at))
                        .count();
                    format!("{} {n:>2}", r.name)
                })
                .collect();
            self.event(
                second,
                &format!("Cognito calls in the next second: {}", counts.join(", ")),
            );
            second = next;
        }
    }

    fn print(mut self, title: &str) {
        self.events.sort_by_key(|(at, _)| *at);
        println!("--- {title} (ms from the start) ---");
        for (at, what) in &self.events {
            let ms = at.saturating_duration_since(self.start).as_millis();
            println!("{ms:>6}  {what}");
        }
        for note in &self.notes {
            println!("        {note}");
        }
    }
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

/// `INFO <section>` of a plain test server.
async fn info(redis: &TestRedis, section: &str) -> String {
    redis::from_redis_value(redis.command(&["INFO", section]).await).expect("INFO is text")
}

/// One field of a `cmdstat_…:calls=…,failed_calls=…` line; 0 when the
/// command never ran.
fn stat(stats: &str, command: &str, field: &str) -> u64 {
    let Some(line) = stats
        .lines()
        .find_map(|l| l.strip_prefix(command)?.strip_prefix(':'))
    else {
        return 0;
    };
    line.split(',')
        .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

// === TLS ===

/// A file holding `password` and a newline, in a directory of its own.
fn password_file(password: &str) -> PathBuf {
    let path = helpers::scratch_dir("redis-password").join("password");
    std::fs::write(&path, format!("{password}\n")).expect("write password file");
    path
}

/// `rediss://` with the password from `password_file`; with the test CA,
/// or else the system's roots.
fn tls_flags(redis: &TestRedis, with_ca: bool, password_file: &Path) -> Vec<OsString> {
    let mut flags: Vec<OsString> = vec!["--redis-url".into(), redis.url().into()];
    if with_ca {
        flags.extend(["--redis-ca-file".into(), redis.ca_file().into()]);
    }
    flags.extend(["--redis-password-file".into(), password_file.into()]);
    flags
}
