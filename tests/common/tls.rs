//! A private certificate authority and a server certificate it signed, for HTTPS tests, and
//! rustls client settings that trust it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;

/// PEM files of a private CA and of a `localhost` / `127.0.0.1` certificate it signed.
pub struct PrivateCa {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl PrivateCa {
    /// Writes a new CA, certificate and key into `dir`.
    pub fn new(dir: &Path) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params.is_ca = rcgen::IsCa::NoCa;
        let cert = params.signed_by(&key, &issuer).unwrap();
        let me = Self {
            ca_pem: dir.join("ca.pem"),
            cert_pem: dir.join("cert.pem"),
            key_pem: dir.join("key.pem"),
        };
        std::fs::write(&me.ca_pem, ca.pem()).unwrap();
        std::fs::write(&me.cert_pem, cert.pem()).unwrap();
        std::fs::write(&me.key_pem, key.serialize_pem()).unwrap();
        me
    }

    /// The server flags that serve HTTPS with this certificate.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert_pem.display().to_string(),
            "--tls-key".into(),
            self.key_pem.display().to_string(),
        ]
    }

    /// A reqwest client that trusts the CA.
    pub fn reqwest(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.ca_pem).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }

    /// A raw TLS connector that trusts the CA and offers these ALPN protocols.
    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(&self.ca_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}
