//! VerifyToken: admit the caller, parse, resolve and authorize the pool,
//! then ask the verifier. The verdict is an answer; only an unreadable JWKS
//! is an error.

use tonic::metadata::MetadataMap;

use super::{SessionApi, authorize};
use crate::{
    authz::Rpc,
    domain::{Username, VerifyCommand},
    error::SignOutError,
    identity::PeerInfo,
    proto::{self, VerifyTokenRequest, VerifyTokenResponse},
    telemetry::AccessNote,
    tokens::{Expectations, InactiveReason, TokenUse, Verdict},
};

impl SessionApi {
    pub(super) async fn verify(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
        request: VerifyTokenRequest,
        note: &AccessNote,
    ) -> Result<VerifyTokenResponse, SignOutError> {
        let (caller, policy) = self.admit(metadata, peer, note)?;
        let command = VerifyCommand::try_from(request)?;
        let pool = self.pools.resolve(command.user_pool_id)?;
        authorize(
            policy.as_deref(),
            &caller.id,
            caller.verified.is_some(),
            Rpc::VerifyToken,
            &pool,
        )?;
        let expect = Expectations {
            token_use: command.expected_use,
            client_ids: &command.client_ids,
        };
        let verdict = self.tokens.verify(&command.token, &pool, &expect).await?;
        Ok(match verdict {
            Verdict::Active(token) => {
                // The access line names the user by keyed hash, as for sign-outs.
                let user_hash = Username::parse(token.sub.as_str())
                    .map(|sub| self.user_logging.hasher.hash(&sub))
                    .unwrap_or_default();
                note.target(pool.as_str(), user_hash, None);
                VerifyTokenResponse {
                    active: true,
                    inactive_reason: proto::InactiveReason::Unspecified.into(),
                    sub: token.sub,
                    username: token.username,
                    client_id: token.client_id,
                    token_use: match token.token_use {
                        TokenUse::Access => proto::TokenUse::Access,
                        TokenUse::Id => proto::TokenUse::Id,
                    }
                    .into(),
                    scope: token.scope,
                    exp: token.exp,
                    iat: token.iat,
                    auth_time: token.auth_time,
                    jti: token.jti,
                    origin_jti: token.origin_jti,
                }
            }
            Verdict::Inactive(reason) => VerifyTokenResponse {
                inactive_reason: match reason {
                    InactiveReason::Invalid => proto::InactiveReason::Invalid,
                    InactiveReason::Expired => proto::InactiveReason::Expired,
                    InactiveReason::WrongTokenUse => proto::InactiveReason::WrongTokenUse,
                    InactiveReason::WrongClient => proto::InactiveReason::WrongClient,
                    InactiveReason::Revoked => proto::InactiveReason::Revoked,
                }
                .into(),
                ..Default::default()
            },
        })
    }
}
