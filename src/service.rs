//! The gRPC handler: validate, resolve the pool, call Cognito, answer.

use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::{
    cognito::Cognito,
    deadline,
    domain::SignOutRequest,
    error::{ErrorChain, SignOutError},
    pools::PoolPolicy,
    proto::{GlobalSignOutRequest, GlobalSignOutResponse, session_service_server::SessionService},
};

/// `session.v1.SessionService`.
#[derive(Debug, Clone)]
pub struct SessionApi {
    cognito: Cognito,
    pools: PoolPolicy,
    upstream_timeout: Duration,
}

impl SessionApi {
    /// `upstream_timeout` bounds a call when the caller sets no shorter deadline.
    pub fn new(cognito: Cognito, pools: PoolPolicy, upstream_timeout: Duration) -> Self {
        Self {
            cognito,
            pools,
            upstream_timeout,
        }
    }

    async fn sign_out(
        &self,
        request: GlobalSignOutRequest,
        caller_timeout: Option<Duration>,
    ) -> Result<GlobalSignOutResponse, SignOutError> {
        let request = SignOutRequest::try_from(request)?;
        let pool = self.pools.resolve(request.user_pool_id)?;
        let budget = deadline::upstream_budget(self.upstream_timeout, caller_timeout);
        let signed_out = self
            .cognito
            .global_sign_out(&pool, &request.username, budget)
            .await?;
        tracing::info!(
            user_pool_id = %pool,
            aws_request_id = %signed_out.aws_request_id,
            "user signed out globally"
        );
        Ok(GlobalSignOutResponse {
            aws_request_id: signed_out.aws_request_id,
            signed_out_at: Some(signed_out.at.into()),
        })
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn global_sign_out(
        &self,
        request: Request<GlobalSignOutRequest>,
    ) -> Result<Response<GlobalSignOutResponse>, Status> {
        let caller_timeout = deadline::caller_timeout(request.metadata());
        match self.sign_out(request.into_inner(), caller_timeout).await {
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
