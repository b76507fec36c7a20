//! TLS: certificates chosen by SNI and swapped while serving. A name with no
//! certificate of its own gets no certificate at all (the handshake fails),
//! never another tenant's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {message}")]
    Cert { path: String, message: String },
    #[error("cannot read private key file {path}: {message}")]
    Key { path: String, message: String },
}

/// Loads a PEM chain and key into a signing-ready certificate.
pub fn load_pem(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert { path: cert.display().to_string(), message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Cert { path: cert.display().to_string(), message: "no certificate in the file".into() });
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Key { path: key.display().to_string(), message: e.to_string() })?;
    from_der(certs, der).map_err(|message| TlsError::Key { path: key.display().to_string(), message })
}

pub fn from_der(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Arc<CertifiedKey>, String> {
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("unsupported private key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

/// Certificates by name: exact names (custom domains) and one wildcard for
/// the apps domain.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// (apps domain, certificate for `*.<apps domain>`)
    wildcard: RwLock<Option<(String, Arc<CertifiedKey>)>>,
}

impl CertStore {
    pub fn set_wildcard(&self, apps_domain: &str, key: Arc<CertifiedKey>) {
        *self.wildcard.write().unwrap_or_else(|e| e.into_inner()) = Some((apps_domain.to_ascii_lowercase(), key));
    }

    pub fn insert(&self, name: &str, key: Arc<CertifiedKey>) {
        self.exact.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_ascii_lowercase(), key);
    }

    pub fn remove(&self, name: &str) {
        self.exact.write().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    pub fn has(&self, name: &str) -> bool {
        self.lookup(name).is_some()
    }

    pub fn lookup(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.read().unwrap_or_else(|e| e.into_inner()).get(&name) {
            return Some(k.clone());
        }
        let wildcard = self.wildcard.read().unwrap_or_else(|e| e.into_inner());
        let (apps, key) = wildcard.as_ref()?;
        // A wildcard covers exactly one label.
        let label = name.strip_suffix(apps.as_str())?.strip_suffix('.')?;
        (!label.is_empty() && !label.contains('.')).then(|| key.clone())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name()?)
    }
}

/// A TLS server config that serves `certs`, offering HTTP/2 and HTTP/1.1.
pub fn server_config(certs: Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Watches a certificate/key pair on disk and swaps it in when it changes.
pub async fn watch_files(
    certs: Arc<CertStore>,
    apps_domain: String,
    cert: PathBuf,
    key: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = (mtime(&cert), mtime(&key));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = (mtime(&cert), mtime(&key));
        if now != seen {
            match load_pem(&cert, &key) {
                Ok(k) => {
                    certs.set_wildcard(&apps_domain, k);
                    tracing::info!(cert = %cert.display(), "reloaded the apps domain certificate");
                    seen = now;
                }
                Err(e) => tracing::warn!(error = %e, "keeping the previous certificate"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Arc<CertifiedKey> {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        from_der(vec![c.cert.der().clone()], PrivateKeyDer::try_from(c.signing_key.serialize_der()).unwrap()).unwrap()
    }

    #[test]
    fn wildcard_covers_one_label_and_exact_names_win() {
        let s = CertStore::default();
        s.set_wildcard("apps.test", key("*.apps.test"));
        assert!(s.has("web-abc-acme.apps.test"));
        assert!(s.has("WEB.apps.test."));
        assert!(!s.has("a.b.apps.test"));
        assert!(!s.has("apps.test"));
        assert!(!s.has("evilapps.test"));
        assert!(!s.has("www.example.com"), "no certificate for names nobody configured");
        let own = key("www.example.com");
        s.insert("www.example.com", own.clone());
        assert!(Arc::ptr_eq(&s.lookup("www.example.com").unwrap(), &own));
    }
}
