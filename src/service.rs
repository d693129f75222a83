//! The gRPC handler: identify the caller, validate, resolve the pool, check
//! the caller's rate, then hand over to the sign-out flow.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    cognito::SignedOut,
    deadline,
    domain::{InvalidField, SignOutRequest},
    error::{ErrorChain, SignOutError},
    limiter::{CallerId, CallerLimits},
    metrics::Metrics,
    pools::PoolPolicy,
    proto::{GlobalSignOutRequest, GlobalSignOutResponse, session_service_server::SessionService},
    signout::SignOutFlow,
    telemetry::{AccessNote, UserHasher},
};

/// What the handler writes about users: hashes, and usernames only when an
/// operator opted in.
#[derive(Debug, Clone)]
pub struct UserLogging {
    /// Keyed hash of usernames for logs.
    pub hasher: UserHasher,
    /// Also log the username itself (explicit opt-in).
    pub log_usernames: bool,
}

/// `session.v1.SessionService`.
#[derive(Debug, Clone)]
pub struct SessionApi {
    flow: SignOutFlow,
    pools: PoolPolicy,
    callers: Arc<CallerLimits>,
    caller_id_header: String,
    upstream_timeout: Duration,
    users: UserLogging,
    metrics: Arc<Metrics>,
}

impl SessionApi {
    /// `upstream_timeout` bounds a sign-out when the caller sets no shorter
    /// deadline; `caller_id_header` is the metadata key naming the caller.
    #[allow(clippy::too_many_arguments)] // one call site: startup
    pub fn new(
        flow: SignOutFlow,
        pools: PoolPolicy,
        callers: CallerLimits,
        caller_id_header: String,
        upstream_timeout: Duration,
        users: UserLogging,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            flow,
            pools,
            callers: Arc::new(callers),
            caller_id_header,
            upstream_timeout,
            users,
            metrics,
        }
    }

    async fn sign_out(
        &self,
        metadata: &MetadataMap,
        request: GlobalSignOutRequest,
        note: &AccessNote,
    ) -> Result<SignedOut, SignOutError> {
        let received = Instant::now();
        let caller = self.caller_id(metadata)?;
        note.caller(caller.as_str());
        tracing::Span::current().record("caller.id", caller.as_str());
        let request = SignOutRequest::try_from(request)?;
        let pool = self.pools.resolve(request.user_pool_id)?;
        let user_hash = self.users.hasher.hash(&request.username);
        let username = self.users.log_usernames.then(|| request.username.expose());
        note.target(pool.as_str(), user_hash.clone(), username);
        self.callers.check(&caller, received)?;
        let budget =
            deadline::upstream_budget(self.upstream_timeout, deadline::caller_timeout(metadata));
        let result = self
            .flow
            .sign_out(pool.clone(), request.username, received + budget)
            .await;
        audit(&caller, pool.as_str(), &user_hash, &result);
        result
    }

    fn caller_id(&self, metadata: &MetadataMap) -> Result<CallerId, InvalidField> {
        match metadata.get(self.caller_id_header.as_str()) {
            None => Ok(CallerId::anonymous()),
            Some(value) => value
                .to_str()
                .map_err(|_| CallerId::INVALID)
                .and_then(CallerId::parse),
        }
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn global_sign_out(
        &self,
        request: Request<GlobalSignOutRequest>,
    ) -> Result<Response<GlobalSignOutResponse>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        // Present when the RPC telemetry layer is in front (always, in the server).
        let note = extensions.get::<AccessNote>().cloned().unwrap_or_default();
        match self.sign_out(&metadata, message, &note).await {
            Ok(signed_out) => Ok(Response::new(GlobalSignOutResponse {
                aws_request_id: signed_out.aws_request_id,
                signed_out_at: Some(signed_out.at.into()),
            })),
            Err(error) => {
                if matches!(
                    error,
                    SignOutError::CallerRateLimited(_)
                        | SignOutError::RateLimited(_)
                        | SignOutError::Overloaded
                ) {
                    self.metrics
                        .rejections
                        .with_label_values(&[error.reason()])
                        .inc();
                }
                log_failure(&error);
                Err(error.into())
            }
        }
    }
}

/// "Who signed this user out": one record per caller whose sign-out reached
/// Cognito (coalesced callers each get one, with the shared request id).
fn audit(
    caller: &CallerId,
    user_pool_id: &str,
    user_hash: &str,
    result: &Result<SignedOut, SignOutError>,
) {
    let (outcome, aws_request_id) = match result {
        Ok(signed_out) => ("signed_out", Some(signed_out.aws_request_id.as_str())),
        Err(SignOutError::Upstream(error)) => {
            (error.outcome_label(), error.aws_request_id.as_deref())
        }
        Err(_) => return, // refused before Cognito: the access line tells
    };
    tracing::info!(
        target: "audit",
        caller = caller.as_str(),
        user_pool_id,
        user_hash,
        outcome,
        aws_request_id,
        "global sign-out"
    );
}

/// The access line has the code; this adds the cause chain, which holds the
/// SDK's own account. Server-class failures need an operator.
fn log_failure(error: &SignOutError) {
    if error.is_server_fault() {
        tracing::error!(reason = error.reason(), error = %ErrorChain(error), "sign-out failed");
    } else {
        tracing::debug!(reason = error.reason(), error = %ErrorChain(error), "sign-out refused");
    }
}
