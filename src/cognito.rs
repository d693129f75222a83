//! The Cognito side: one SDK client built at start, its two calls
//! (AdminUserGlobalSignOut, and AdminGetUser to learn a user's sub), and the
//! classification of everything they can fail with.

use std::{
    future::Future,
    pin::Pin,
    time::{Duration, SystemTime},
};

use aws_config::SdkConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_cognitoidentityprovider::{
    Client,
    config::{Builder as CognitoConfigBuilder, retry::RetryConfig, timeout::TimeoutConfig},
    error::{ProvideErrorMetadata, SdkError},
    operation::{
        RequestId, admin_get_user::AdminGetUserError,
        admin_user_global_sign_out::AdminUserGlobalSignOutError,
    },
};

use crate::{
    domain::{UserPoolId, Username},
    error::{UpstreamError, UpstreamErrorKind},
    users::Sub,
};

/// Error codes AWS returns when it refuses *our* identity (credentials,
/// signature or IAM permission) rather than the request itself. They are not
/// in Cognito's model, so the SDK reports them as unmodelled errors.
const AWS_AUTH_ERROR_CODES: &[&str] = &[
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "ExpiredTokenException",
    "ExpiredToken",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
];

/// How the service talks to Cognito: endpoint and timeouts. Retries are the
/// service's own (see `signout.rs`), so that each attempt takes a permit.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Endpoint override (moto, a VPC endpoint); `None` is the regional default.
    pub endpoint: Option<String>,
    /// TCP + TLS connect timeout of one attempt.
    pub connect_timeout: Duration,
    /// Time allowed for one attempt, connect included.
    pub attempt_timeout: Duration,
}

/// What Cognito confirmed.
#[derive(Debug, Clone)]
pub struct SignedOut {
    /// `x-amzn-requestid` of the successful call.
    pub aws_request_id: String,
    /// When the confirmation arrived.
    pub at: SystemTime,
}

/// What an AdminUserGlobalSignOut attempt returns.
pub type UpstreamFuture<'a> =
    Pin<Box<dyn Future<Output = Result<SignedOut, UpstreamError>> + Send + 'a>>;

/// The one thing the sign-out flow needs from Cognito: a seam, so that the
/// flow's concurrency is tested on paused time with a fake behind it (the
/// status mapping stays tested over the wire, against the real client).
pub trait SignOutUpstream: std::fmt::Debug + Send + Sync {
    /// One attempt, giving up after `timeout` however far it got.
    fn global_sign_out<'a>(
        &'a self,
        pool: &'a UserPoolId,
        username: &'a Username,
        timeout: Duration,
    ) -> UpstreamFuture<'a>;
}

impl SignOutUpstream for Cognito {
    fn global_sign_out<'a>(
        &'a self,
        pool: &'a UserPoolId,
        username: &'a Username,
        timeout: Duration,
    ) -> UpstreamFuture<'a> {
        Box::pin(Cognito::global_sign_out(self, pool, username, timeout))
    }
}

/// A user as AdminGetUser describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CognitoUser {
    /// The canonical username, which may differ from the name asked for
    /// (an email or phone alias, or another case in a case-insensitive pool).
    pub username: String,
    /// The `sub` attribute: the user's immutable id, which tokens carry.
    pub sub: Sub,
}

/// What an AdminGetUser attempt returns.
pub type UserFuture<'a> =
    Pin<Box<dyn Future<Output = Result<CognitoUser, UpstreamError>> + Send + 'a>>;

/// Looking users up: a seam like [`SignOutUpstream`], so that the resolver's
/// cache, budget and deadlines are tested on paused time with a fake.
pub trait UserDirectory: std::fmt::Debug + Send + Sync {
    /// One AdminGetUser attempt, giving up after `timeout`.
    fn get_user<'a>(
        &'a self,
        pool: &'a UserPoolId,
        username: &'a Username,
        timeout: Duration,
    ) -> UserFuture<'a>;
}

impl UserDirectory for Cognito {
    fn get_user<'a>(
        &'a self,
        pool: &'a UserPoolId,
        username: &'a Username,
        timeout: Duration,
    ) -> UserFuture<'a> {
        Box::pin(Cognito::get_user(self, pool, username, timeout))
    }
}

/// The Cognito client; cheap to clone (the SDK client is an `Arc` inside).
#[derive(Debug, Clone)]
pub struct Cognito {
    client: Client,
}

impl Cognito {
    /// Builds the client from the AWS shared config (region, credentials)
    /// with our endpoint and timeouts on top, and the SDK's retries off.
    pub fn new(sdk_config: &SdkConfig, settings: &UpstreamSettings) -> Self {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(settings.connect_timeout)
            .operation_attempt_timeout(settings.attempt_timeout)
            .build();
        let mut config = CognitoConfigBuilder::from(sdk_config)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        Self {
            client: Client::from_conf(config.build()),
        }
    }

    /// The SDK client itself, configured as the service uses it (the
    /// benchmark's "SDK alone" floor calls it directly).
    pub fn sdk_client(&self) -> &Client {
        &self.client
    }

    /// Makes one AdminUserGlobalSignOut attempt, giving up after `timeout`
    /// (the caller's remaining deadline) however far it got.
    pub async fn global_sign_out(
        &self,
        pool: &UserPoolId,
        username: &Username,
        timeout: Duration,
    ) -> Result<SignedOut, UpstreamError> {
        let call = self
            .client
            .admin_user_global_sign_out()
            .user_pool_id(pool.as_str())
            .username(username.expose())
            .send();
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(output)) => Ok(SignedOut {
                aws_request_id: output.request_id().unwrap_or_default().to_owned(),
                at: SystemTime::now(),
            }),
            Ok(Err(error)) => Err(classify(SIGN_OUT, error)),
            Err(elapsed) => Err(timed_out(SIGN_OUT, elapsed)),
        }
    }

    /// Makes one AdminGetUser attempt (Cognito's UserRead quota, not the
    /// UserUpdate one sign-outs draw on), giving up after `timeout`.
    pub async fn get_user(
        &self,
        pool: &UserPoolId,
        username: &Username,
        timeout: Duration,
    ) -> Result<CognitoUser, UpstreamError> {
        let call = self
            .client
            .admin_get_user()
            .user_pool_id(pool.as_str())
            .username(username.expose())
            .send();
        let output = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(output)) => output,
            Ok(Err(error)) => return Err(classify(GET_USER, error)),
            Err(elapsed) => return Err(timed_out(GET_USER, elapsed)),
        };
        let sub = output
            .user_attributes()
            .iter()
            .find(|attribute| attribute.name() == "sub")
            .and_then(|attribute| attribute.value())
            .and_then(Sub::new);
        let Some(sub) = sub else {
            // Every Cognito user has a sub: a reply without one is not Cognito's.
            let mut error = UpstreamError::new(UpstreamErrorKind::BadResponse, MissingSub);
            error.operation = GET_USER;
            error.aws_request_id = output.request_id().map(str::to_owned);
            return Err(error);
        };
        Ok(CognitoUser {
            username: output.username().to_owned(),
            sub,
        })
    }
}

const SIGN_OUT: &str = "AdminUserGlobalSignOut";
const GET_USER: &str = "AdminGetUser";

/// An AdminGetUser reply without a usable `sub` attribute.
#[derive(Debug, thiserror::Error)]
#[error("AdminGetUser returned no sub attribute")]
struct MissingSub;

fn timed_out(operation: &'static str, elapsed: tokio::time::error::Elapsed) -> UpstreamError {
    let mut error = UpstreamError::new(UpstreamErrorKind::Timeout, elapsed);
    error.operation = operation;
    error
}

/// The modelled errors the Cognito operations share, so that one
/// [`classify`] reads them all.
trait ModelledError: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static {
    /// The row of a modelled error; `None` for an unmodelled one.
    fn kind(&self) -> Option<UpstreamErrorKind>;
}

/// Each operation's error enum has its own copy of the shared variants.
macro_rules! modelled_error {
    ($error:ident) => {
        impl ModelledError for $error {
            fn kind(&self) -> Option<UpstreamErrorKind> {
                use UpstreamErrorKind as K;
                Some(match self {
                    $error::UserNotFoundException(_) => K::UserNotFound,
                    $error::ResourceNotFoundException(_) => K::UserPoolNotFound,
                    $error::InvalidParameterException(_) => K::InvalidParameter,
                    $error::NotAuthorizedException(_) => K::NotAuthorized,
                    $error::OperationNotEnabledException(_) => K::OperationNotEnabled,
                    $error::TooManyRequestsException(_) => K::Throttled,
                    $error::InternalErrorException(_) => K::InternalError,
                    _ => return None,
                })
            }
        }
    };
}

modelled_error!(AdminUserGlobalSignOutError);
modelled_error!(AdminGetUserError);

/// Sorts an SDK failure of `operation` into one row of the status table.
fn classify<E: ModelledError>(
    operation: &'static str,
    error: SdkError<E, aws_sdk_cognitoidentityprovider::config::http::HttpResponse>,
) -> UpstreamError {
    use UpstreamErrorKind as K;
    let aws_request_id = error.request_id().map(str::to_owned);
    let (kind, cognito_code) = match &error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.code().map(str::to_owned);
            let kind = err.kind().unwrap_or_else(|| match code.as_deref() {
                Some(code) if AWS_AUTH_ERROR_CODES.contains(&code) => K::AuthFailed,
                Some(_) => K::Unexpected,
                // An error status with no error code we can read: a proxy
                // or load balancer page, not a Cognito answer.
                None => K::BadResponse,
            });
            (kind, code)
        }
        // The credentials chain failing (nothing configured, IRSA token
        // unreadable, STS refusing) is reported as a dispatch failure.
        _ if caused_by::<CredentialsError>(&error) => (K::AuthFailed, None),
        SdkError::TimeoutError(_) => (K::Timeout, None),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => (K::Timeout, None),
        SdkError::DispatchFailure(_) => (K::Unreachable, None),
        SdkError::ResponseError(_) => (K::BadResponse, None),
        _ => (K::Unexpected, None),
    };
    let mut upstream = UpstreamError::new(kind, error);
    upstream.operation = operation;
    upstream.aws_request_id = aws_request_id;
    upstream.cognito_code = cognito_code;
    upstream
}

/// True when an error of type `E` is anywhere in `error`'s source chain.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(cause) = current {
        if cause.is::<E>() {
            return true;
        }
        current = cause.source();
    }
    false
}
