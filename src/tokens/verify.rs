//! The checks, in the order the issue fixes: a JWT at all, RS256, a known
//! `kid`, the signature, the exact issuer, `token_use`, the app client,
//! expiry, then `auth_time` and `iat`. Signature and RSA are jsonwebtoken's
//! (aws-lc-rs); nothing here parses the claims before the signature holds.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::jwks::{JwksCache, KeyLookupError};
use crate::domain::{BearerToken, ClientId, ExpectedUse, UserPoolId};

/// A token's `token_use`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// `access`.
    Access,
    /// `id`.
    Id,
}

/// What an active token says about itself (RFC 7662's fields). Its Debug
/// shows no claim that names the user or the token.
#[derive(Clone, PartialEq, Eq)]
pub struct ActiveToken {
    /// `sub`.
    pub sub: String,
    /// `username` (access) or `cognito:username` (ID).
    pub username: String,
    /// `client_id` (access) or `aud` (ID).
    pub client_id: String,
    /// `token_use`.
    pub token_use: TokenUse,
    /// `scope` (access tokens).
    pub scope: String,
    /// `exp`, `iat`, `auth_time`: seconds since the epoch.
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
    /// Original sign-in.
    pub auth_time: i64,
    /// `jti`.
    pub jti: String,
    /// `origin_jti`.
    pub origin_jti: String,
}

/// Why a token is not active: coarse on purpose, for callers and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InactiveReason {
    /// Malformed, wrong algorithm, unknown key, bad signature, wrong issuer,
    /// missing claims.
    Invalid,
    /// Past `exp` plus the leeway.
    Expired,
    /// Not the `token_use` the caller asked for.
    WrongTokenUse,
    /// Issued to a client the caller does not accept.
    WrongClient,
    /// Signed in at or before the user's revocation watermark.
    Revoked,
}

impl InactiveReason {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Expired => "expired",
            Self::WrongTokenUse => "wrong_token_use",
            Self::WrongClient => "wrong_client",
            Self::Revoked => "revoked",
        }
    }
}

impl std::fmt::Debug for ActiveToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveToken")
            .field("token_use", &self.token_use)
            .field("exp", &self.exp)
            .field("iat", &self.iat)
            .field("auth_time", &self.auth_time)
            .finish_non_exhaustive()
    }
}

/// The outcome of one verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every check passed.
    Active(ActiveToken),
    /// A check failed.
    Inactive(InactiveReason),
}

/// The JWKS could not be had: the one failure that is not the token's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the user pool's signing keys are unavailable")]
pub struct KeysUnavailable {
    /// When a retry may succeed.
    pub retry_after: Duration,
    #[source]
    source: KeyLookupError,
}

/// What the caller accepts, beyond the pool.
#[derive(Debug, Clone)]
pub struct Expectations<'a> {
    /// Which `token_use`.
    pub token_use: ExpectedUse,
    /// Accepted clients; empty accepts any.
    pub client_ids: &'a [ClientId],
}

/// Verifies Cognito tokens of any pool, with one JWKS cache.
#[derive(Debug, Clone)]
pub struct Verifier {
    jwks: Arc<JwksCache>,
    leeway: Duration,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    token_use: Option<String>,
    client_id: Option<String>,
    aud: Option<String>,
    username: Option<String>,
    #[serde(rename = "cognito:username")]
    cognito_username: Option<String>,
    scope: Option<String>,
    exp: Option<i64>,
    iat: Option<i64>,
    auth_time: Option<i64>,
    jti: Option<String>,
    origin_jti: Option<String>,
}

impl Verifier {
    /// `leeway` is the clock skew allowed on `exp`. The issuer a token
    /// must name is its pool's: `https://cognito-idp.{region}.amazonaws.com/{pool}`,
    /// with the region taken from the pool id, as aws-jwt-verify does.
    pub fn new(jwks: Arc<JwksCache>, leeway: Duration) -> Self {
        Self { jwks, leeway }
    }

    /// Runs every check on `token` as a token of `pool`.
    pub async fn verify(
        &self,
        token: &BearerToken,
        pool: &UserPoolId,
        expect: &Expectations<'_>,
    ) -> Result<Verdict, KeysUnavailable> {
        let token = token.expose();
        let Some(kid) = rs256_kid(token) else {
            return Ok(Verdict::Inactive(InactiveReason::Invalid));
        };
        // No Cognito pool lives outside an AWS region: nothing to fetch.
        let Some(region) = pool.aws_region() else {
            return Ok(Verdict::Inactive(InactiveReason::Invalid));
        };
        let key = match self.jwks.key(pool, &kid).await {
            Ok(key) => key,
            Err(KeyLookupError::UnknownKid) => {
                return Ok(Verdict::Inactive(InactiveReason::Invalid));
            }
            Err(error @ KeyLookupError::Unavailable { retry_after, .. }) => {
                return Err(KeysUnavailable {
                    retry_after,
                    source: error,
                });
            }
        };
        // Only the signature here: the claims are checked below, in order,
        // with reasons jsonwebtoken's own validation would not give.
        let mut signature_only = Validation::new(Algorithm::RS256);
        signature_only.validate_exp = false;
        signature_only.validate_aud = false;
        signature_only.required_spec_claims.clear();
        let claims = match jsonwebtoken::decode::<Claims>(token, &key, &signature_only) {
            Ok(data) => data.claims,
            Err(_) => return Ok(Verdict::Inactive(InactiveReason::Invalid)),
        };
        Ok(self.check_claims(claims, region, pool, expect, now_secs()))
    }

    fn check_claims(
        &self,
        claims: Claims,
        region: &str,
        pool: &UserPoolId,
        expect: &Expectations<'_>,
        now: i64,
    ) -> Verdict {
        use InactiveReason as R;
        let issuer = format!(
            "https://cognito-idp.{region}.amazonaws.com/{}",
            pool.as_str()
        );
        if claims.iss.as_deref() != Some(issuer.as_str()) {
            return Verdict::Inactive(R::Invalid);
        }
        let token_use = match claims.token_use.as_deref() {
            Some("access") => TokenUse::Access,
            Some("id") => TokenUse::Id,
            _ => return Verdict::Inactive(R::Invalid),
        };
        let use_ok = match expect.token_use {
            ExpectedUse::Either => true,
            ExpectedUse::Access => token_use == TokenUse::Access,
            ExpectedUse::Id => token_use == TokenUse::Id,
        };
        if !use_ok {
            return Verdict::Inactive(R::WrongTokenUse);
        }
        let (client_id, username) = match token_use {
            TokenUse::Access => (claims.client_id, claims.username),
            TokenUse::Id => (claims.aud, claims.cognito_username),
        };
        let Some(client_id) = client_id else {
            return Verdict::Inactive(R::Invalid);
        };
        if !expect.client_ids.is_empty()
            && !expect.client_ids.iter().any(|c| c.as_str() == client_id)
        {
            return Verdict::Inactive(R::WrongClient);
        }
        let Some(exp) = claims.exp else {
            return Verdict::Inactive(R::Invalid);
        };
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX);
        if now >= exp.saturating_add(leeway) {
            return Verdict::Inactive(R::Expired);
        }
        let (Some(auth_time), Some(iat), Some(sub)) = (claims.auth_time, claims.iat, claims.sub)
        else {
            return Verdict::Inactive(R::Invalid);
        };
        Verdict::Active(ActiveToken {
            sub,
            username: username.unwrap_or_default(),
            client_id,
            token_use,
            scope: claims.scope.unwrap_or_default(),
            exp,
            iat,
            auth_time,
            jti: claims.jti.unwrap_or_default(),
            origin_jti: claims.origin_jti.unwrap_or_default(),
        })
    }
}

/// The `kid` of a token whose header says RS256, checked before any key
/// lookup so that `none`, HS256 and friends never reach the cache.
fn rs256_kid(token: &str) -> Option<String> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (header, _, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let header: Header = serde_json::from_slice(&header).ok()?;
    (header.alg == "RS256").then_some(header.kid?)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
