//! TLS and mTLS server configuration from PEM files, swapped in place when
//! the files change (see `reload.rs`). Each accepted connection takes the
//! configuration current at that moment; established connections keep the
//! one they were accepted with.

use std::{
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

/// The PEM files behind a TLS configuration.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain, leaf first.
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to; `None` is TLS
    /// without client authentication.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files in the order [`server_config`] takes their contents.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }
}

/// Builds a server configuration from the contents of [`TlsFiles::paths`]:
/// certificate chain, key, and optionally the client CA bundle.
pub fn server_config(contents: &[Vec<u8>]) -> Result<Arc<ServerConfig>, String> {
    let [cert, key, client_ca @ ..] = contents else {
        return Err("a certificate and a key are required".into());
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("certificate: no CERTIFICATE block in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("private key: {e}"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca.first() {
        None => builder.with_no_client_auth(),
        Some(bundle) => builder.with_client_cert_verifier(client_verifier(bundle, provider)?),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    // gRPC is HTTP/2 only; clients such as grpc-go insist on the ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn client_verifier(
    bundle: &[u8],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        let cert = cert.map_err(|e| format!("client CA: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("client CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("client CA: no CERTIFICATE block in the file".into());
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("client CA: {e}"))
}

/// The configuration new connections get; replaced on reload.
#[derive(Debug)]
pub struct CurrentTlsConfig(RwLock<Arc<ServerConfig>>);

impl CurrentTlsConfig {
    /// Starts with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self(RwLock::new(config))
    }

    /// The configuration for a connection accepted now.
    pub fn get(&self) -> Arc<ServerConfig> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the configuration for connections accepted from now on.
    pub fn set(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = config;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_pem_is_refused_with_the_part_named() {
        let garbage = b"not pem".to_vec();
        let error = server_config(&[garbage.clone(), garbage.clone()]).expect_err("no cert");
        assert!(error.starts_with("certificate"), "{error}");
        assert!(server_config(&[garbage]).is_err(), "key missing");
    }
}
