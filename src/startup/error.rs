//! Why the server could not start, and the exit code each reason gets.

use std::net::SocketAddr;

use crate::{
    authz::PolicyError, connections::FdLimitTooLow, pools::DefaultPoolNotAllowed,
    reload::ReadError, telemetry::HashKeyError, tls::TlsError,
};

/// Why the server could not start. Each maps to a process exit code.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Flags that are valid one by one but not together.
    #[error(transparent)]
    Config(#[from] DefaultPoolNotAllowed),
    /// The AWS chain gave no region, so there is no Cognito endpoint.
    #[error("no AWS region configured: set AWS_REGION (or a profile with a region)")]
    NoRegion,
    /// The user-hash key file could not be read, or is empty.
    #[error("--log-user-hash-key-file {path}: {source}")]
    HashKeyFile {
        /// The file named by the flag.
        path: String,
        /// What went wrong.
        source: HashKeyError,
    },
    /// The TLS certificate, key or client CA cannot be read.
    #[error("TLS: {0}")]
    TlsFiles(#[source] ReadError),
    /// The TLS certificate, key or client CA cannot be used.
    #[error("TLS: {0}")]
    Tls(#[source] TlsError),
    /// The authorization policy cannot be read.
    #[error("--authz-policy {path}: {source}")]
    PolicyFile {
        /// The file named by the flag.
        path: String,
        /// What the OS said.
        source: ReadError,
    },
    /// The authorization policy is invalid.
    #[error("--authz-policy {path}: {source}")]
    Policy {
        /// The file named by the flag.
        path: String,
        /// What is wrong with it.
        source: PolicyError,
    },
    /// A policy is set but no caller could ever be verified, so it would
    /// refuse every call.
    #[error(
        "--authz-policy needs verified callers: set --tls-client-ca (mTLS) or --trust-forwarded-client-cert (a mesh sidecar)"
    )]
    PolicyWithoutIdentity,
    /// The open-files limit cannot hold the connection budgets.
    #[error(transparent)]
    FdLimit(#[from] FdLimitTooLow),
    /// The Redis settings cannot be used (the URL, a password or CA file).
    #[error(transparent)]
    Redis(#[from] crate::redis::RedisSetupError),
    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from `--listen`.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The JWKS client has no root certificates to trust.
    #[error(transparent)]
    JwksClient(#[from] crate::tokens::http::NoRootCertificates),
    /// The token or user lookup metrics could not be registered (a build
    /// problem).
    #[error("metrics: {0}")]
    TokenMetrics(#[from] prometheus::Error),
    /// The embedded descriptor sets did not load (a build problem).
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server itself failed while serving.
    #[error("serving: {0}")]
    Serve(#[source] tonic::transport::Error),
}

impl StartupError {
    /// 64 (EX_USAGE) for configuration mistakes, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::NoRegion
            | Self::HashKeyFile { .. }
            | Self::TlsFiles(_)
            | Self::Tls(_)
            | Self::PolicyFile { .. }
            | Self::Policy { .. }
            | Self::PolicyWithoutIdentity
            | Self::FdLimit(_)
            | Self::Redis(_) => 64,
            Self::Bind { .. }
            | Self::JwksClient(_)
            | Self::TokenMetrics(_)
            | Self::Reflection(_)
            | Self::Serve(_) => 1,
        }
    }
}
