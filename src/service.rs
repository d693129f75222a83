//! The gRPC handler: identify the caller, validate, resolve the pool, check
//! the caller's rate, then hand over to the sign-out flow.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    deadline,
    domain::{InvalidField, SignOutRequest},
    error::{ErrorChain, SignOutError},
    limiter::{CallerId, CallerLimits},
    pools::PoolPolicy,
    proto::{GlobalSignOutRequest, GlobalSignOutResponse, session_service_server::SessionService},
    signout::SignOutFlow,
};

/// `session.v1.SessionService`.
#[derive(Debug, Clone)]
pub struct SessionApi {
    flow: SignOutFlow,
    pools: PoolPolicy,
    callers: Arc<CallerLimits>,
    caller_id_header: String,
    upstream_timeout: Duration,
}

impl SessionApi {
    /// `upstream_timeout` bounds a sign-out when the caller sets no shorter
    /// deadline; `caller_id_header` is the metadata key naming the caller.
    pub fn new(
        flow: SignOutFlow,
        pools: PoolPolicy,
        callers: CallerLimits,
        caller_id_header: String,
        upstream_timeout: Duration,
    ) -> Self {
        Self {
            flow,
            pools,
            callers: Arc::new(callers),
            caller_id_header,
            upstream_timeout,
        }
    }

    async fn sign_out(
        &self,
        metadata: &MetadataMap,
        request: GlobalSignOutRequest,
    ) -> Result<GlobalSignOutResponse, SignOutError> {
        let received = Instant::now();
        let caller = self.caller_id(metadata)?;
        let request = SignOutRequest::try_from(request)?;
        let pool = self.pools.resolve(request.user_pool_id)?;
        self.callers.check(&caller, received)?;
        let budget =
            deadline::upstream_budget(self.upstream_timeout, deadline::caller_timeout(metadata));
        let signed_out = self
            .flow
            .sign_out(pool.clone(), request.username, received + budget)
            .await?;
        tracing::info!(
            %caller,
            user_pool_id = %pool,
            aws_request_id = %signed_out.aws_request_id,
            "user signed out globally"
        );
        Ok(GlobalSignOutResponse {
            aws_request_id: signed_out.aws_request_id,
            signed_out_at: Some(signed_out.at.into()),
        })
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
        let (metadata, _, message) = request.into_parts();
        match self.sign_out(&metadata, message).await {
            Ok(response) => Ok(Response::new(response)),
            Err(error) => {
                log_failure(&error);
                Err(error.into())
            }
        }
    }
}

/// Client-class failures are routine (info); server-class ones need an
/// operator (error). The chain holds the SDK's own account of the failure.
fn log_failure(error: &SignOutError) {
    let code = error.code();
    if error.is_server_fault() {
        tracing::error!(grpc_code = ?code, error = %ErrorChain(error), "sign-out failed");
    } else {
        tracing::info!(grpc_code = ?code, error = %ErrorChain(error), "sign-out refused");
    }
}
