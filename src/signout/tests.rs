//! The flow on paused tokio time, with Cognito behind the upstream seam:
//! joiners with different deadlines, callers that leave, the queue's
//! hand-over races. Nothing sleeps; `Instant::now()` is virtual.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::*;
use crate::{
    cognito::{SignOutUpstream, SignedOut, UpstreamFuture},
    identity::{CallerId, IdentitySource},
    limiter::{BudgetSettings, CallerSettings, LocalBudget},
};

const MS: Duration = Duration::from_millis(1);

/// Answers after `delay`, or times out when the call's timeout is shorter.
#[derive(Debug, Default)]
struct FakeUpstream {
    delay: Duration,
    /// Errors for the first calls, in order; then success.
    errors: Mutex<VecDeque<UpstreamErrorKind>>,
    /// (username, timeout, when) of every call.
    calls: Mutex<Vec<(String, Duration, Instant)>>,
}

impl FakeUpstream {
    fn slow(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            delay,
            ..Self::default()
        })
    }

    fn calls(&self) -> Vec<(String, Duration, Instant)> {
        self.calls.lock().expect("not poisoned").clone()
    }
}

impl SignOutUpstream for FakeUpstream {
    fn global_sign_out<'a>(
        &'a self,
        _pool: &'a UserPoolId,
        username: &'a Username,
        timeout: Duration,
    ) -> UpstreamFuture<'a> {
        self.calls.lock().expect("not poisoned").push((
            username.expose().to_owned(),
            timeout,
            Instant::now(),
        ));
        let error = self.errors.lock().expect("not poisoned").pop_front();
        Box::pin(async move {
            if tokio::time::timeout(timeout, tokio::time::sleep(self.delay))
                .await
                .is_err()
            {
                return Err(UpstreamError::new(
                    UpstreamErrorKind::Timeout,
                    std::io::Error::other("fake timeout"),
                ));
            }
            match error {
                Some(kind) => Err(UpstreamError::new(kind, std::io::Error::other("fake"))),
                None => Ok(SignedOut {
                    aws_request_id: format!("req-{}", username.expose()),
                    at: SystemTime::UNIX_EPOCH,
                }),
            }
        })
    }
}

/// A flow at `rate`/s with burst 1 and no retries, its burst already spent,
/// so the next permit is one interval away.
async fn flow_with_spent_burst(upstream: Arc<FakeUpstream>, rate: f64) -> SignOutFlow {
    single_attempt_flow(upstream, Budget::Local(spent_budget(rate).await))
}

/// A budget at `rate`/s with burst 1, the burst already taken.
async fn spent_budget(rate: f64) -> LocalBudget {
    let budget = LocalBudget::start(
        BudgetSettings {
            rate_per_sec: rate,
            burst: 1,
            max_queue: 100,
            max_wait: Duration::from_secs(10),
        },
        CallerSettings::default(),
    );
    budget
        .acquire(Instant::now() + Duration::from_secs(1))
        .await
        .expect("the burst");
    budget
}

/// A flow on `budget` with no retries.
fn single_attempt_flow(upstream: Arc<FakeUpstream>, budget: Budget) -> SignOutFlow {
    SignOutFlow::new(
        upstream,
        None,
        budget,
        10,
        RetrySettings {
            max_attempts: 1,
            initial_backoff: MS,
        },
        Arc::new(Metrics::new()),
    )
}

fn call(username: &str, caller: &str, deadline: Instant) -> SignOutCall {
    SignOutCall {
        pool: UserPoolId::parse("us-east-1_TestPool1").expect("pool"),
        username: Username::parse(username).expect("username"),
        user_hash: format!("hash-of-{username}"),
        caller: JobCaller {
            id: CallerId::parse(caller).expect("caller"),
            verified: None,
        },
        deadline,
    }
}

/// Polls `future` exactly once, leaving it where it stopped.
async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) {
    std::future::poll_fn(|cx| {
        let _ = std::pin::Pin::new(&mut *future).poll(cx);
        std::task::Poll::Ready(())
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_joiner_keeps_its_own_longer_deadline_behind_a_short_leader() {
    let upstream = FakeUpstream::slow(200 * MS);
    let flow = flow_with_spent_burst(upstream.clone(), 10.0).await;
    let start = Instant::now();

    // The permit comes at 100 ms; Cognito answers 200 ms after that.
    let leader = tokio::spawn({
        let flow = flow.clone();
        async move { flow.sign_out(call("alice", "web", start + 150 * MS)).await }
    });
    tokio::task::yield_now().await;
    let joiner = flow
        .sign_out(call("alice", "batch", start + Duration::from_secs(5)))
        .await;

    assert!(joiner.is_ok(), "the joiner had time: {joiner:?}");
    assert_eq!(start.elapsed(), 300 * MS);
    let leader = leader.await.expect("task").expect_err("the leader had not");
    assert!(matches!(leader, SignOutError::Upstream(e) if e.kind == UpstreamErrorKind::Timeout));
    let calls = upstream.calls();
    assert_eq!(calls.len(), 1, "one call for both");
    assert_eq!(
        calls[0].1,
        Duration::from_millis(4900),
        "the joiner's time left"
    );
}

#[tokio::test(start_paused = true)]
async fn a_joiner_whose_deadline_comes_before_the_slot_is_refused_at_once() {
    let upstream = FakeUpstream::slow(MS);
    let flow = flow_with_spent_burst(upstream.clone(), 10.0).await;
    let start = Instant::now();
    let leader = tokio::spawn({
        let flow = flow.clone();
        async move {
            flow.sign_out(call("alice", "web", start + Duration::from_secs(5)))
                .await
        }
    });
    tokio::task::yield_now().await;

    let refused = flow
        .sign_out(call("alice", "batch", start + 50 * MS))
        .await
        .expect_err("its deadline is before the 100 ms slot");

    assert_eq!(start.elapsed(), Duration::ZERO, "refused without waiting");
    match refused {
        SignOutError::RateLimited(limited) => assert_eq!(limited.retry_after, 100 * MS),
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    leader.await.expect("task").expect("the leader's call");
    assert_eq!(upstream.calls().len(), 1);
}

/// The race of the old `forget`: between "every caller left" and the job
/// leaving the queue, a new caller could join a job about to vanish and get
/// INTERNAL. The decision is now taken under the queue's lock, as joins are,
/// and only when nobody waits; this drives the decision with a caller that
/// joined after the last one left.
#[tokio::test(start_paused = true)]
async fn a_job_leaves_the_queue_only_when_nobody_waits_for_it() {
    let upstream = FakeUpstream::slow(MS);
    let flow = flow_with_spent_burst(upstream.clone(), 10.0).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (job, first) = flow
        .join_or_lead(call("alice", "web", deadline))
        .await
        .expect("queued");

    drop(first); // the job's `closed()` would now resolve
    let (joined, second) = flow
        .join_or_lead(call("alice", "web", deadline))
        .await
        .expect("joins");

    assert!(Arc::ptr_eq(&job, &joined), "joined the queued job");
    assert!(
        !flow.leave_queue_if_abandoned(&job),
        "a caller waits: the job stays"
    );
    assert_eq!(flow.queued().len(), 1);
    drop(second);
    assert!(flow.leave_queue_if_abandoned(&job), "now nobody waits");
    assert!(flow.queued().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_queued_job_abandoned_at_shutdown_leaves_the_queue_without_a_call() {
    let upstream = FakeUpstream::slow(MS);
    let flow = flow_with_spent_burst(upstream.clone(), 1.0).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut waiting = Box::pin(flow.sign_out(call("alice", "web", deadline)));
    poll_once(&mut waiting).await;
    tokio::task::yield_now().await;

    flow.shutdown(Instant::now()).await;

    assert!(flow.queued().is_empty());
    assert_eq!(flow.budget().queue_depth(), 0, "its place given up");
    assert!(upstream.calls().is_empty());
}

/// On one thread the job cannot run between the last caller leaving and a
/// new one arriving; the new caller then simply joins and is answered.
#[tokio::test(start_paused = true)]
async fn a_caller_that_joins_as_the_last_one_leaves_gets_the_outcome() {
    let upstream = FakeUpstream::slow(MS);
    let flow = flow_with_spent_burst(upstream.clone(), 10.0).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut first = Box::pin(flow.sign_out(call("alice", "web", deadline)));
    poll_once(&mut first).await;
    tokio::task::yield_now().await; // the job now waits for its permit
    assert_eq!(flow.budget().queue_depth(), 1);

    // The only caller leaves, and the job is told so; before the job runs
    // again, another request for the same user arrives.
    drop(first);
    let mut second = Box::pin(flow.sign_out(call("alice", "web", deadline)));
    poll_once(&mut second).await;

    let outcome = second.await;
    assert!(outcome.is_ok(), "joined a job that stayed: {outcome:?}");
    assert_eq!(upstream.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_job_every_caller_left_before_its_permit_gives_the_permit_up() {
    let upstream = FakeUpstream::slow(MS);
    let flow = flow_with_spent_burst(upstream.clone(), 10.0).await;
    let start = Instant::now();
    let mut first = Box::pin(flow.sign_out(call("alice", "web", start + Duration::from_secs(5))));
    poll_once(&mut first).await;
    tokio::task::yield_now().await;

    drop(first);
    tokio::task::yield_now().await;

    assert_eq!(flow.budget().queue_depth(), 0, "left the queue");
    flow.sign_out(call("bob", "web", start + 150 * MS))
        .await
        .expect("bob takes the 100 ms slot alice gave up");
    let calls = upstream.calls();
    let users: Vec<_> = calls.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(users, ["bob"]);
    assert_eq!(calls[0].2 - start, 100 * MS, "called in the freed slot");
}

#[tokio::test(start_paused = true)]
async fn a_request_after_the_permit_makes_a_call_of_its_own() {
    let upstream = FakeUpstream::slow(200 * MS);
    let flow = flow_with_spent_burst(upstream.clone(), 10.0).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = tokio::spawn({
        let flow = flow.clone();
        async move { flow.sign_out(call("alice", "web", deadline)).await }
    });
    while upstream.calls().is_empty() {
        tokio::time::advance(MS).await;
    }

    // alice's call is in flight: a token minted now would survive it.
    let late = flow.sign_out(call("alice", "web", deadline)).await;

    first.await.expect("task").expect("first call");
    late.expect("its own call");
    assert_eq!(upstream.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_caller_still_queued_at_its_deadline_is_rate_limited() {
    let upstream = FakeUpstream::slow(MS);
    let flow = flow_with_spent_burst(upstream.clone(), 10.0).await;
    let start = Instant::now();
    let waiting = tokio::spawn({
        let flow = flow.clone();
        async move { flow.sign_out(call("alice", "web", start + 150 * MS)).await }
    });
    tokio::task::yield_now().await;

    // The rate halves after alice queued: her permit moves to 200 ms.
    flow.budget().on_throttled();
    let refused = waiting.await.expect("task").expect_err("no permit in time");

    assert!(
        matches!(refused, SignOutError::RateLimited(_)),
        "{refused:?}"
    );
    assert!(upstream.calls().is_empty());
}

/// A job that reaches its first attempt with its callers' deadline already
/// passed (the permit came at, or after, the deadline) makes no call: the
/// time ran out in the queue, which is the caller's (or the rate's) doing,
/// not Cognito timing out, so it is no upstream error and no server fault.
#[tokio::test(start_paused = true)]
async fn a_job_whose_deadline_passed_in_the_queue_is_not_an_upstream_timeout() {
    let upstream = FakeUpstream::slow(MS);
    let budget = LocalBudget::start(
        BudgetSettings {
            rate_per_sec: 10.0,
            burst: 1,
            max_queue: 100,
            max_wait: Duration::from_secs(10),
        },
        CallerSettings::default(),
    );
    let flow = SignOutFlow::new(
        upstream.clone(),
        None,
        Budget::Local(budget.clone()),
        10,
        RetrySettings {
            max_attempts: 3,
            initial_backoff: MS,
        },
        Arc::new(Metrics::new()),
    );
    let deadline = Instant::now() + 10 * MS;
    let reservation = budget.reserve(deadline, None).expect("the burst");
    let template = call("alice", "web", deadline);
    let (job, _subscription) = job::Job::new(
        (template.pool, template.username),
        template.user_hash,
        template.caller,
        deadline,
        &reservation,
    );
    tokio::time::sleep_until(deadline).await;

    let refused = flow
        .call_with_retries(&job)
        .await
        .expect_err("no time left for a call");

    assert!(upstream.calls().is_empty(), "a call was made");
    assert!(
        !matches!(refused, SignOutError::Upstream(_)),
        "an upstream failure: {refused:?}"
    );
    assert!(!refused.is_server_fault(), "{refused:?} is a server fault");
    assert_eq!(refused.code(), tonic::Code::DeadlineExceeded);
}

// === audit ===

/// Audit lines written while `test` runs, as JSON.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("not poisoned")
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn audit_lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().expect("not poisoned").clone();
        String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("JSON"))
            .filter(|line: &serde_json::Value| line["target"] == "audit")
            .collect()
    }
}

thread_local! {
    /// Where this thread's log lines go while a test captures them.
    static CAPTURE: std::cell::RefCell<Option<Captured>> = const { std::cell::RefCell::new(None) };
}

/// Writes to the capturing test's buffer, if this thread has one.
struct ThreadWriter;

impl std::io::Write for ThreadWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|capture| {
            if let Some(captured) = &mut *capture.borrow_mut() {
                let _ = captured.write(bytes);
            }
        });
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Stops capturing when dropped.
struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|capture| capture.borrow_mut().take());
    }
}

/// Captures this thread's INFO lines (the job runs on the test's thread:
/// a current-thread runtime). One global subscriber, set once, rather
/// than one `set_default` per test: with scoped subscribers coming and
/// going on parallel test threads, tracing's cached interest and max level
/// sometimes drop an event (the audit test failed 1 run in 3).
fn capture_logs() -> (Captured, CaptureGuard) {
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| ThreadWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
    });
    let captured = Captured::default();
    CAPTURE.with(|capture| *capture.borrow_mut() = Some(captured.clone()));
    (captured, CaptureGuard)
}

#[tokio::test(start_paused = true)]
async fn a_call_every_caller_left_after_its_permit_is_audited_naming_them_all() {
    let (logs, _guard) = capture_logs();
    let upstream = FakeUpstream::slow(200 * MS);
    let flow = flow_with_spent_burst(upstream.clone(), 10.0).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut callers = Vec::new();
    for (caller, verified) in [
        ("web", Some(IdentitySource::ClientCertificate)),
        ("batch", None),
    ] {
        let mut sign_out = call("alice", caller, deadline);
        sign_out.caller.verified = verified;
        let flow = flow.clone();
        callers.push(tokio::spawn(async move { flow.sign_out(sign_out).await }));
        tokio::task::yield_now().await;
    }
    while upstream.calls().is_empty() {
        tokio::time::advance(MS).await;
    }

    // Both give up while Cognito works (their deadlines, a reset stream).
    for caller in callers {
        caller.abort();
    }
    // The job finishes its call on virtual time: wait for its line (the
    // bound is virtual too).
    for _ in 0..100 {
        if !logs.audit_lines().is_empty() {
            break;
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        tokio::task::yield_now().await;
    }

    let audit = logs.audit_lines();
    assert_eq!(audit.len(), 1, "one line per Cognito call: {audit:?}");
    assert_eq!(audit[0]["outcome"], "signed_out");
    assert_eq!(audit[0]["caller"], "web");
    assert_eq!(audit[0]["caller_verified_by"], "client_certificate");
    assert_eq!(audit[0]["callers"], r#"["web", "batch"]"#);
    assert_eq!(audit[0]["requests"], 2);
    assert_eq!(audit[0]["user_hash"], "hash-of-alice");
    assert_eq!(audit[0]["aws_request_id"], "req-alice");
}

#[tokio::test(start_paused = true)]
async fn every_attempt_is_audited_and_a_call_cut_off_at_shutdown_says_so() {
    let (logs, _guard) = capture_logs();
    let upstream = Arc::new(FakeUpstream {
        delay: Duration::from_secs(1),
        errors: Mutex::new(VecDeque::from([UpstreamErrorKind::InternalError])),
        ..FakeUpstream::default()
    });
    let budget = LocalBudget::start(
        BudgetSettings {
            rate_per_sec: 100.0,
            burst: 5,
            max_queue: 100,
            max_wait: Duration::from_secs(10),
        },
        CallerSettings::default(),
    );
    let flow = SignOutFlow::new(
        upstream.clone(),
        None,
        Budget::Local(budget),
        10,
        RetrySettings {
            max_attempts: 3,
            initial_backoff: MS,
        },
        Arc::new(Metrics::new()),
    );
    let start = Instant::now();
    let caller = tokio::spawn({
        let flow = flow.clone();
        async move {
            flow.sign_out(call("alice", "web", start + Duration::from_secs(30)))
                .await
        }
    });
    // The first attempt fails at 1 s; the retry is under way at 1.5 s.
    while upstream.calls().len() < 2 {
        tokio::time::advance(10 * MS).await;
    }
    caller.abort();

    flow.shutdown(Instant::now() + 100 * MS).await;

    let outcomes: Vec<_> = logs
        .audit_lines()
        .iter()
        .map(|line| {
            (
                line["attempt"].as_u64(),
                line["outcome"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            (Some(1), Some("InternalErrorException".to_owned())),
            (Some(2), Some("abandoned".to_owned())),
        ]
    );
}

/// A flow whose budget takes `delay` to decide (a Redis round trip) and
/// `answer_delays` more to answer, its burst of 1 spent, so reservations
/// queue and can be joined.
async fn flow_with_slow_budget(
    upstream: Arc<FakeUpstream>,
    delay: Duration,
    answer_delays: &[Duration],
) -> SignOutFlow {
    let budget = Budget::Delayed {
        local: spent_budget(10.0).await,
        delay,
        answer_delays: Arc::new(Mutex::new(answer_delays.iter().copied().collect())),
    };
    single_attempt_flow(upstream, budget)
}

#[tokio::test(start_paused = true)]
async fn two_first_callers_whose_reservations_overlap_make_one_call() {
    let upstream = FakeUpstream::slow(MS);
    let flow = flow_with_slow_budget(upstream.clone(), 5 * MS, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(5);

    // Both find no job and both reserve; the second to get its slot finds
    // the first's job queued and joins it, giving its own slot up.
    let (web, billing) = tokio::join!(
        flow.sign_out(call("alice", "web", deadline)),
        flow.sign_out(call("alice", "billing", deadline)),
    );

    assert_eq!(web.expect("signed out").aws_request_id, "req-alice");
    assert_eq!(billing.expect("signed out").aws_request_id, "req-alice");
    assert_eq!(upstream.calls().len(), 1, "one Cognito call for both");
    assert_eq!(
        flow.budget().queue_depth(),
        0,
        "the unused slot was given up"
    );
}

#[tokio::test(start_paused = true)]
async fn a_racing_caller_that_cannot_wait_for_the_queued_job_keeps_its_own_slot() {
    let upstream = FakeUpstream::slow(MS);
    // The early caller is decided first (slot at 100 ms) but its answer
    // comes 20 ms later; the late caller is decided second (slot at 200 ms)
    // and its job is queued first.
    let flow = flow_with_slow_budget(upstream.clone(), 5 * MS, &[20 * MS, Duration::ZERO]).await;
    let start = Instant::now();
    let early = tokio::spawn({
        let flow = flow.clone();
        async move { flow.sign_out(call("alice", "web", start + 150 * MS)).await }
    });
    tokio::task::yield_now().await;
    let late = tokio::spawn({
        let flow = flow.clone();
        async move {
            flow.sign_out(call("alice", "billing", start + Duration::from_secs(2)))
                .await
        }
    });

    // Joining the queued job would miss its deadline: it runs on its own
    // slot instead of being refused or wasting it.
    early.await.expect("no panic").expect("signed out in time");
    late.await.expect("no panic").expect("signed out");
    let calls = upstream.calls();
    assert_eq!(calls.len(), 2, "each on its own slot");
    assert!(
        calls[0].2 - start <= 101 * MS,
        "the early one at its slot: {:?}",
        calls[0].2 - start
    );
}
