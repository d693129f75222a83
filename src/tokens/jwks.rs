//! Each pool's signing keys (its JWKS), cached. A known `kid` costs no
//! network call; an unknown one refetches the set, unless a fetch in the
//! last penalty period failed or did not hold the `kid` it was made for, and
//! concurrent refetches of a pool merge into one (the rules of
//! awslabs/aws-jwt-verify). So a rotated key is found by one refetch, and
//! a stream of made-up kids costs one fetch per penalty period.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use tokio::time::Instant;

use crate::domain::UserPoolId;

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
}

struct PoolEntry {
    state: Mutex<PoolState>,
    /// Held while fetching: concurrent refetches wait here and share one.
    fetching: tokio::sync::Mutex<()>,
}

/// The cache of every pool's keys; one per process, shared by all calls.
pub struct JwksCache {
    source: Arc<dyn JwksSource>,
    penalty: Duration,
    pools: Mutex<HashMap<UserPoolId, Arc<PoolEntry>>>,
    on_fetch: Box<dyn Fn(bool) + Send + Sync>,
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
            on_fetch: Box::new(on_fetch),
        }
    }

    /// The key `kid` of `pool`: from the cache, or after one (shared)
    /// refetch when the penalty allows it.
    pub async fn key(&self, pool: &UserPoolId, kid: &str) -> Result<DecodingKey, KeyLookupError> {
        let entry = self.entry(pool);
        let seen = {
            let state = lock(&entry.state);
            if let Some(key) = state.keys.as_ref().and_then(|keys| keys.get(kid)) {
                return Ok(key.clone());
            }
            state.generation
        };
        let _fetching = entry.fetching.lock().await;
        let now = Instant::now();
        {
            let state = lock(&entry.state);
            let fetched_meanwhile = state.generation != seen;
            let in_penalty = state.quiet_until.is_some_and(|until| now < until);
            if fetched_meanwhile || in_penalty {
                return self.lookup(&state, kid, now);
            }
        }
        let fetched = self.fetch(pool).await;
        (self.on_fetch)(fetched.is_ok());
        let mut state = lock(&entry.state);
        let now = Instant::now();
        state.generation += 1;
        match fetched {
            Ok(keys) => {
                let found = keys.contains_key(kid);
                state.keys = Some(Arc::new(keys));
                state.last_error = None;
                state.quiet_until = (!found).then_some(now + self.penalty);
            }
            Err(error) => {
                tracing::warn!(user_pool_id = pool.as_str(), %error, "JWKS fetch failed");
                state.last_error = Some(error);
                state.quiet_until = Some(now + self.penalty);
            }
        }
        self.lookup(&state, kid, now)
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

    async fn fetch(&self, pool: &UserPoolId) -> Result<HashMap<String, DecodingKey>, JwksError> {
        let document = self.source.fetch(pool).await?;
        parse_jwks(&document)
    }

    fn entry(&self, pool: &UserPoolId) -> Arc<PoolEntry> {
        lock(&self.pools)
            .entry(pool.clone())
            .or_insert_with(|| {
                Arc::new(PoolEntry {
                    state: Mutex::default(),
                    fetching: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
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
