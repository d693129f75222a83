//! WatchRevocations: admit the caller, parse, resolve and authorize every
//! pool (all must pass), then hand over to the revocation watch.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Status, metadata::MetadataMap};

use super::{SessionApi, authorize};
use crate::{
    authz::Rpc,
    domain::WatchCommand,
    error::SignOutError,
    identity::PeerInfo,
    proto::{self, WatchRevocationsRequest},
    revocation::{WatchEnd, Watched},
    telemetry::AccessNote,
};

/// The stream tonic sends.
pub(super) type RevocationStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchRevocationsResponse, Status>> + Send>>;

impl SessionApi {
    pub(super) fn watch(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
        request: WatchRevocationsRequest,
        note: &AccessNote,
    ) -> Result<RevocationStream, SignOutError> {
        let (caller, policy) = self.admit(metadata, peer, note)?;
        let command = WatchCommand::try_from(request)?;
        let mut pools = Vec::with_capacity(command.user_pool_ids.len());
        for requested in command.user_pool_ids {
            let pool = self.pools.resolve(requested)?;
            authorize(
                policy.as_deref(),
                &caller.id,
                caller.verified.is_some(),
                Rpc::WatchRevocations,
                &pool,
            )?;
            if !pools.contains(&pool) {
                pools.push(pool);
            }
        }
        let names: Vec<&str> = pools.iter().map(|pool| pool.as_str()).collect();
        note.target(&names.join(","), String::new(), None);
        let stream = self.revocations.watch(pools, command.cursor)?;
        // A watch never ends by itself: if it ends without saying why (a
        // client too slow to read its snapshot, a reason it could not be
        // sent), it ends UNAVAILABLE / WATCH_INTERRUPTED, never OK, so that
        // the client reconnects.
        let mut ended = false;
        Ok(Box::pin(
            stream
                .map(Some)
                .chain(tokio_stream::once(None))
                .filter_map(move |item| match item {
                    Some(Ok(watched)) => Some(Ok(to_proto(watched))),
                    Some(Err(end)) => {
                        ended = true;
                        Some(Err(Status::from(SignOutError::from(end))))
                    }
                    None if ended => None,
                    None => Some(Err(Status::from(SignOutError::from(WatchEnd::Interrupted)))),
                }),
        ))
    }
}

fn to_proto(watched: Watched) -> proto::WatchRevocationsResponse {
    proto::WatchRevocationsResponse {
        user_pool_id: watched.revocation.pool.as_str().to_owned(),
        sub: watched.revocation.sub,
        revoked_before: watched.revocation.revoked_before,
        expires_at: watched.expires_at,
        cursor: watched.cursor.to_string(),
    }
}
