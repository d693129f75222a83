//! Transport security, caller identity, authorization and connection bounds.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use super::parse_duration;
use crate::tls::TlsFiles;

/// Flags about who may connect and what a connection may cost.
#[derive(Debug, Clone, Args)]
pub struct SecurityConfig {
    /// PEM certificate chain of the server (leaf first). With --tls-key, the
    /// server speaks TLS only. Reloaded when the file changes.
    #[arg(
        long,
        env = "SESSION_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert. Reloaded when the file changes.
    #[arg(
        long,
        env = "SESSION_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// PEM bundle of the CAs that client certificates must chain to. Turns on
    /// mTLS: clients without a valid certificate fail the handshake, and the
    /// certificate (URI SAN, else DNS SAN, else CN) is the caller's identity.
    #[arg(
        long,
        env = "SESSION_TLS_CLIENT_CA",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Time a new connection has to complete its TLS handshake.
    #[arg(long, env = "SESSION_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Take the caller's identity from Envoy's x-forwarded-client-cert header.
    /// Only behind a sidecar that terminates mTLS and overwrites the header,
    /// and only if nothing else can reach this port: anyone who can may
    /// claim any identity.
    #[arg(long, env = "SESSION_TRUST_FORWARDED_CLIENT_CERT")]
    pub trust_forwarded_client_cert: bool,

    /// Authorization policy (TOML or YAML, by extension): rules of caller
    /// identity (exact, or prefix ending in *) and the pool ids it may act on.
    /// When set, every other caller is refused (PERMISSION_DENIED). Reloaded
    /// when the file changes; an invalid new version is logged and ignored.
    #[arg(long, env = "SESSION_AUTHZ_POLICY", value_name = "FILE")]
    pub authz_policy: Option<PathBuf>,

    /// How often certificate and policy files are checked for changes.
    #[arg(long, env = "SESSION_RELOAD_INTERVAL", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// HTTP/2 streams (calls) one connection may have open at once.
    #[arg(long, env = "SESSION_MAX_CONCURRENT_STREAMS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Largest header block (all metadata of one call) accepted, in bytes.
    #[arg(long, env = "SESSION_MAX_HEADER_LIST_SIZE", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_header_list_size: u32,

    /// Optional plaintext listener serving only grpc.health.v1, for kubelet
    /// gRPC probes, which cannot speak TLS.
    #[arg(long, env = "SESSION_HEALTH_LISTEN", value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,
}

impl SecurityConfig {
    /// The TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}
