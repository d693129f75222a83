//! The one error type of the API (a sign-out or a token verification) and
//! the one place that turns it into a gRPC status. Callers get a short, safe message plus machine-readable
//! details; the full cause chain stays in the logs.

use std::{collections::HashMap, error::Error as StdError, fmt, sync::Arc, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    authz::Denied,
    domain::InvalidField,
    identity::IdentityError,
    limiter::{CallerRateLimited, RateLimitCause, RateLimited, Refusal},
    revocation::{WatchEnd, WatchRefused},
    tokens::KeysUnavailable,
};

/// `google.rpc.ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "session-service";

/// How long a caller should wait before retrying a retryable failure. Cognito
/// publishes no better hint; one second is the SDK's own initial backoff.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Shared so that one failed call can be reported to every coalesced caller.
type SharedError = Arc<dyn StdError + Send + Sync + 'static>;

/// Why a sign-out did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignOutError {
    /// A request field is malformed; nothing was sent upstream.
    #[error(transparent)]
    InvalidField(#[from] InvalidField),
    /// No pool in the request and no default configured.
    #[error("no user pool id in the request and no default configured")]
    UserPoolRequired,
    /// The pool is outside the configured allow list.
    #[error("user pool is not in the allowed list")]
    UserPoolNotAllowed,
    /// The caller's certificate or forwarded identity is unusable.
    #[error(transparent)]
    CallerIdentity(#[from] IdentityError),
    /// The authorization policy refused the caller or the pool.
    #[error(transparent)]
    Unauthorized(#[from] Denied),
    /// This caller is over its own rate.
    #[error(transparent)]
    CallerRateLimited(#[from] CallerRateLimited),
    /// No upstream permit before the deadline, or the queue is full.
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    /// `--max-in-flight` calls to Cognito are already under way.
    #[error("too many Cognito calls in flight")]
    Overloaded,
    /// The caller's deadline left too little time for any Cognito call
    /// (`deadline::MIN_TIME_FOR_A_CALL`), or passed while the call waited
    /// for its permit; nothing was sent upstream, so not a server fault.
    #[error("the caller's deadline leaves no time for a Cognito call")]
    DeadlineTooShort,
    /// Cognito was called and the call failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// VerifyToken: the pool's JWKS could not be fetched and the key is not
    /// cached. Not the token's fault, so never `active = false`.
    #[error(transparent)]
    KeysUnavailable(#[from] KeysUnavailable),
    /// WatchRevocations: no new stream now.
    #[error(transparent)]
    WatchRefused(#[from] WatchRefused),
    /// WatchRevocations: the stream ended early; the client resumes with
    /// its cursor.
    #[error(transparent)]
    WatchEnded(#[from] WatchEnd),
}

/// A failed Cognito call (AdminUserGlobalSignOut after the service's
/// retries, or the AdminGetUser in front of it).
#[derive(Debug, Clone, thiserror::Error)]
#[error("Cognito {operation} failed ({kind:?})")]
pub struct UpstreamError {
    /// What kind of failure it was: decides the gRPC status.
    pub kind: UpstreamErrorKind,
    /// The Cognito operation that failed, for logs.
    pub operation: &'static str,
    /// `x-amzn-requestid` of the failed call, when Cognito answered.
    pub aws_request_id: Option<String>,
    /// The Cognito error code, such as `UserNotFoundException`.
    pub cognito_code: Option<String>,
    #[source]
    source: SharedError,
}

impl UpstreamError {
    /// Wraps the SDK's error with what we learned from it.
    pub fn new(kind: UpstreamErrorKind, source: impl StdError + Send + Sync + 'static) -> Self {
        Self {
            kind,
            operation: "AdminUserGlobalSignOut",
            aws_request_id: None,
            cognito_code: None,
            source: Arc::new(source),
        }
    }
}

impl UpstreamError {
    /// A bounded label for metrics: Cognito's own error code when it is one
    /// we know, else the kind of failure (never an arbitrary upstream string).
    pub fn outcome_label(&self) -> &'static str {
        use UpstreamErrorKind as K;
        match self.kind {
            K::UserNotFound => "UserNotFoundException",
            K::UserPoolNotFound => "ResourceNotFoundException",
            K::InvalidParameter => "InvalidParameterException",
            K::NotAuthorized => "NotAuthorizedException",
            K::OperationNotEnabled => "OperationNotEnabledException",
            K::Throttled => "TooManyRequestsException",
            K::InternalError => "InternalErrorException",
            K::AuthFailed => "AuthFailed",
            K::Unexpected => "UnexpectedError",
            K::Timeout => "Timeout",
            K::Unreachable => "Unreachable",
            K::BadResponse => "BadResponse",
        }
    }
}

/// The failures callers can tell apart; one row each in the status table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// UserNotFoundException.
    UserNotFound,
    /// ResourceNotFoundException: the pool does not exist.
    UserPoolNotFound,
    /// InvalidParameterException.
    InvalidParameter,
    /// NotAuthorizedException.
    NotAuthorized,
    /// OperationNotEnabledException.
    OperationNotEnabled,
    /// TooManyRequestsException, still there after the retries.
    Throttled,
    /// InternalErrorException (HTTP 500).
    InternalError,
    /// Our own AWS identity was refused or could not be loaded.
    AuthFailed,
    /// Any other error code Cognito sent.
    Unexpected,
    /// The SDK's timeouts or the caller's deadline ran out.
    Timeout,
    /// Connection refused, DNS, TLS or other I/O failure.
    Unreachable,
    /// Cognito's reply could not be understood.
    BadResponse,
}

/// One row of the status table.
struct StatusRow {
    code: Code,
    reason: &'static str,
    message: &'static str,
    retryable: bool,
}

const fn row(
    code: Code,
    reason: &'static str,
    message: &'static str,
    retryable: bool,
) -> StatusRow {
    StatusRow {
        code,
        reason,
        message,
        retryable,
    }
}

impl UpstreamErrorKind {
    /// Worth another upstream attempt: the same call may succeed a moment
    /// later (the SDK's standard classifier retries the same set). Not the
    /// same as RetryInfo for callers: a timed-out attempt is retried here,
    /// but a caller whose deadline ran out is not told to retry.
    pub fn is_transient(self) -> bool {
        use UpstreamErrorKind as K;
        matches!(
            self,
            K::Throttled | K::InternalError | K::Timeout | K::Unreachable | K::BadResponse
        )
    }

    fn status_row(self) -> StatusRow {
        use UpstreamErrorKind as K;
        match self {
            K::UserNotFound => row(
                Code::NotFound,
                "USER_NOT_FOUND",
                "user not found in the user pool",
                false,
            ),
            K::UserPoolNotFound => row(
                Code::NotFound,
                "USER_POOL_NOT_FOUND",
                "user pool not found",
                false,
            ),
            K::InvalidParameter => row(
                Code::InvalidArgument,
                "COGNITO_INVALID_PARAMETER",
                "Cognito rejected a request parameter",
                false,
            ),
            K::NotAuthorized => row(
                Code::PermissionDenied,
                "COGNITO_NOT_AUTHORIZED",
                "Cognito refused the sign-out",
                false,
            ),
            K::OperationNotEnabled => row(
                Code::FailedPrecondition,
                "COGNITO_OPERATION_NOT_ENABLED",
                "the operation is not enabled for this user pool",
                false,
            ),
            K::Throttled => row(
                Code::ResourceExhausted,
                "COGNITO_THROTTLED",
                "Cognito is throttling requests",
                true,
            ),
            K::InternalError => row(
                Code::Unavailable,
                "COGNITO_INTERNAL_ERROR",
                "Cognito had an internal error",
                true,
            ),
            K::AuthFailed => row(
                Code::Internal,
                "UPSTREAM_AUTH_FAILED",
                "the service could not authenticate to Cognito",
                false,
            ),
            K::Unexpected => row(
                Code::Internal,
                "COGNITO_UNEXPECTED_ERROR",
                "Cognito returned an unexpected error",
                false,
            ),
            K::Timeout => row(
                Code::DeadlineExceeded,
                "UPSTREAM_TIMEOUT",
                "Cognito did not answer in time",
                false,
            ),
            K::Unreachable => row(
                Code::Unavailable,
                "COGNITO_UNREACHABLE",
                "Cognito could not be reached",
                true,
            ),
            K::BadResponse => row(
                Code::Unavailable,
                "COGNITO_BAD_RESPONSE",
                "Cognito's response could not be understood",
                true,
            ),
        }
    }
}

impl SignOutError {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        status_parts(self).0.code
    }

    /// The ErrorInfo reason this error carries.
    pub fn reason(&self) -> &'static str {
        status_parts(self).0.reason
    }

    /// True for failures that are the service's or Cognito's fault rather
    /// than the caller's: they are logged at error level.
    pub fn is_server_fault(&self) -> bool {
        !matches!(self, Self::DeadlineTooShort) && is_server_fault(self.code())
    }
}

/// The status row, details and ErrorInfo metadata of an error: the whole
/// table in one place.
fn status_parts(error: &SignOutError) -> (StatusRow, ErrorDetails, HashMap<String, String>) {
    let mut metadata = HashMap::new();
    let (row, details) = match error {
        SignOutError::InvalidField(invalid) => (
            row(
                Code::InvalidArgument,
                "INVALID_FIELD",
                "invalid request field",
                false,
            ),
            ErrorDetails::with_bad_request_violation(invalid.field, invalid.description),
        ),
        SignOutError::UserPoolRequired => (
            row(
                Code::InvalidArgument,
                "USER_POOL_REQUIRED",
                "user_pool_id is required: the server has no default pool",
                false,
            ),
            ErrorDetails::with_bad_request_violation(
                "user_pool_id",
                "required: the server has no default user pool",
            ),
        ),
        SignOutError::UserPoolNotAllowed => (
            row(
                Code::PermissionDenied,
                "USER_POOL_NOT_ALLOWED",
                "this service may not act on that user pool",
                false,
            ),
            ErrorDetails::new(),
        ),
        SignOutError::CallerIdentity(_) => (
            row(
                Code::Unauthenticated,
                "CALLER_IDENTITY_INVALID",
                "the caller's certificate identity is unusable",
                false,
            ),
            ErrorDetails::new(),
        ),
        SignOutError::Unauthorized(Denied::CallerNotAllowed) => (
            row(
                Code::PermissionDenied,
                "CALLER_NOT_ALLOWED",
                "this caller may not sign users out",
                false,
            ),
            ErrorDetails::new(),
        ),
        SignOutError::Unauthorized(Denied::PoolNotAllowedForCaller) => (
            row(
                Code::PermissionDenied,
                "POOL_NOT_ALLOWED_FOR_CALLER",
                "this caller may not act on that user pool",
                false,
            ),
            ErrorDetails::new(),
        ),
        SignOutError::Unauthorized(Denied::RpcNotAllowedForCaller) => (
            row(
                Code::PermissionDenied,
                "RPC_NOT_ALLOWED_FOR_CALLER",
                "this caller may not use this RPC",
                false,
            ),
            ErrorDetails::new(),
        ),
        SignOutError::KeysUnavailable(unavailable) => (
            row(
                Code::Unavailable,
                "JWKS_UNAVAILABLE",
                "the user pool's signing keys could not be fetched",
                true,
            ),
            ErrorDetails::with_retry_info(Some(unavailable.retry_after)),
        ),
        SignOutError::CallerRateLimited(limited) => (
            row(
                Code::ResourceExhausted,
                "CALLER_RATE_LIMITED",
                "this caller is over its sign-out rate",
                true,
            ),
            ErrorDetails::with_retry_info(Some(limited.retry_after)),
        ),
        SignOutError::RateLimited(limited) => {
            let cause = match limited.cause {
                RateLimitCause::QueueFull => "queue_full",
                RateLimitCause::WouldWaitTooLong => "wait_exceeds_deadline",
            };
            metadata.insert("cause".to_owned(), cause.to_owned());
            (
                row(
                    Code::ResourceExhausted,
                    "RATE_LIMITED",
                    "the Cognito rate budget is exhausted",
                    true,
                ),
                ErrorDetails::with_retry_info(Some(limited.retry_after)),
            )
        }
        SignOutError::DeadlineTooShort => (
            row(
                Code::DeadlineExceeded,
                "DEADLINE_TOO_SHORT",
                "the call's deadline leaves no time to reach Cognito",
                false,
            ),
            ErrorDetails::new(),
        ),
        SignOutError::Overloaded => (
            row(
                Code::ResourceExhausted,
                "OVERLOADED",
                "too many Cognito calls in flight",
                true,
            ),
            ErrorDetails::new(),
        ),
        SignOutError::WatchRefused(WatchRefused::TooManyWatchers) => (
            row(
                Code::ResourceExhausted,
                "TOO_MANY_WATCHERS",
                "too many revocation watchers are connected",
                true,
            ),
            ErrorDetails::with_retry_info(Some(RETRY_DELAY)),
        ),
        SignOutError::WatchRefused(WatchRefused::ShuttingDown)
        | SignOutError::WatchEnded(WatchEnd::ShuttingDown) => (
            row(
                Code::Unavailable,
                "SHUTTING_DOWN",
                "the server is shutting down: reconnect with the last cursor",
                true,
            ),
            ErrorDetails::with_retry_info(Some(Duration::ZERO)),
        ),
        SignOutError::WatchEnded(WatchEnd::Interrupted) => (
            row(
                Code::Unavailable,
                "WATCH_INTERRUPTED",
                "the watch was interrupted: reconnect with the last cursor",
                true,
            ),
            ErrorDetails::with_retry_info(Some(Duration::ZERO)),
        ),
        SignOutError::WatchEnded(WatchEnd::LogReset) => (
            row(
                Code::Unavailable,
                "REVOCATION_LOG_RESET",
                "the revocation log was lost and is being rebuilt: reconnect with the last cursor",
                true,
            ),
            ErrorDetails::with_retry_info(Some(Duration::ZERO)),
        ),
        SignOutError::Upstream(upstream) => {
            if let Some(id) = &upstream.aws_request_id {
                metadata.insert("aws_request_id".to_owned(), id.clone());
            }
            if let Some(code) = &upstream.cognito_code {
                metadata.insert("cognito_error_code".to_owned(), code.clone());
            }
            (upstream.kind.status_row(), ErrorDetails::new())
        }
    };
    (row, details, metadata)
}

impl From<Refusal> for SignOutError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Caller(limited) => limited.into(),
            Refusal::Budget(limited) => limited.into(),
        }
    }
}

impl From<SignOutError> for Status {
    fn from(error: SignOutError) -> Self {
        let (row, mut details, metadata) = status_parts(&error);
        details.set_error_info(row.reason, ERROR_DOMAIN, metadata);
        if row.retryable && details.retry_info().is_none() {
            details.set_retry_info(Some(RETRY_DELAY));
        }
        // A field violation names the field and the rule, never the value,
        // so it is safe (and most useful) as the message itself.
        let message = match &error {
            SignOutError::InvalidField(invalid) => invalid.to_string(),
            _ => row.message.to_owned(),
        };
        Status::with_error_details(row.code, message, details)
    }
}

/// A request whose body did not end within `--request-body-timeout`: the
/// client's doing, so not a server fault (no error line an attacker could
/// repeat at will). ABORTED, because tonic reads a CANCELLED request body as
/// its plain end and would answer INTERNAL ("missing request message").
pub fn request_body_timeout(after: Duration) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info("REQUEST_BODY_TIMEOUT", ERROR_DOMAIN, HashMap::new());
    Status::with_error_details(
        Code::Aborted,
        format!("the request body did not arrive within {after:?}"),
        details,
    )
}

/// gRPC codes that are the server's or Cognito's fault, not the caller's:
/// logged at warn/error and marked as span errors. The one list of them.
pub fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Internal
            | Code::Unknown
            | Code::DataLoss
            | Code::Unavailable
            | Code::DeadlineExceeded
    )
}

/// Displays an error with every `source()` below it, `: `-separated, for logs.
pub struct ErrorChain<'a>(pub &'a (dyn StdError + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(kind: UpstreamErrorKind) -> SignOutError {
        let mut error = UpstreamError::new(kind, std::io::Error::other("boom"));
        error.aws_request_id = Some("req-1".into());
        error.cognito_code = Some("SomeException".into());
        error.into()
    }

    #[test]
    fn every_status_carries_error_info_in_our_domain() {
        let status = Status::from(upstream(UpstreamErrorKind::UserNotFound));
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.reason, "USER_NOT_FOUND");
        assert_eq!(info.metadata["aws_request_id"], "req-1");
        assert_eq!(info.metadata["cognito_error_code"], "SomeException");
        assert!(status.get_details_retry_info().is_none());
    }

    #[test]
    fn retryable_rows_carry_retry_info() {
        use UpstreamErrorKind as K;
        for kind in [
            K::Throttled,
            K::InternalError,
            K::Unreachable,
            K::BadResponse,
        ] {
            let status = Status::from(upstream(kind));
            assert!(status.get_details_retry_info().is_some(), "{kind:?}");
        }
    }

    #[test]
    fn rate_limits_carry_the_computed_retry_delay() {
        let limited = RateLimited {
            retry_after: Duration::from_millis(250),
            cause: RateLimitCause::WouldWaitTooLong,
        };
        let status = Status::from(SignOutError::from(limited));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "RATE_LIMITED");
        let retry = status.get_details_retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(250)));
    }

    #[test]
    fn messages_never_echo_the_upstream_cause() {
        let status = Status::from(upstream(UpstreamErrorKind::Unexpected));
        assert!(!status.message().contains("boom"));
    }

    #[test]
    fn invalid_fields_name_the_field_in_a_bad_request() {
        let status = Status::from(SignOutError::from(InvalidField {
            field: "username",
            description: "too long",
        }));
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad_request = status.get_details_bad_request().expect("bad request");
        assert_eq!(bad_request.field_violations[0].field, "username");
    }

    #[test]
    fn the_error_chain_shows_every_cause() {
        let slow = std::io::Error::other("slow");
        let error = SignOutError::from(UpstreamError::new(UpstreamErrorKind::Timeout, slow));
        let text = ErrorChain(&error).to_string();
        assert!(text.ends_with(": slow"), "{text}");
    }
}
