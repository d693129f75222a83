//! Who is calling, as far as it can be verified: the client certificate the
//! TLS handshake checked, or (only when the operator trusts a sidecar in
//! front) the certificate that sidecar reports in `x-forwarded-client-cert`.

mod caller_id;
mod xfcc;

use std::{net::SocketAddr, sync::Arc};

use tonic::metadata::MetadataMap;
use x509_parser::{extensions::GeneralName, prelude::FromDer, prelude::X509Certificate};

pub use self::{caller_id::CallerId, xfcc::MalformedXfcc};

/// Envoy's header naming the client certificate it verified.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";

/// Longest `x-forwarded-client-cert` value parsed. It can carry the URL-encoded
/// certificate (`Cert=`), a few KiB; anything longer is refused.
const MAX_XFCC_BYTES: usize = 8 * 1024;

/// What the handler can learn about a call's connection (a request
/// extension, through tonic's `Connected`, implemented by
/// [`crate::incoming::Conn`]).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The identity the client certificate names (see
    /// [`certificate_identity`]), when the client sent one; the TLS
    /// handshake already verified it against the client CA. Read once per
    /// connection, not per call.
    pub certificate_identity: Option<Arc<str>>,
    /// The connection's open calls, counted by
    /// [`crate::connections::CountOpenCallsLayer`] so that an idle
    /// connection can be told from one whose call is waiting.
    pub activity: Option<Arc<crate::connections::Activity>>,
}

/// Where a verified identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// This server's own mTLS handshake.
    ClientCertificate,
    /// A trusted sidecar's `x-forwarded-client-cert`.
    ForwardedClientCert,
}

impl IdentitySource {
    /// For logs and spans.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientCertificate => "client_certificate",
            Self::ForwardedClientCert => "forwarded_client_cert",
        }
    }
}

/// A caller identity backed by a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCaller {
    /// SPIFFE id, DNS name or CN.
    pub id: CallerId,
    /// How it was learned.
    pub source: IdentitySource,
}

/// A certificate or forwarded header that names nobody usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The trusted `x-forwarded-client-cert` header could not be parsed.
    #[error(transparent)]
    MalformedXfcc(#[from] MalformedXfcc),
    /// The certificate names an identity too long or with control characters.
    #[error("the verified identity is not a usable caller id")]
    Unusable,
}

/// The verified caller of a request, if any. A trusted forwarded header wins
/// over the connection's own certificate: behind a sidecar, that certificate
/// is the sidecar's.
pub fn verified_caller(
    peer: Option<&PeerInfo>,
    metadata: &MetadataMap,
    trust_forwarded_client_cert: bool,
) -> Result<Option<VerifiedCaller>, IdentityError> {
    if trust_forwarded_client_cert && let Some(value) = metadata.get(XFCC_HEADER) {
        let header = value.to_str().map_err(|_| MalformedXfcc)?;
        if header.len() > MAX_XFCC_BYTES {
            return Err(MalformedXfcc.into());
        }
        if let Some(id) = xfcc::identity(header)? {
            return verified(id, IdentitySource::ForwardedClientCert).map(Some);
        }
    }
    match peer.and_then(|peer| peer.certificate_identity.as_deref()) {
        Some(id) => verified(id.to_owned(), IdentitySource::ClientCertificate).map(Some),
        None => Ok(None),
    }
}

fn verified(id: String, source: IdentitySource) -> Result<VerifiedCaller, IdentityError> {
    let id = CallerId::verified(id).map_err(|_| IdentityError::Unusable)?;
    Ok(VerifiedCaller { id, source })
}

/// The identity a certificate names: its first URI SAN (a SPIFFE id), else
/// its first DNS SAN, else its subject CN.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    let uri = names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let dns = names.iter().find_map(|name| match name {
        GeneralName::DNSName(dns) => Some(*dns),
        _ => None,
    });
    let common_name = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
    };
    uri.or(dns).or_else(common_name).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::CertificateDer;

    use super::*;

    fn cert(sans: &[rcgen::SanType], cn: &str) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans.to_vec();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.self_signed(&key).expect("cert").der().clone()
    }

    fn peer(cert: CertificateDer<'static>) -> PeerInfo {
        PeerInfo {
            remote_addr: None,
            certificate_identity: certificate_identity(&cert).map(Arc::from),
            activity: None,
        }
    }

    #[test]
    fn uri_san_then_dns_san_then_common_name() {
        let uri = rcgen::SanType::URI("spiffe://prod/ns/a/sa/b".try_into().expect("ia5"));
        let dns = rcgen::SanType::DnsName("svc.example".try_into().expect("ia5"));
        let all = cert(&[dns.clone(), uri], "cn-name");
        assert_eq!(
            certificate_identity(&all).as_deref(),
            Some("spiffe://prod/ns/a/sa/b")
        );
        let dns_only = cert(&[dns], "cn-name");
        assert_eq!(
            certificate_identity(&dns_only).as_deref(),
            Some("svc.example")
        );
        let cn_only = cert(&[], "cn-name");
        assert_eq!(certificate_identity(&cn_only).as_deref(), Some("cn-name"));
        assert_eq!(certificate_identity(b"not a certificate"), None);
    }

    #[test]
    fn the_forwarded_header_counts_only_when_trusted() {
        let mut metadata = MetadataMap::new();
        metadata.insert(
            XFCC_HEADER,
            "URI=spiffe://mesh/ns/x/sa/y".parse().expect("ascii"),
        );
        let tls_peer = peer(cert(&[], "sidecar"));

        let untrusted = verified_caller(Some(&tls_peer), &metadata, false).expect("ok");
        assert_eq!(
            untrusted.map(|c| c.id.as_str().to_owned()).as_deref(),
            Some("sidecar")
        );
        assert_eq!(verified_caller(None, &metadata, false), Ok(None));

        let trusted = verified_caller(Some(&tls_peer), &metadata, true)
            .expect("ok")
            .expect("identity");
        assert_eq!(trusted.id.as_str(), "spiffe://mesh/ns/x/sa/y");
        assert_eq!(trusted.source, IdentitySource::ForwardedClientCert);
    }

    #[test]
    fn an_oversized_or_broken_forwarded_header_is_refused() {
        let mut metadata = MetadataMap::new();
        let long = format!("URI={}", "a".repeat(MAX_XFCC_BYTES));
        metadata.insert(XFCC_HEADER, long.parse().expect("ascii"));
        assert!(verified_caller(None, &metadata, true).is_err());
        metadata.insert(XFCC_HEADER, "URI=\"open".parse().expect("ascii"));
        assert!(verified_caller(None, &metadata, true).is_err());
    }
}
