//! The VerifyToken request, parsed at the edge: a bounded token, an optional
//! pool, the expected use and the accepted app clients.

use std::fmt;

use super::{InvalidField, UserPoolId};
use crate::proto::{self, VerifyTokenRequest};

/// Cognito's tokens are 1 to 2 KiB; a caller's bigger "token" is not one,
/// and refusing it before any decoding bounds the work it can cause.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Cognito app client ids are at most 128 characters of `[\w+]+`.
const MAX_CLIENT_ID_CHARS: usize = 128;
/// More accepted clients than any pool has is a caller's bug.
const MAX_CLIENT_IDS: usize = 100;

/// A bearer token to verify. Secret: `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// Accepts 1 to [`MAX_TOKEN_BYTES`] bytes; whether it is a JWT is the
    /// verifier's question (a malformed token is inactive, not an error).
    pub fn parse(value: String) -> Result<Self, InvalidField> {
        if value.is_empty() || value.len() > MAX_TOKEN_BYTES {
            return Err(InvalidField {
                field: "token",
                description: "must be 1 to 8192 bytes long",
            });
        }
        Ok(Self(value))
    }

    /// The token itself, for the verifier only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Which `token_use` the caller accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedUse {
    /// An access token (`token_use: access`).
    Access,
    /// An ID token (`token_use: id`).
    Id,
    /// Either of them.
    Either,
}

/// A Cognito app client id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId(String);

impl ClientId {
    /// Accepts 1 to 128 word characters or `+` (Cognito's pattern).
    pub fn parse(value: String) -> Result<Self, InvalidField> {
        let valid = !value.is_empty()
            && value.chars().count() <= MAX_CLIENT_ID_CHARS
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '+');
        if valid {
            Ok(Self(value))
        } else {
            Err(InvalidField {
                field: "client_ids",
                description: "each must be 1 to 128 letters, digits, '_' or '+'",
            })
        }
    }

    /// The id as Cognito writes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated VerifyToken request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyCommand {
    /// The token.
    pub token: BearerToken,
    /// The pool the caller named; the pool policy decides an empty one.
    pub user_pool_id: Option<UserPoolId>,
    /// Which use is accepted.
    pub expected_use: ExpectedUse,
    /// Accepted app clients; empty accepts any client of the pool.
    pub client_ids: Vec<ClientId>,
}

impl TryFrom<VerifyTokenRequest> for VerifyCommand {
    type Error = InvalidField;

    fn try_from(request: VerifyTokenRequest) -> Result<Self, Self::Error> {
        let expected_use = match proto::TokenUse::try_from(request.token_use) {
            Ok(proto::TokenUse::Either) => ExpectedUse::Either,
            Ok(proto::TokenUse::Access) => ExpectedUse::Access,
            Ok(proto::TokenUse::Id) => ExpectedUse::Id,
            // Unset is refused: a verifier that checks no token_use by
            // default is what every service had already.
            Ok(proto::TokenUse::Unspecified) | Err(_) => {
                return Err(InvalidField {
                    field: "token_use",
                    description: "must be TOKEN_USE_ACCESS, TOKEN_USE_ID or TOKEN_USE_EITHER",
                });
            }
        };
        if request.client_ids.len() > MAX_CLIENT_IDS {
            return Err(InvalidField {
                field: "client_ids",
                description: "at most 100 client ids",
            });
        }
        let user_pool_id = match request.user_pool_id.as_str() {
            "" => None,
            _ => Some(UserPoolId::parse(request.user_pool_id)?),
        };
        Ok(Self {
            token: BearerToken::parse(request.token)?,
            user_pool_id,
            expected_use,
            client_ids: request
                .client_ids
                .into_iter()
                .map(ClientId::parse)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// The request holds a bearer token: its Debug says only what was asked.
impl std::fmt::Debug for VerifyTokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyTokenRequest")
            .field(
                "token",
                &format_args!("<{} bytes, redacted>", self.token.len()),
            )
            .field("user_pool_id", &self.user_pool_id)
            .field("token_use", &self.token_use)
            .field("client_ids", &self.client_ids)
            .finish()
    }
}

/// The answer holds the token's claims: its Debug shows the verdict only.
impl std::fmt::Debug for proto::VerifyTokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyTokenResponse")
            .field("active", &self.active)
            .field("inactive_reason", &self.inactive_reason)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(token: &str) -> VerifyTokenRequest {
        VerifyTokenRequest {
            token: token.into(),
            token_use: proto::TokenUse::Either.into(),
            ..Default::default()
        }
    }

    #[test]
    fn empty_and_oversized_tokens_are_invalid_fields_that_never_echo_the_token() {
        for token in [String::new(), "a".repeat(MAX_TOKEN_BYTES + 1)] {
            let error = VerifyCommand::try_from(request(&token)).expect_err("refused");
            assert_eq!(error.field, "token");
        }
        let ok = VerifyCommand::try_from(request(&"a".repeat(MAX_TOKEN_BYTES))).expect("fits");
        assert_eq!(format!("{:?}", ok.token), "BearerToken(<redacted>)");
        let request = request("eyJhbGciOiJSUzI1NiJ9.secret.sig");
        assert!(!format!("{request:?}").contains("secret"), "{request:?}");
        assert_eq!(ok.expected_use, ExpectedUse::Either);
    }

    #[test]
    fn unknown_token_uses_and_bad_client_ids_are_refused() {
        for token_use in [42, proto::TokenUse::Unspecified.into()] {
            let mut bad_use = request("x");
            bad_use.token_use = token_use;
            assert_eq!(
                VerifyCommand::try_from(bad_use).expect_err("use").field,
                "token_use",
                "{token_use}"
            );
        }
        let mut bad_client = request("x");
        bad_client.client_ids = vec!["has space".into()];
        assert_eq!(
            VerifyCommand::try_from(bad_client)
                .expect_err("client")
                .field,
            "client_ids"
        );
    }
}
