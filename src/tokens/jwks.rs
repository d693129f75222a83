//! Each pool's signing keys (its JWKS), cached. A known `kid` costs no
//! network call; an unknown one refetches the set, unless a fetch in the
//! last penalty period failed or did not hold the `kid` it was made for, and
//! concurrent refetches of a pool merge into one (the rules of
//! awslabs/aws-jwt-verify). So a rotated key is found by one refetch, and
//! a stream of made-up kids costs one fetch per penalty period.
//!
//! A fetch belongs to the cache, not to the call that needed it: it runs in
//! its own task, so a caller that gives up (a short deadline, a reset)
//! neither cancels it nor escapes its penalty, and the keys still arrive
//! for the next caller.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    time::Instant,
};

use crate::domain::UserPoolId;

/// Pools whose keys are kept. Real deployments verify a handful; the bound
/// keeps callers that name made-up pools from growing the map.
pub const MAX_POOLS: usize = 1_000;
/// JWKS fetches under way at once, over all pools: distinct pool ids must
/// not turn into a burst of outbound connections.
const MAX_CONCURRENT_FETCHES: usize = 4;
/// Fetches started or waiting for one of those slots. Beyond it a call that
/// needs a fetch is answered UNAVAILABLE at once, so fetch tasks (which
/// outlive their callers) cannot pile up.
const MAX_PENDING_FETCHES: usize = 64;

/// Where JWKS documents come from: Cognito over HTTP in the server, a fake
/// in tests.
#[tonic::async_trait]
pub trait JwksSource: std::fmt::Debug + Send + Sync {
    /// The JWKS document of `pool`, as bytes.
    async fn fetch(&self, pool: &UserPoolId) -> Result<Vec<u8>, JwksError>;
}

/// A JWKS fetch that gave no keys. Never carries the document itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    /// No answer in time.
    #[error("the JWKS fetch timed out")]
    Timeout,
    /// Connection, TLS or I/O failure.
    #[error("the JWKS endpoint could not be reached: {0}")]
    Unreachable(String),
    /// An HTTP status other than 200.
    #[error("the JWKS endpoint answered HTTP {0}")]
    Status(u16),
    /// Not a JWKS, or bigger than any real one.
    #[error("the JWKS document is unusable: {0}")]
    BadDocument(String),
    /// Too many fetches (of other pools) are under way to start one.
    #[error("too many JWKS fetches are under way")]
    Busy,
}

/// Why no key was found.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyLookupError {
    /// The pool's current JWKS has no such `kid`.
    #[error("no key with this kid in the pool's JWKS")]
    UnknownKid,
    /// The JWKS could not be had (and the key is not cached).
    #[error("the pool's JWKS is unavailable")]
    Unavailable {
        /// When a retry may succeed.
        retry_after: Duration,
        /// What went wrong.
        #[source]
        source: JwksError,
    },
}

/// Keys of one pool, by `kid`.
type KeySet = Arc<HashMap<String, DecodingKey>>;

/// What is known about one pool.
#[derive(Default)]
struct PoolState {
    keys: Option<KeySet>,
    /// No fetch before this: set by a fetch that failed or that did not
    /// hold the `kid` it was made for (an attacker's random kids).
    quiet_until: Option<Instant>,
    /// The last fetch failed: an unknown `kid` may be in the JWKS we could
    /// not read, so it is not the token's fault.
    last_error: Option<JwksError>,
    /// Counts finished fetches: a waiter that sees it move knows its
    /// refetch was done by someone else and must not start another.
    generation: u64,
    /// A fetch task is under way.
    fetching: bool,
}

struct PoolEntry {
    state: Mutex<PoolState>,
    /// The generation, sent when a fetch finishes: what waiters wait on.
    finished: watch::Sender<u64>,
}

/// The cache of every pool's keys; one per process, shared by all calls.
pub struct JwksCache {
    source: Arc<dyn JwksSource>,
    penalty: Duration,
    pools: Mutex<HashMap<UserPoolId, Arc<PoolEntry>>>,
    fetch_slots: Arc<Semaphore>,
    fetch_tickets: Arc<Semaphore>,
    on_fetch: Arc<dyn Fn(bool) + Send + Sync>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("source", &self.source)
            .field("penalty", &self.penalty)
            .finish_non_exhaustive()
    }
}

impl JwksCache {
    /// `penalty`: the least time between two fetches of one pool's JWKS
    /// caused by unknown `kid`s or after a failure. `on_fetch(ok)` is
    /// called once per fetch (for metrics).
    pub fn new(
        source: Arc<dyn JwksSource>,
        penalty: Duration,
        on_fetch: impl Fn(bool) + Send + Sync + 'static,
    ) -> Self {
        Self {
            source,
            penalty,
            pools: Mutex::default(),
            fetch_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_FETCHES)),
            fetch_tickets: Arc::new(Semaphore::new(MAX_PENDING_FETCHES)),
            on_fetch: Arc::new(on_fetch),
        }
    }

    /// The key `kid` of `pool`: from the cache, or after one (shared)
    /// refetch when the penalty allows it.
    pub async fn key(&self, pool: &UserPoolId, kid: &str) -> Result<DecodingKey, KeyLookupError> {
        let entry = self.entry(pool);
        let mut finished = entry.finished.subscribe();
        let seen = {
            let mut state = lock(&entry.state);
            if let Some(key) = state.keys.as_ref().and_then(|keys| keys.get(kid)) {
                return Ok(key.clone());
            }
            let now = Instant::now();
            if state.quiet_until.is_some_and(|until| now < until) {
                return self.lookup(&state, kid, now);
            }
            if !state.fetching {
                let Ok(ticket) = self.fetch_tickets.clone().try_acquire_owned() else {
                    return Err(KeyLookupError::Unavailable {
                        retry_after: Duration::from_secs(1),
                        source: JwksError::Busy,
                    });
                };
                state.fetching = true;
                self.spawn_fetch(pool.clone(), kid.to_owned(), entry.clone(), ticket);
            }
            state.generation
        };
        // `seen` was read under the lock the outcome is sent under, so the
        // fetch this call waits for sends a greater generation. It always
        // sends, even if its task panics or is cancelled (`FetchRecord`).
        let _ = finished.wait_for(|generation| *generation > seen).await;
        let state = lock(&entry.state);
        self.lookup(&state, kid, Instant::now())
    }

    /// Fetches `pool`'s JWKS in a task of its own and records the outcome;
    /// `kid` is the key it was started for.
    fn spawn_fetch(
        &self,
        pool: UserPoolId,
        kid: String,
        entry: Arc<PoolEntry>,
        ticket: OwnedSemaphorePermit,
    ) {
        let source = self.source.clone();
        let slots = self.fetch_slots.clone();
        let on_fetch = self.on_fetch.clone();
        let penalty = self.penalty;
        tokio::spawn(async move {
            let _ticket = ticket;
            let mut record = FetchRecord {
                entry,
                kid,
                penalty,
                recorded: false,
            };
            let fetched = match slots.acquire().await {
                Ok(_slot) => match source.fetch(&pool).await {
                    Ok(document) => parse_jwks(&document),
                    Err(error) => Err(error),
                },
                Err(_) => Err(JwksError::Unreachable("fetching has stopped".into())),
            };
            on_fetch(fetched.is_ok());
            if let Err(error) = &fetched {
                tracing::warn!(user_pool_id = pool.as_str(), %error, "JWKS fetch failed");
            }
            record.record(fetched);
        });
    }

    /// The answer from what is known now, without fetching.
    fn lookup(
        &self,
        state: &PoolState,
        kid: &str,
        now: Instant,
    ) -> Result<DecodingKey, KeyLookupError> {
        if let Some(key) = state.keys.as_ref().and_then(|keys| keys.get(kid)) {
            return Ok(key.clone());
        }
        match &state.last_error {
            // The key may be in the JWKS we could not read: not the token's fault.
            Some(error) => {
                let retry_after = state
                    .quiet_until
                    .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
                Err(KeyLookupError::Unavailable {
                    retry_after: retry_after.max(Duration::from_secs(1)),
                    source: error.clone(),
                })
            }
            None => Err(KeyLookupError::UnknownKid),
        }
    }

    /// The pool's entry. At [`MAX_POOLS`], a pool without keys (a failed
    /// or made-up one) makes room; when every pool has keys, the new pool
    /// shares a throwaway entry, so it is still served, one fetch per call
    /// at most [`MAX_CONCURRENT_FETCHES`] at once, and nothing is kept.
    fn entry(&self, pool: &UserPoolId) -> Arc<PoolEntry> {
        let mut pools = lock(&self.pools);
        if let Some(entry) = pools.get(pool) {
            return entry.clone();
        }
        if pools.len() >= MAX_POOLS {
            let keyless = pools
                .iter()
                .find(|(_, entry)| {
                    let state = lock(&entry.state);
                    state.keys.is_none() && !state.fetching
                })
                .map(|(pool, _)| pool.clone());
            match keyless {
                Some(evicted) => {
                    pools.remove(&evicted);
                }
                None => return Arc::new(PoolEntry::new()),
            }
        }
        pools
            .entry(pool.clone())
            .or_insert_with(|| Arc::new(PoolEntry::new()))
            .clone()
    }
}

/// Writes a fetch's outcome into its pool's state and wakes the waiters,
/// once: when the task ends without an answer (a panic, a runtime shutting
/// down), as a failure, so no pool is left marked as fetching for ever.
struct FetchRecord {
    entry: Arc<PoolEntry>,
    /// The `kid` the fetch was started for.
    kid: String,
    penalty: Duration,
    recorded: bool,
}

impl FetchRecord {
    fn record(&mut self, fetched: Result<HashMap<String, DecodingKey>, JwksError>) {
        self.recorded = true;
        let mut state = lock(&self.entry.state);
        let now = Instant::now();
        state.generation += 1;
        state.fetching = false;
        match fetched {
            Ok(keys) => {
                let found = keys.contains_key(&self.kid);
                state.keys = Some(Arc::new(keys));
                state.last_error = None;
                state.quiet_until = (!found).then_some(now + self.penalty);
            }
            // Keys already cached stay: a failed refetch (one a made-up kid
            // can cause) must not take a warm pool's keys away.
            Err(error) => {
                state.last_error = Some(error);
                state.quiet_until = Some(now + self.penalty);
            }
        }
        // Sent under the lock: a caller that reads the state after it sees
        // the new generation too, and generations only grow.
        self.entry.finished.send_replace(state.generation);
    }
}

impl Drop for FetchRecord {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(Err(JwksError::Unreachable(
                "the fetch ended before its answer".into(),
            )));
        }
    }
}

impl PoolEntry {
    fn new() -> Self {
        Self {
            state: Mutex::default(),
            finished: watch::Sender::new(0),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<Jwk>,
}

/// The fields of a JWK this verifier uses; others are ignored.
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

/// The RS256 signing keys of a JWKS, by `kid`. Keys of other types or uses
/// are skipped (a JWKS may list them); a set with no usable key is an error.
fn parse_jwks(document: &[u8]) -> Result<HashMap<String, DecodingKey>, JwksError> {
    let document: JwksDocument = serde_json::from_slice(document)
        .map_err(|e| JwksError::BadDocument(format!("not a JWKS: {e}")))?;
    let keys: HashMap<_, _> = document
        .keys
        .into_iter()
        .filter(|jwk| jwk.kty == "RSA")
        .filter(|jwk| jwk.alg.as_deref().is_none_or(|alg| alg == "RS256"))
        .filter(|jwk| jwk.use_.as_deref().is_none_or(|u| u == "sig"))
        .filter_map(|jwk| {
            let key =
                DecodingKey::from_rsa_components(jwk.n.as_deref()?, jwk.e.as_deref()?).ok()?;
            Some((jwk.kid?, key))
        })
        .collect();
    if keys.is_empty() {
        return Err(JwksError::BadDocument("no RS256 signing key".into()));
    }
    Ok(keys)
}

#[cfg(test)]
#[path = "jwks_tests.rs"]
mod tests;
