//! session-service: a gRPC facade that signs a user out of every device
//! through Amazon Cognito AdminUserGlobalSignOut.
//!
//! [`startup`] is the composition root: it builds every part and serves.
//! The request path, in order: [`incoming`] (accept, under the bounds of
//! [`connections`]), [`request_guard`] (gRPC only, body deadline) and
//! [`startup`] (transport, health, reflection) → [`service`] (handler) → [`domain`] (validation) →
//! [`pools`] (which pool) → [`users`] (the user's sub, via AdminGetUser) →
//! [`limiter`] (per-caller limits) → [`signout`]
//! (coalesced jobs, shared budget, retries, audit) → [`cognito`] (the SDK
//! call) → [`error`] (the status table). VerifyToken takes the same path to
//! the pool, then [`tokens`] (JWKS cache and checks) instead of the flow.
//! Who is calling: [`identity`] owns the caller (its id, the connection's
//! peer, certificate and XFCC identities) and depends on none of the
//! others; [`incoming`] (TLS accept, with [`tls`]) fills in its `PeerInfo`,
//! [`authz`] (the policy) judges it; [`reload`] keeps certificates and
//! policy current.

pub mod authz;
pub mod cognito;
pub mod config;
pub mod connections;
pub mod deadline;
pub mod domain;
pub mod error;
pub mod identity;
pub mod incoming;
pub mod limiter;
pub mod metrics;
pub mod pools;
pub mod redis;
pub mod reload;
pub mod request_guard;
pub mod revocation;
pub mod service;
pub mod signout;
pub mod startup;
pub mod telemetry;
#[cfg(test)]
mod test_redis;
pub mod tls;
pub mod tokens;
pub mod users;

/// Code generated from `proto/session/v1/session.proto`.
#[allow(clippy::all, clippy::pedantic, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("session.v1");

    /// Encoded descriptors of our protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/session_descriptor.bin"));
}
