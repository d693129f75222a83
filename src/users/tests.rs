//! The resolver on paused time, with a fake directory behind it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::*;
use crate::{
    cognito::UserFuture,
    limiter::{BudgetSettings, CallerSettings, LocalBudget, RateLimitCause},
};

const POOL: &str = "eu-west-1_Pool";
const TTL: Duration = Duration::from_secs(3600);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Users by any name they answer to; unknown names are UserNotFound.
#[derive(Debug, Default)]
struct FakeDirectory {
    users: Mutex<HashMap<String, CognitoUser>>,
    /// Every call's username and the timeout it was given.
    calls: Mutex<Vec<(String, Duration)>>,
    /// Answer with this error instead.
    error: Mutex<Option<UpstreamErrorKind>>,
    /// How long each call takes.
    delay: Mutex<Duration>,
}

impl FakeDirectory {
    fn add(&self, name: &str, canonical: &str, sub: &str) {
        let user = CognitoUser {
            username: canonical.to_owned(),
            sub: Sub::new(sub).expect("sub"),
        };
        self.users
            .lock()
            .expect("not poisoned")
            .insert(name.to_owned(), user);
    }

    fn calls(&self) -> usize {
        self.calls.lock().expect("not poisoned").len()
    }
}

impl UserDirectory for FakeDirectory {
    fn get_user<'a>(
        &'a self,
        _pool: &'a UserPoolId,
        username: &'a Username,
        timeout: Duration,
    ) -> UserFuture<'a> {
        Box::pin(async move {
            let name = username.expose().to_owned();
            self.calls
                .lock()
                .expect("not poisoned")
                .push((name.clone(), timeout));
            let delay = *self.delay.lock().expect("not poisoned");
            let error = *self.error.lock().expect("not poisoned");
            let answer = async {
                tokio::time::sleep(delay).await;
                if let Some(kind) = error {
                    return Err(UpstreamError::new(kind, std::io::Error::other("fake")));
                }
                let user = self.users.lock().expect("not poisoned").get(&name).cloned();
                user.ok_or_else(|| {
                    UpstreamError::new(
                        UpstreamErrorKind::UserNotFound,
                        std::io::Error::other("no such user"),
                    )
                })
            };
            match tokio::time::timeout(timeout, answer).await {
                Ok(answer) => answer,
                Err(elapsed) => Err(UpstreamError::new(UpstreamErrorKind::Timeout, elapsed)),
            }
        })
    }
}

struct Fixture {
    directory: Arc<FakeDirectory>,
    resolver: SubResolver,
    metrics: LookupMetrics,
}

fn fixture(rate_per_sec: f64, burst: u32) -> Fixture {
    let directory = Arc::new(FakeDirectory::default());
    directory.add("alice", "alice", "sub-alice");
    directory.add("alice@example.com", "alice", "sub-alice");
    directory.add("sub-alice", "alice", "sub-alice");
    let budget = Budget::Local(LocalBudget::start(
        BudgetSettings {
            rate_per_sec,
            burst,
            max_queue: 10,
            max_wait: Duration::from_secs(2),
        },
        CallerSettings::default(),
    ));
    let metrics = LookupMetrics::register(&Registry::new()).expect("metrics");
    let resolver = SubResolver::new(
        directory.clone(),
        budget,
        ResolverSettings {
            cache_size: 100,
            cache_ttl: TTL,
            attempt_timeout: ATTEMPT_TIMEOUT,
        },
        metrics.clone(),
    );
    Fixture {
        directory,
        resolver,
        metrics,
    }
}

impl Fixture {
    async fn resolve(&self, username: &str) -> Result<Sub, SignOutError> {
        self.resolve_within(username, Duration::from_secs(5)).await
    }

    async fn resolve_within(&self, username: &str, time: Duration) -> Result<Sub, SignOutError> {
        let pool = UserPoolId::parse(POOL).expect("pool");
        let username = Username::parse(username).expect("username");
        self.resolver
            .resolve(&pool, &username, Instant::now() + time)
            .await
    }

    fn counted(&self, result: &str) -> u64 {
        self.metrics.lookups.with_label_values(&[result]).get()
    }
}

fn upstream_kind(error: &SignOutError) -> UpstreamErrorKind {
    match error {
        SignOutError::Upstream(upstream) => upstream.kind,
        other => panic!("not an upstream error: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_canonical_username_is_looked_up_once_then_cached() {
    let fixture = fixture(100.0, 10);

    let first = fixture.resolve("alice").await.expect("resolves");
    let second = fixture.resolve("alice").await.expect("resolves");

    assert_eq!(first.as_str(), "sub-alice");
    assert_eq!(second, first);
    assert_eq!(fixture.directory.calls(), 1);
    assert_eq!(fixture.counted("cognito"), 1);
    assert_eq!(fixture.counted("cached"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_alias_is_looked_up_every_time() {
    let fixture = fixture(100.0, 10);

    for _ in 0..3 {
        let sub = fixture
            .resolve("alice@example.com")
            .await
            .expect("resolves");
        assert_eq!(sub.as_str(), "sub-alice");
    }

    assert_eq!(fixture.directory.calls(), 3);
    assert_eq!(fixture.counted("cached"), 0);
}

#[tokio::test(start_paused = true)]
async fn the_sub_used_as_a_username_is_cached() {
    let fixture = fixture(100.0, 10);

    fixture.resolve("sub-alice").await.expect("resolves");
    fixture.resolve("sub-alice").await.expect("resolves");

    assert_eq!(fixture.directory.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cached_sub_expires_after_the_ttl() {
    let fixture = fixture(100.0, 10);
    fixture.resolve("alice").await.expect("resolves");
    // The user is deleted and created again: a new sub.
    fixture.directory.add("alice", "alice", "sub-alice-2");

    tokio::time::advance(TTL - Duration::from_secs(1)).await;
    let before = fixture.resolve("alice").await.expect("resolves");
    tokio::time::advance(Duration::from_secs(2)).await;
    let after = fixture.resolve("alice").await.expect("resolves");

    assert_eq!(before.as_str(), "sub-alice");
    assert_eq!(after.as_str(), "sub-alice-2");
    assert_eq!(fixture.directory.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_user_is_looked_up_again_within_the_ttl() {
    let fixture = fixture(100.0, 10);
    let pool = UserPoolId::parse(POOL).expect("pool");
    fixture.resolve("alice").await.expect("resolves");
    fixture
        .resolve("alice@example.com")
        .await
        .expect("resolves");
    // Deleted (a sign-out found nobody) and created again: a new sub.
    fixture.directory.add("alice", "alice", "sub-alice-2");

    fixture
        .resolver
        .forget(&pool, &Username::parse("alice").expect("username"));
    let after = fixture.resolve("alice").await.expect("resolves");

    assert_eq!(after.as_str(), "sub-alice-2");
    assert_eq!(fixture.directory.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_over_budget_is_refused_without_calling_cognito() {
    let fixture = fixture(1.0, 1);
    fixture
        .resolve("alice@example.com")
        .await
        .expect("resolves");

    // The next permit is a second away; the caller waits 100 ms at most.
    let refused = fixture
        .resolve_within("alice@example.com", Duration::from_millis(100))
        .await
        .expect_err("over budget");

    let SignOutError::RateLimited(limited) = refused else {
        panic!("not rate limited: {refused:?}");
    };
    assert_eq!(limited.cause, RateLimitCause::WouldWaitTooLong);
    assert!(limited.retry_after > Duration::ZERO);
    assert_eq!(fixture.directory.calls(), 1);
    assert_eq!(fixture.counted("rate_limited"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cached_user_needs_no_budget() {
    let fixture = fixture(1.0, 1);
    fixture.resolve("alice").await.expect("resolves");

    let cached = fixture
        .resolve_within("alice", Duration::from_millis(100))
        .await;

    assert!(cached.is_ok(), "{cached:?}");
}

#[tokio::test(start_paused = true)]
async fn an_unknown_user_is_user_not_found_and_not_cached() {
    let fixture = fixture(100.0, 10);

    let error = fixture.resolve("bob").await.expect_err("unknown");
    fixture.resolve("bob").await.expect_err("still unknown");

    assert_eq!(upstream_kind(&error), UpstreamErrorKind::UserNotFound);
    assert_eq!(fixture.directory.calls(), 2);
    assert_eq!(fixture.counted("not_found"), 2);
}

#[tokio::test(start_paused = true)]
async fn upstream_errors_keep_their_kind() {
    use UpstreamErrorKind as K;
    for kind in [
        K::Throttled,
        K::InternalError,
        K::UserPoolNotFound,
        K::AuthFailed,
    ] {
        let fixture = fixture(100.0, 10);
        *fixture.directory.error.lock().expect("not poisoned") = Some(kind);

        let error = fixture.resolve("alice").await.expect_err("fails");

        assert_eq!(upstream_kind(&error), kind);
        assert_eq!(fixture.counted("error"), 1, "{kind:?}");
        assert_eq!(fixture.directory.calls(), 1, "no retry after {kind:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn throttling_slows_the_lookup_budget() {
    let fixture = fixture(100.0, 10);
    *fixture.directory.error.lock().expect("not poisoned") = Some(UpstreamErrorKind::Throttled);

    fixture.resolve("alice").await.expect_err("throttled");

    assert!(fixture.resolver.inner.budget.current_rate() < 100.0);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_shorter_than_the_call_times_out_at_the_deadline() {
    let fixture = fixture(100.0, 10);
    *fixture.directory.delay.lock().expect("not poisoned") = Duration::from_secs(1);
    let started = Instant::now();

    let error = fixture
        .resolve_within("alice", Duration::from_millis(300))
        .await
        .expect_err("too slow");

    assert_eq!(upstream_kind(&error), UpstreamErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    let calls = fixture
        .directory
        .calls
        .lock()
        .expect("not poisoned")
        .clone();
    assert_eq!(calls[0].1, Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn a_call_never_takes_longer_than_the_attempt_timeout() {
    let fixture = fixture(100.0, 10);
    *fixture.directory.delay.lock().expect("not poisoned") = Duration::from_secs(10);

    let error = fixture
        .resolve_within("alice", Duration::from_secs(30))
        .await
        .expect_err("too slow");

    assert_eq!(upstream_kind(&error), UpstreamErrorKind::Timeout);
    let calls = fixture
        .directory
        .calls
        .lock()
        .expect("not poisoned")
        .clone();
    assert_eq!(calls[0].1, ATTEMPT_TIMEOUT);
}

#[test]
fn a_sub_is_never_empty_or_oversized() {
    assert!(Sub::new("").is_none());
    assert!(Sub::new(&"x".repeat(MAX_SUB_BYTES + 1)).is_none());
    assert_eq!(
        Sub::new("abc").map(|s| s.as_str().to_owned()),
        Some("abc".into())
    );
}
