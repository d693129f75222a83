//! Black-box tests: the real server on port 0, the generated client, and
//! Cognito faked over HTTP or played by moto.

mod connection_age;
mod drain;
mod fake_cognito;
mod grpcurl;
mod helpers;
mod lifecycle;
mod moto;
mod rate_limit;
mod status_mapping;
mod tools;
mod validation;
