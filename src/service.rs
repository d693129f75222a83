//! The gRPC handlers: identify the caller, validate, resolve the pool,
//! authorize; GlobalSignOut then checks the caller's rate and hands over to
//! the sign-out flow, VerifyToken (in [`verify`]) to the token verifier.

mod verify;
mod watch;

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    authz::{CurrentPolicy, Denied, Rpc},
    cognito::SignedOut,
    deadline,
    domain::{InvalidField, SignOutRequest},
    error::{ErrorChain, SignOutError},
    identity::{self, CallerId, IdentitySource, PeerInfo},
    metrics::Metrics,
    pools::PoolPolicy,
    proto::{
        GlobalSignOutRequest, GlobalSignOutResponse, VerifyTokenRequest, VerifyTokenResponse,
        WatchRevocationsRequest, session_service_server::SessionService,
    },
    revocation::Revocations,
    signout::{JobCaller, SignOutCall, SignOutFlow},
    telemetry::{AccessNote, UserHasher},
    tokens::Tokens,
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

/// How callers are identified and what they may do.
#[derive(Debug, Clone)]
pub struct CallerPolicy {
    /// Metadata key of the self-declared caller id (used when no verified
    /// identity exists).
    pub caller_id_header: String,
    /// Believe `x-forwarded-client-cert` (a sidecar in front).
    pub trust_forwarded_client_cert: bool,
    /// The authorization policy; `None` lets every caller act on every
    /// allowed pool.
    pub authz: Option<Arc<CurrentPolicy>>,
}

/// A caller as the handler knows it.
struct Caller {
    id: CallerId,
    /// `None` when the id is self-declared (header) or anonymous.
    verified: Option<IdentitySource>,
}

/// `session.v1.SessionService`.
#[derive(Debug, Clone)]
pub struct SessionApi {
    flow: SignOutFlow,
    pools: PoolPolicy,
    caller_policy: CallerPolicy,
    upstream_timeout: Duration,
    user_logging: UserLogging,
    metrics: Arc<Metrics>,
    tokens: Tokens,
    revocations: Revocations,
}

impl SessionApi {
    /// `upstream_timeout` bounds a sign-out when the caller sets no shorter
    /// deadline.
    #[allow(clippy::too_many_arguments)] // one call site: startup
    pub fn new(
        flow: SignOutFlow,
        pools: PoolPolicy,
        caller_policy: CallerPolicy,
        upstream_timeout: Duration,
        user_logging: UserLogging,
        metrics: Arc<Metrics>,
        tokens: Tokens,
        revocations: Revocations,
    ) -> Self {
        Self {
            flow,
            pools,
            caller_policy,
            upstream_timeout,
            user_logging,
            metrics,
            tokens,
            revocations,
        }
    }

    async fn sign_out(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
        request: GlobalSignOutRequest,
        note: &AccessNote,
    ) -> Result<SignedOut, SignOutError> {
        let received = Instant::now();
        let (
            Caller {
                id: caller,
                verified,
            },
            policy,
        ) = self.admit(metadata, peer, note)?;
        let request = SignOutRequest::try_from(request)?;
        let pool = self.pools.resolve(request.user_pool_id)?;
        authorize(
            policy.as_deref(),
            &caller,
            verified.is_some(),
            Rpc::GlobalSignOut,
            &pool,
        )?;
        let user_hash = self.user_logging.hasher.hash(&request.username);
        let username = self
            .user_logging
            .log_usernames
            .then(|| request.username.expose());
        note.target(pool.as_str(), user_hash.clone(), username);
        let time_allowed =
            deadline::time_allowed(self.upstream_timeout, deadline::caller_timeout(metadata));
        if time_allowed < deadline::MIN_TIME_FOR_A_CALL {
            return Err(SignOutError::DeadlineTooShort);
        }
        let deadline = received + time_allowed;
        // The flow audits every Cognito call it makes, whoever still waits.
        self.flow
            .sign_out(SignOutCall {
                pool,
                username: request.username,
                user_hash,
                caller: JobCaller {
                    id: caller,
                    verified,
                },
                deadline,
            })
            .await
    }

    /// Identifies the caller and, under a policy, refuses callers it does
    /// not know: unknown callers learn nothing, not even whether their
    /// request was valid. Returns the policy in force for this call.
    fn admit(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
        note: &AccessNote,
    ) -> Result<(Caller, Option<Arc<crate::authz::Policy>>), SignOutError> {
        let caller = self.caller(metadata, peer)?;
        note.caller(caller.id.as_str());
        let span = tracing::Span::current();
        span.record("caller.id", caller.id.as_str());
        span.record("caller.verified", caller.verified.is_some());
        let policy = self
            .caller_policy
            .authz
            .as_ref()
            .map(|authz| authz.load_full());
        if let Some(policy) = &policy {
            let verified_id = caller.verified.is_some().then_some(&caller.id);
            policy
                .knows(verified_id)
                .map_err(|denied| audit_denial(&caller.id, None, denied))?;
        }
        Ok((caller, policy))
    }

    /// The verified identity if there is one; else the caller-id header,
    /// which is then only a label for limits and logs, never authorization.
    fn caller(
        &self,
        metadata: &MetadataMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Caller, SignOutError> {
        let trust_xfcc = self.caller_policy.trust_forwarded_client_cert;
        if let Some(verified) = identity::verified_caller(peer, metadata, trust_xfcc)? {
            return Ok(Caller {
                id: verified.id,
                verified: Some(verified.source),
            });
        }
        Ok(Caller {
            id: self.declared_caller(metadata)?,
            verified: None,
        })
    }

    fn declared_caller(&self, metadata: &MetadataMap) -> Result<CallerId, InvalidField> {
        match metadata.get(self.caller_policy.caller_id_header.as_str()) {
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
        let peer = extensions.get::<PeerInfo>();
        match self.sign_out(&metadata, peer, message, &note).await {
            Ok(signed_out) => Ok(Response::new(GlobalSignOutResponse {
                aws_request_id: signed_out.aws_request_id,
                signed_out_at: Some(signed_out.at.into()),
            })),
            Err(error) => Err(self.refuse(error, "sign-out")),
        }
    }

    async fn verify_token(
        &self,
        request: Request<VerifyTokenRequest>,
    ) -> Result<Response<VerifyTokenResponse>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let note = extensions.get::<AccessNote>().cloned().unwrap_or_default();
        let peer = extensions.get::<PeerInfo>();
        match self.verify(&metadata, peer, message, &note).await {
            Ok(response) => Ok(Response::new(response)),
            Err(error) => Err(self.refuse(error, "token verification")),
        }
    }

    type WatchRevocationsStream = watch::RevocationStream;

    async fn watch_revocations(
        &self,
        request: Request<WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let note = extensions.get::<AccessNote>().cloned().unwrap_or_default();
        let peer = extensions.get::<PeerInfo>();
        match self.watch(&metadata, peer, message, &note) {
            Ok(stream) => Ok(Response::new(stream)),
            Err(error) => Err(self.refuse(error, "revocation watch")),
        }
    }
}

impl SessionApi {
    /// Counts, logs and converts a refusal.
    fn refuse(&self, error: SignOutError, what: &'static str) -> Status {
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
        if matches!(error, SignOutError::Unauthorized(_)) {
            self.metrics
                .authz_denials
                .with_label_values(&[error.reason()])
                .inc();
        }
        log_failure(&error, what);
        error.into()
    }
}

/// Under a policy, whether the caller may use `rpc` on `pool`; refusals
/// are audited.
fn authorize(
    policy: Option<&crate::authz::Policy>,
    caller: &CallerId,
    verified: bool,
    rpc: Rpc,
    pool: &crate::domain::UserPoolId,
) -> Result<(), SignOutError> {
    let Some(policy) = policy else {
        return Ok(());
    };
    policy
        .authorize(verified.then_some(caller), rpc, pool)
        .map_err(|denied| audit_denial(caller, Some(pool.as_str()), denied))
}

/// Refusals by the policy are security events: the audit log names who
/// tried, whatever their log level settings for the access line.
fn audit_denial(caller: &CallerId, user_pool_id: Option<&str>, denied: Denied) -> SignOutError {
    let error = SignOutError::from(denied);
    tracing::warn!(
        target: "audit",
        caller = caller.as_str(),
        user_pool_id,
        outcome = "denied",
        reason = error.reason(),
        "call denied by the authorization policy"
    );
    error
}

/// The access line has the code; this adds the cause chain, which holds the
/// SDK's own account. Server-class failures need an operator.
fn log_failure(error: &SignOutError, what: &'static str) {
    if error.is_server_fault() {
        tracing::error!(reason = error.reason(), error = %ErrorChain(error), "{what} failed");
    } else {
        tracing::debug!(reason = error.reason(), error = %ErrorChain(error), "{what} refused");
    }
}
