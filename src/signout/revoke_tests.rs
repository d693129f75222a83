//! The job's lookup and watermark on paused time: recorded before the
//! Cognito call, shared by the job's callers, overlapping the permit wait,
//! raised again at the permit for callers who joined after it, a failed
//! lookup ending the job at once, and the permits a slow lookup spends.
//! Redis is not involved (the watermarks are in memory); its writes are
//! tested in `revocation`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

use super::*;
use crate::{
    cognito::{CognitoUser, SignOutUpstream, SignedOut, UpstreamFuture, UserDirectory, UserFuture},
    identity::CallerId,
    limiter::{BudgetSettings, CallerSettings, LocalBudget},
    revocation::{RevocationMetrics, RevocationSettings},
    users::{LookupMetrics, ResolverSettings, Sub},
};

const SUB: &str = "8f3c2a10-5b7d-4e21-9a0c-1d2e3f405162";
const POOL: &str = "us-east-1_TestPool1";

/// Every name resolves to SUB, as an alias would (never cached), or as
/// the canonical username with `canonical` (cached), after `delay`; or
/// nobody is found.
#[derive(Debug)]
struct Directory {
    delay: Duration,
    found: bool,
    canonical: bool,
    calls: Mutex<usize>,
}

impl UserDirectory for Directory {
    fn get_user<'a>(
        &'a self,
        _pool: &'a UserPoolId,
        username: &'a Username,
        _timeout: Duration,
    ) -> UserFuture<'a> {
        *self.calls.lock().expect("not poisoned") += 1;
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            if !self.found {
                return Err(UpstreamError::new(
                    UpstreamErrorKind::UserNotFound,
                    std::io::Error::other("fake"),
                ));
            }
            Ok(CognitoUser {
                username: if self.canonical {
                    username.expose().to_owned()
                } else {
                    "the-canonical-name".to_owned()
                },
                sub: Sub::new(SUB).expect("sub"),
            })
        })
    }
}

/// Notes, at each call, when it came and whether the user's tokens were
/// already revoked; answers `error` or success.
#[derive(Debug)]
struct Upstream {
    revocations: Revocations,
    error: Option<UpstreamErrorKind>,
    calls: Mutex<Vec<(Instant, bool)>>,
}

impl Upstream {
    /// (when, already revoked) of every call so far.
    fn calls(&self) -> Vec<(Instant, bool)> {
        self.calls.lock().expect("not poisoned").clone()
    }
}

impl SignOutUpstream for Upstream {
    fn global_sign_out<'a>(
        &'a self,
        pool: &'a UserPoolId,
        _username: &'a Username,
        _timeout: Duration,
    ) -> UpstreamFuture<'a> {
        let revoked = self.revocations.is_revoked(pool, SUB, now_secs());
        self.calls
            .lock()
            .expect("not poisoned")
            .push((Instant::now(), revoked));
        let error = self.error;
        Box::pin(async move {
            match error {
                Some(kind) => Err(UpstreamError::new(kind, std::io::Error::other("fake"))),
                None => Ok(SignedOut {
                    aws_request_id: "req".to_owned(),
                    at: SystemTime::UNIX_EPOCH,
                }),
            }
        })
    }
}

fn now_secs() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    i64::try_from(secs).expect("fits")
}

struct Setup {
    flow: SignOutFlow,
    directory: Arc<Directory>,
    upstream: Arc<Upstream>,
    revocations: Revocations,
    revocation_metrics: RevocationMetrics,
}

impl Setup {
    /// Watermarks recorded (memory-only mode counts each record).
    fn recorded(&self) -> u64 {
        self.revocation_metrics
            .recorded
            .with_label_values(&["memory_only"])
            .get()
    }
}

/// A flow at 1 permit/s, burst 1; with `spent`, the burst is taken, so the
/// next permit is a second away.
async fn setup(directory: Directory, error: Option<UpstreamErrorKind>, spent: bool) -> Setup {
    let registry = prometheus::Registry::new();
    let revocation_metrics = RevocationMetrics::new(&registry);
    let revocations = Revocations::in_memory(
        RevocationSettings {
            skew: Duration::from_secs(5),
            ttl: Duration::from_secs(3600),
            max_watchers: 1,
        },
        revocation_metrics.clone(),
    );
    let unlimited = LocalBudget::start(
        BudgetSettings {
            rate_per_sec: 1000.0,
            burst: 1000,
            max_queue: 100,
            max_wait: Duration::from_secs(10),
        },
        CallerSettings::default(),
    );
    let directory = Arc::new(directory);
    let users = SubResolver::new(
        directory.clone(),
        Budget::Local(unlimited),
        ResolverSettings {
            cache_size: 100,
            cache_ttl: Duration::from_secs(3600),
            attempt_timeout: Duration::from_secs(2),
        },
        LookupMetrics::register(&registry).expect("registered"),
    );
    let budget = LocalBudget::start(
        BudgetSettings {
            rate_per_sec: 1.0,
            burst: 1,
            max_queue: 100,
            max_wait: Duration::from_secs(10),
        },
        CallerSettings::default(),
    );
    if spent {
        budget
            .acquire(Instant::now() + Duration::from_secs(1))
            .await
            .expect("the burst");
    }
    let upstream = Arc::new(Upstream {
        revocations: revocations.clone(),
        error,
        calls: Mutex::default(),
    });
    let flow = SignOutFlow::new(
        upstream.clone(),
        Some(Revoker {
            users,
            revocations: revocations.clone(),
        }),
        Budget::Local(budget),
        10,
        RetrySettings {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(1),
        },
        Arc::new(Metrics::new()),
    );
    Setup {
        flow,
        directory,
        upstream,
        revocations,
        revocation_metrics,
    }
}

fn directory(delay: Duration, found: bool) -> Directory {
    Directory {
        delay,
        found,
        canonical: false,
        calls: Mutex::default(),
    }
}

fn call(caller: &str, deadline: Instant) -> SignOutCall {
    SignOutCall {
        pool: UserPoolId::parse(POOL).expect("pool"),
        username: Username::parse("alice@example.com").expect("username"),
        user_hash: "hash".to_owned(),
        caller: JobCaller {
            id: CallerId::parse(caller).expect("caller"),
            verified: None,
        },
        deadline,
    }
}

#[tokio::test(start_paused = true)]
async fn the_watermark_is_in_place_before_the_call_and_stays_when_cognito_throttles() {
    let setup = setup(
        directory(Duration::ZERO, true),
        Some(UpstreamErrorKind::Throttled),
        false,
    )
    .await;
    let pool = UserPoolId::parse(POOL).expect("pool");

    let outcome = setup
        .flow
        .sign_out(call("a", Instant::now() + Duration::from_secs(5)))
        .await;

    assert_eq!(
        outcome.expect_err("throttled").reason(),
        "COGNITO_THROTTLED"
    );
    let calls = setup.upstream.calls();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].1, "revoked before Cognito was called");
    assert!(setup.revocations.is_revoked(&pool, SUB, now_secs()));
}

#[tokio::test(start_paused = true)]
async fn callers_of_one_job_share_one_lookup() {
    let setup = setup(directory(Duration::ZERO, true), None, true).await;
    let deadline = Instant::now() + Duration::from_secs(5);

    let (first, second) = tokio::join!(
        setup.flow.sign_out(call("a", deadline)),
        setup.flow.sign_out(call("b", deadline)),
    );

    assert!(first.is_ok() && second.is_ok());
    assert_eq!(setup.upstream.calls().len(), 1);
    assert_eq!(
        *setup.directory.calls.lock().expect("not poisoned"),
        1,
        "an alias is never cached: one lookup because one job"
    );
}

#[tokio::test(start_paused = true)]
async fn the_lookup_runs_while_the_job_waits_for_its_permit() {
    // The lookup takes 400 ms; the permit comes at 1 s.
    let setup = setup(directory(Duration::from_millis(400), true), None, true).await;
    let start = Instant::now();

    setup
        .flow
        .sign_out(call("a", start + Duration::from_secs(5)))
        .await
        .expect("signed out");

    let calls = setup.upstream.calls();
    let at = calls[0].0 - start;
    assert!(
        at >= Duration::from_millis(990) && at < Duration::from_millis(1100),
        "called at {at:?}: at the permit, not the permit plus the lookup"
    );
    assert!(calls[0].1, "revoked before the call");
}

#[tokio::test(start_paused = true)]
async fn a_failed_lookup_ends_the_job_at_once_with_no_call() {
    let setup = setup(directory(Duration::from_millis(10), false), None, true).await;
    let start = Instant::now();

    let outcome = setup
        .flow
        .sign_out(call("a", start + Duration::from_secs(5)))
        .await;

    assert_eq!(outcome.expect_err("not found").reason(), "USER_NOT_FOUND");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "before the permit's slot (1 s): {:?}",
        start.elapsed()
    );
    assert!(setup.upstream.calls().is_empty());
    assert!(
        setup.flow.queued().is_empty(),
        "nobody can join a failed job"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_ends_within_an_interval_of_the_slot_calls_on_that_permit() {
    // Slot at 1 s, lookup done at 1.5 s: within one interval (1 s).
    let setup = setup(directory(Duration::from_millis(1500), true), None, true).await;
    let start = Instant::now();

    setup
        .flow
        .sign_out(call("a", start + Duration::from_secs(5)))
        .await
        .expect("signed out");

    let calls = setup.upstream.calls();
    assert_eq!(calls[0].0 - start, Duration::from_millis(1500));
    let wait = next_permit(&setup.flow).await;
    assert_eq!(
        wait,
        Duration::from_millis(500),
        "one permit taken: the next at 2 s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_ends_later_takes_a_permit_of_its_own() {
    // Slot at 1 s, lookup done at 2.5 s: the call must not ride the old
    // permit (slow lookups ending together would reach Cognito as a burst).
    let setup = setup(directory(Duration::from_millis(2500), true), None, true).await;
    let start = Instant::now();

    setup
        .flow
        .sign_out(call("a", start + Duration::from_secs(5)))
        .await
        .expect("signed out");

    let calls = setup.upstream.calls();
    assert!(calls[0].0 - start >= Duration::from_millis(2500));
    let wait = next_permit(&setup.flow).await;
    assert_eq!(
        wait,
        Duration::from_secs(1),
        "a second permit was taken at 2.5 s: the next at 3.5 s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_job_that_waited_records_its_watermark_again_at_the_permit() {
    // Lookup and watermark at 0; b joins at 0.5 s (after the watermark, so
    // it may follow a sign-in later than it); the permit comes at 1 s.
    let setup = setup(directory(Duration::ZERO, true), None, true).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let late_joiner = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(setup.recorded(), 1, "recorded once the lookup ended");
        setup.flow.sign_out(call("b", deadline)).await
    };

    let (first, second) = tokio::join!(setup.flow.sign_out(call("a", deadline)), late_joiner);

    assert!(first.is_ok() && second.is_ok());
    assert_eq!(setup.upstream.calls().len(), 1);
    assert_eq!(setup.recorded(), 2, "recorded again at the permit");
}

#[tokio::test(start_paused = true)]
async fn a_job_granted_at_once_records_its_watermark_once() {
    // Nobody can join a job granted at once: one watermark covers it.
    let setup = setup(directory(Duration::ZERO, true), None, false).await;

    setup
        .flow
        .sign_out(call("a", Instant::now() + Duration::from_secs(5)))
        .await
        .expect("signed out");

    assert_eq!(setup.recorded(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_ends_after_the_permit_records_once() {
    // The watermark is taken after the permit, when nobody can join.
    let setup = setup(directory(Duration::from_millis(1500), true), None, true).await;

    setup
        .flow
        .sign_out(call("a", Instant::now() + Duration::from_secs(5)))
        .await
        .expect("signed out");

    assert_eq!(setup.recorded(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_immediate_grant_with_a_slow_lookup_calls_on_that_permit() {
    // The burst's permit at 0, the lookup done at 2.5 s (over an interval):
    // a permit from the burst may be spent at any time, so no second one.
    let setup = setup(directory(Duration::from_millis(2500), true), None, false).await;
    let start = Instant::now();

    setup
        .flow
        .sign_out(call("a", start + Duration::from_secs(5)))
        .await
        .expect("signed out");

    let calls = setup.upstream.calls();
    assert_eq!(calls[0].0 - start, Duration::from_millis(2500));
    assert!(calls[0].1, "revoked before the call");
    let wait = next_permit(&setup.flow).await;
    assert_eq!(
        wait,
        Duration::ZERO,
        "one permit taken: the bucket refilled at 1 s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_user_cognito_does_not_find_is_looked_up_again() {
    // Cached under its canonical name, then deleted: the sign-out call says
    // USER_NOT_FOUND, and the next sign-out must not reuse the old sub.
    let mut found = directory(Duration::ZERO, true);
    found.canonical = true;
    let setup = setup(found, Some(UpstreamErrorKind::UserNotFound), false).await;

    for caller in ["a", "b"] {
        let outcome = setup
            .flow
            .sign_out(call(caller, Instant::now() + Duration::from_secs(5)))
            .await;
        assert_eq!(outcome.expect_err("gone").reason(), "USER_NOT_FOUND");
        tokio::time::advance(Duration::from_secs(2)).await;
    }

    assert_eq!(*setup.directory.calls.lock().expect("not poisoned"), 2);
}

/// How long the next permit takes from now (virtual time).
async fn next_permit(flow: &SignOutFlow) -> Duration {
    let asked = Instant::now();
    flow.budget()
        .acquire(asked + Duration::from_secs(10))
        .await
        .expect("a permit");
    asked.elapsed()
}
