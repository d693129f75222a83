//! Black-box tests, one binary: the real server on port 0 (or the real
//! binary), the generated client, Cognito faked over HTTP or played by moto,
//! and the rendered deploy manifests.

mod cancellation;
mod cli;
mod connection_age;
mod deploy;
mod drain;
mod fake_cognito;
mod fleet_budget;
mod grpcurl;
mod helpers;
mod hostile;
mod jwks_server;
mod lifecycle;
mod monitoring;
mod moto;
mod moto_tokens;
mod mtls;
mod observability;
mod pki;
mod rate_limit;
mod redis_failures;
mod redis_server;
mod revocation;
mod revocation_fleet;
mod revocation_moto;
mod stalled_stdout;
mod status_mapping;
mod tls_probe;
mod tools;
mod user_lookup;
mod validation;
mod verify_token;
mod watch;
