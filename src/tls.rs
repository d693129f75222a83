//! TLS and mTLS server configuration from PEM files, swapped in place when
//! the files change (see `reload.rs`). Each accepted connection takes the
//! configuration current at that moment; established connections keep the
//! one they were accepted with.

use std::{path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{
        CertificateDer, PrivateKeyDer,
        pem::{self, PemObject},
    },
    server::{VerifierBuilderError, WebPkiClientVerifier},
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

/// The configuration new connections get; replaced on reload.
pub type CurrentTlsConfig = ArcSwap<ServerConfig>;

/// Why PEM contents do not make a server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Fewer than two files' contents.
    #[error("a certificate and a key are required")]
    MissingFiles,
    /// The certificate file is not PEM.
    #[error("certificate: {0}")]
    Certificate(#[source] pem::Error),
    /// The certificate file holds no certificate.
    #[error("certificate: no CERTIFICATE block in the file")]
    NoCertificate,
    /// The key file holds no usable private key.
    #[error("private key: {0}")]
    PrivateKey(#[source] pem::Error),
    /// The crypto provider offers no safe protocol version.
    #[error("{0}")]
    Protocols(#[source] rustls::Error),
    /// The key does not fit the certificate, or rustls refuses the pair.
    #[error("certificate and key: {0}")]
    CertificateAndKey(#[source] rustls::Error),
    /// The client CA file is not PEM.
    #[error("client CA: {0}")]
    ClientCaPem(#[source] pem::Error),
    /// A client CA certificate cannot be a trust anchor.
    #[error("client CA certificate: {0}")]
    ClientCaCertificate(#[source] rustls::Error),
    /// The client CA file holds no certificate.
    #[error("client CA: no CERTIFICATE block in the file")]
    NoClientCa,
    /// rustls cannot build a client verifier from the CA bundle.
    #[error("client CA: {0}")]
    ClientVerifier(#[source] VerifierBuilderError),
}

/// Builds a server configuration from the contents of [`TlsFiles::paths`]:
/// certificate chain, key, and optionally the client CA bundle.
pub fn server_config(contents: &[Vec<u8>]) -> Result<Arc<ServerConfig>, TlsError> {
    let [cert, key, client_ca @ ..] = contents else {
        return Err(TlsError::MissingFiles);
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsError::Certificate)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(TlsError::PrivateKey)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?;
    let builder = match client_ca.first() {
        None => builder.with_no_client_auth(),
        Some(bundle) => builder.with_client_cert_verifier(client_verifier(bundle, provider)?),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::CertificateAndKey)?;
    // gRPC is HTTP/2 only; clients such as grpc-go insist on the ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn client_verifier(
    bundle: &[u8],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        let cert = cert.map_err(TlsError::ClientCaPem)?;
        roots.add(cert).map_err(TlsError::ClientCaCertificate)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoClientCa);
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(TlsError::ClientVerifier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_pem_is_refused_with_the_part_named() {
        let garbage = b"not pem".to_vec();
        let error = server_config(&[garbage.clone(), garbage.clone()])
            .expect_err("no cert")
            .to_string();
        assert!(error.starts_with("certificate"), "{error}");
        assert!(server_config(&[garbage]).is_err(), "key missing");
    }
}
