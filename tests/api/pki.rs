//! A throwaway PKI for the TLS tests: CAs, server and client certificates
//! made in the test, written to files the server reads.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub(crate) struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub(crate) struct Leaf {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// For `localhost` and 127.0.0.1; `cn` tells two of them apart.
    pub(crate) fn server(&self, cn: &str) -> Leaf {
        let sans = vec![
            SanType::DnsName("localhost".try_into().expect("ia5")),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        self.leaf(sans, cn, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose identity is the URI SAN `spiffe_id`.
    pub(crate) fn spiffe_client(&self, spiffe_id: &str) -> Leaf {
        let uri = SanType::URI(spiffe_id.try_into().expect("ia5"));
        self.leaf(vec![uri], "client", ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, sans: Vec<SanType>, cn: &str, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// The server's files in `dir`: cert.pem, key.pem and client-ca.pem.
pub(crate) struct ServerFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) client_ca: PathBuf,
}

impl ServerFiles {
    pub(crate) fn write(dir: &Path, server: &Leaf, client_ca: &TestCa) -> Self {
        let files = Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: dir.join("client-ca.pem"),
        };
        files.install(server);
        std::fs::write(&files.client_ca, client_ca.pem()).expect("write client CA");
        files
    }

    /// Replaces certificate and key the way a rotation does: each file is
    /// written aside and renamed into place.
    pub(crate) fn install(&self, server: &Leaf) {
        for (path, pem) in [(&self.cert, &server.cert_pem), (&self.key, &server.key_pem)] {
            let aside = path.with_extension("new");
            std::fs::write(&aside, pem).expect("write PEM");
            std::fs::rename(&aside, path).expect("rename into place");
        }
    }
}
