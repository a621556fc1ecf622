//! HTTPS: the rustls acceptor built from `server.tls`'s PEM certificate chain and key.
//! Reading them at start means a wrong path or a key that does not match its certificate
//! stops the start with a message, instead of failing every handshake later.

use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The acceptor for `cfg`, offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn acceptor(cfg: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .with_context(|| format!("server.tls.cert: cannot read {}", cfg.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("server.tls.cert: {} is not PEM", cfg.cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "server.tls.cert: {} holds no certificate",
        cfg.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&cfg.key).with_context(|| {
        format!(
            "server.tls.key: cannot read a PEM private key from {}",
            cfg.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("server.tls: the key does not match the certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_pairs_load_and_mismatches_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let cert = write("a.pem", a.cert.pem());
        let key = write("a.key", a.signing_key.serialize_pem());
        let other_key = write("b.key", b.signing_key.serialize_pem());
        assert!(acceptor(&TlsConfig {
            cert: cert.clone(),
            key: key.clone()
        })
        .is_ok());
        let err = acceptor(&TlsConfig {
            cert: cert.clone(),
            key: other_key,
        })
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("does not match"), "{err:#}");
        let err = acceptor(&TlsConfig {
            cert: key.clone(),
            key: key.clone(),
        })
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("no certificate"), "{err:#}");
        let err = acceptor(&TlsConfig {
            cert: dir.path().join("missing.pem"),
            key,
        })
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("cannot read"), "{err:#}");
    }
}
