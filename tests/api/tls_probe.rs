//! A bare TLS client (no HTTP/2) that reports which certificate the server
//! presents to a new connection.

use std::{net::SocketAddr, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::pki::{Leaf, TestCa};

pub(crate) struct TlsProbe {
    connector: TlsConnector,
}

impl TlsProbe {
    /// Trusts `ca` and presents `client`, if any.
    pub(crate) fn new(ca: &TestCa, client: Option<&Leaf>) -> Self {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).expect("CA PEM"))
            .expect("CA root");
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some(client) => builder
                .with_client_auth_cert(
                    vec![Self::der(client)],
                    PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).expect("key PEM"),
                )
                .expect("client auth"),
        };
        Self {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    /// The leaf certificate the server presents on a new connection.
    pub(crate) async fn server_leaf(&self, addr: SocketAddr) -> CertificateDer<'static> {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("server name");
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let (_, session) = tls.get_ref();
        session.peer_certificates().expect("server certificates")[0].clone()
    }

    /// How the server ends a handshake it refuses. In TLS 1.3 the client
    /// finishes first, so the server's alert arrives on the first read.
    pub(crate) async fn refusal(&self, addr: SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("server name");
        let mut tls = match self.connector.connect(name, tcp).await {
            Ok(tls) => tls,
            Err(error) => return error.to_string(),
        };
        let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let mut byte = [0u8; 1];
        match tls.read(&mut byte).await {
            Err(error) => error.to_string(),
            Ok(n) => panic!("the server accepted the connection (read {n} bytes)"),
        }
    }

    /// `leaf`'s certificate, DER.
    pub(crate) fn leaf_der(&self, leaf: &Leaf) -> CertificateDer<'static> {
        Self::der(leaf)
    }

    fn der(leaf: &Leaf) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("certificate PEM")
    }
}
