use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

use super::*;
use crate::tokens::mint::{self, MintKey};

/// A JWKS source whose document the test sets, counting fetches; with a
/// gate, each fetch waits for a permit so that tests can pile callers up.
#[derive(Debug, Default)]
struct FakeSource {
    document: Mutex<Option<Vec<u8>>>,
    fetches: AtomicUsize,
    gate: Option<Semaphore>,
}

impl FakeSource {
    fn serving(keys: &[&MintKey]) -> Arc<Self> {
        Arc::new(Self {
            document: Mutex::new(Some(mint::jwks(keys))),
            ..Self::default()
        })
    }

    fn set(&self, document: Option<Vec<u8>>) {
        *lock(&self.document) = document;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl JwksSource for FakeSource {
    async fn fetch(&self, _pool: &UserPoolId) -> Result<Vec<u8>, JwksError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        lock(&self.document).clone().ok_or(JwksError::Status(503))
    }
}

const PENALTY: Duration = Duration::from_secs(10);

fn pool(id: &str) -> UserPoolId {
    UserPoolId::parse(id).expect("pool")
}

fn cache(source: Arc<FakeSource>) -> JwksCache {
    JwksCache::new(source, PENALTY, |_| {})
}

#[tokio::test(start_paused = true)]
async fn a_known_kid_is_served_from_the_cache_without_fetching_again() {
    let key = MintKey::generate("k1");
    let source = FakeSource::serving(&[&key]);
    let cache = cache(source.clone());
    let pool = pool("us-east-1_A");

    for _ in 0..100 {
        cache.key(&pool, "k1").await.expect("known");
    }

    assert_eq!(source.fetches(), 1);
}

#[tokio::test(start_paused = true)]
async fn unknown_kids_refetch_at_most_once_per_penalty_period() {
    let key = MintKey::generate("k1");
    let source = FakeSource::serving(&[&key]);
    let cache = cache(source.clone());
    let pool = pool("us-east-1_A");
    cache.key(&pool, "k1").await.expect("warm");

    for _ in 0..50 {
        assert!(matches!(
            cache.key(&pool, "forged").await,
            Err(KeyLookupError::UnknownKid)
        ));
    }
    assert_eq!(source.fetches(), 2, "one refetch for 50 unknown kids");
    tokio::time::advance(PENALTY).await;
    let _ = cache.key(&pool, "forged").await;
    assert_eq!(source.fetches(), 3, "the next period allows one more");
}

#[tokio::test(start_paused = true)]
async fn a_rotated_key_is_found_by_one_refetch() {
    let old = MintKey::generate("old");
    let new = MintKey::generate("new");
    let source = FakeSource::serving(&[&old]);
    let cache = cache(source.clone());
    let pool = pool("us-east-1_A");
    cache.key(&pool, "old").await.expect("warm");
    source.set(Some(mint::jwks(&[&old, &new])));

    cache.key(&pool, "new").await.expect("found after rotation");
    cache.key(&pool, "new").await.expect("cached");

    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_lookups_of_an_unknown_kid_share_one_fetch() {
    let key = MintKey::generate("k1");
    let source = Arc::new(FakeSource {
        document: Mutex::new(Some(mint::jwks(&[&key]))),
        gate: Some(Semaphore::new(0)),
        ..FakeSource::default()
    });
    let cache = Arc::new(cache(source.clone()));
    let pool = pool("us-east-1_A");

    let lookups: Vec<_> = (0..32)
        .map(|_| {
            let (cache, pool) = (cache.clone(), pool.clone());
            tokio::spawn(async move { cache.key(&pool, "k1").await.is_ok() })
        })
        .collect();
    // Every task is now either fetching or queued behind the fetch.
    tokio::task::yield_now().await;
    while source.fetches() == 0 {
        tokio::task::yield_now().await;
    }
    if let Some(gate) = &source.gate {
        gate.add_permits(32);
    }
    for lookup in lookups {
        assert!(lookup.await.expect("joined"));
    }

    assert_eq!(source.fetches(), 1, "32 callers, one fetch");
}

#[tokio::test(start_paused = true)]
async fn a_warm_cache_survives_a_failing_jwks_and_a_cold_one_is_unavailable() {
    let key = MintKey::generate("k1");
    let source = FakeSource::serving(&[&key]);
    let warm = cache(source.clone());
    let (a, b) = (pool("us-east-1_A"), pool("us-east-1_B"));
    warm.key(&a, "k1").await.expect("warm");
    source.set(None);

    warm.key(&a, "k1")
        .await
        .expect("still verifies from the cache");
    let unknown = warm.key(&a, "other").await;
    let cold = warm.key(&b, "k1").await;
    let cold_again = warm.key(&b, "k1").await;

    assert!(
        matches!(unknown, Err(KeyLookupError::Unavailable { .. })),
        "{unknown:?}"
    );
    match cold {
        Err(KeyLookupError::Unavailable { retry_after, .. }) => {
            assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}");
        }
        other => panic!("cold cache: {other:?}"),
    }
    assert!(matches!(
        cold_again,
        Err(KeyLookupError::Unavailable { .. })
    ));
    assert_eq!(source.fetches(), 3, "a failure also waits out the penalty");
}

#[test]
fn jwks_documents_keep_only_rs256_signing_keys() {
    let key = MintKey::generate("k1");
    let (n, e) = key.components();
    let document = serde_json::json!({"keys": [
        {"kty": "RSA", "kid": "enc", "use": "enc", "n": n, "e": e},
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
        {"kty": "RSA", "kid": "ps", "alg": "PS256", "n": n, "e": e},
        {"kty": "RSA", "n": n, "e": e},
        key.jwk(),
    ]});

    let keys = parse_jwks(document.to_string().as_bytes()).expect("one usable key");

    assert_eq!(keys.keys().collect::<Vec<_>>(), ["k1"]);
    for bad in [&b"{}"[..], b"not json", br#"{"keys": []}"#] {
        assert!(parse_jwks(bad).is_err());
    }
}

/// A source that answers `status` (or the keys, for 200) after `delay`,
/// counting fetches.
#[derive(Debug)]
struct SlowSource {
    document: Mutex<Vec<u8>>,
    status: AtomicUsize,
    delay: Duration,
    fetches: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

impl SlowSource {
    fn new(keys: &[&MintKey], status: u16, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            document: Mutex::new(mint::jwks(keys)),
            status: AtomicUsize::new(status.into()),
            delay,
            fetches: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        })
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl JwksSource for SlowSource {
    async fn fetch(&self, _pool: &UserPoolId) -> Result<Vec<u8>, JwksError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        match self.status.load(Ordering::SeqCst) {
            200 => Ok(lock(&self.document).clone()),
            999 => panic!("a fetch that panics"),
            status => Err(JwksError::Status(u16::try_from(status).unwrap_or(500))),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn callers_that_give_up_mid_fetch_neither_escape_the_penalty_nor_cancel_the_fetch() {
    let key = MintKey::generate("k1");
    let source = SlowSource::new(&[&key], 200, Duration::from_millis(300));
    let cache = JwksCache::new(source.clone(), PENALTY, |_| {});
    let pool = pool("us-east-1_A");
    cache.key(&pool, "k1").await.expect("warm");

    // Each caller's deadline (as tonic enforces it: the call is dropped)
    // ends before the fetch its made-up kid started.
    for i in 0..20 {
        let kid = format!("forged-{i}");
        let lookup = cache.key(&pool, &kid);
        let _ = tokio::time::timeout(Duration::from_millis(100), lookup).await;
    }

    assert_eq!(
        source.fetches(),
        2,
        "the warm-up, then one refetch per penalty"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fetch_longer_than_every_callers_deadline_still_warms_the_cache() {
    let key = MintKey::generate("k1");
    let source = SlowSource::new(&[&key], 200, Duration::from_millis(1500));
    let cache = JwksCache::new(source.clone(), PENALTY, |_| {});
    let pool = pool("us-east-1_A");

    let mut answered = 0;
    for _ in 0..5 {
        let lookup = cache.key(&pool, "k1");
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), lookup).await {
            answered += 1;
        }
    }

    assert_eq!(source.fetches(), 1);
    assert_eq!(
        answered, 4,
        "the first caller gives up; the fetch goes on for the rest"
    );
}

#[tokio::test(start_paused = true)]
async fn a_warm_pool_keeps_its_keys_when_a_refetch_fails_and_a_cold_one_is_unavailable() {
    let key = MintKey::generate("k1");
    let source = SlowSource::new(&[&key], 200, Duration::ZERO);
    let cache = JwksCache::new(source.clone(), PENALTY, |_| {});
    let (warm, cold) = (pool("us-east-1_Warm"), pool("us-east-1_Cold"));
    cache.key(&warm, "k1").await.expect("warm");

    source.status.store(404, Ordering::SeqCst);
    let forged = cache.key(&warm, "made-up").await;
    let honest = cache.key(&warm, "k1").await;
    let cold_lookup = cache.key(&cold, "k1").await;

    assert!(
        matches!(forged, Err(KeyLookupError::Unavailable { .. })),
        "{forged:?}"
    );
    assert!(
        honest.is_ok(),
        "a 404 on a refetch took the warm keys: {honest:?}"
    );
    assert!(
        matches!(cold_lookup, Err(KeyLookupError::Unavailable { .. })),
        "{cold_lookup:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fetch_that_panics_still_wakes_its_waiters_and_frees_the_pool() {
    let key = MintKey::generate("k1");
    let source = SlowSource::new(&[&key], 999, Duration::from_millis(10));
    let cache = JwksCache::new(source.clone(), Duration::from_secs(1), |_| {});
    let pool = pool("us-east-1_A");

    let first = tokio::time::timeout(Duration::from_secs(5), cache.key(&pool, "k1")).await;
    assert!(
        matches!(first, Ok(Err(KeyLookupError::Unavailable { .. }))),
        "the waiter must be answered, not left waiting: {first:?}"
    );
    source.status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = tokio::time::timeout(Duration::from_secs(5), cache.key(&pool, "k1")).await;
    assert!(
        matches!(later, Ok(Ok(_))),
        "the pool fetches again after the penalty: {later:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn made_up_pools_keep_the_map_bounded_and_the_fetches_few_at_once() {
    let source = SlowSource::new(&[], 404, Duration::from_millis(50));
    let cache = Arc::new(JwksCache::new(source.clone(), PENALTY, |_| {}));

    let lookups: Vec<_> = (0..MAX_POOLS + 200)
        .map(|i| {
            let cache = cache.clone();
            let pool = pool(&format!("us-east-1_P{i}"));
            tokio::spawn(async move { cache.key(&pool, "k").await })
        })
        .collect();
    let mut busy = 0;
    for lookup in lookups {
        if let Err(KeyLookupError::Unavailable {
            source: JwksError::Busy,
            ..
        }) = lookup.await.expect("no panic")
        {
            busy += 1;
        }
    }

    assert!(lock(&cache.pools).len() <= MAX_POOLS);
    assert_eq!(
        source.fetches() + busy,
        MAX_POOLS + 200,
        "each pool fetched once or refused as busy"
    );
    assert!(
        busy >= MAX_POOLS + 200 - MAX_PENDING_FETCHES,
        "{busy} refused as busy"
    );
    assert!(
        source.peak.load(Ordering::SeqCst) <= MAX_CONCURRENT_FETCHES,
        "{} fetches at once",
        source.peak.load(Ordering::SeqCst)
    );
}
