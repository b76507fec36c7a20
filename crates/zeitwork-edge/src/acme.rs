//! Certificates for custom domains: every edge loads the issued ones from the
//! operator; for verified domains without a valid certificate, the edge that
//! wins the operator's lease runs ACME (HTTP-01 or TLS-ALPN-01) and uploads
//! the result. Challenge answers go through the operator so whichever edge
//! the CA reaches can answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use zeitwork_api_types::{AcmeChallenge, CertificateLease, CertificateUpload, EdgeCertificate};

use crate::EdgeState;

/// ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How the CA is asked to check a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Challenge {
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// How often issued certificates are loaded from the operator.
const SYNC_EVERY: Duration = Duration::from_secs(15);

/// Loads issued certificates and issues missing or expiring ones, until `stop`.
pub async fn run(state: Arc<EdgeState>, mut stop: watch::Receiver<bool>) {
    let mut not_after: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
    let mut retry_at: HashMap<String, Instant> = HashMap::new();
    let mut account: Option<Account> = None;
    let mut last_sync: Option<Instant> = None;
    loop {
        // Certificates change rarely (issued or renewed by some edge); loading
        // them makes the operator decrypt every key, so not on every pass.
        if last_sync.is_none_or(|t| t.elapsed() >= SYNC_EVERY) {
            sync(&state, &mut not_after).await;
            last_sync = Some(Instant::now());
        }
        if state.config.acme_directory.is_some() {
            let due: Vec<String> = {
                let routes = state.routes.read().unwrap_or_else(|e| e.into_inner());
                let renew = chrono::Duration::days(i64::from(state.config.renew_before_days));
                routes
                    .hosts
                    .values()
                    .filter(|r| r.acme)
                    .filter(|r| not_after.get(&r.host).is_none_or(|na| *na - chrono::Utc::now() < renew))
                    .filter(|r| retry_at.get(&r.host).is_none_or(|t| *t <= Instant::now()))
                    .map(|r| r.host.clone())
                    .collect()
            };
            for domain in due {
                match issue(&state, &mut account, &domain).await {
                    Ok(Some(na)) => {
                        not_after.insert(domain.clone(), na);
                    }
                    Ok(None) => {
                        // Another edge holds the lease; look again later.
                        retry_at.insert(domain, Instant::now() + Duration::from_secs(10));
                    }
                    Err(e) => {
                        tracing::warn!(%domain, error = %e, "certificate issuance failed; retrying in a minute");
                        let up = CertificateUpload { cert_pem: None, key_pem: None, error: Some(e.clone()) };
                        let told = state
                            .operator
                            .put::<_, serde_json::Value>(&format!("/api/v1/certificates/{domain}"), &up)
                            .await;
                        if let Err(e) = told {
                            tracing::warn!(%domain, error = %e, "could not record the failed issuance with the operator");
                        }
                        retry_at.insert(domain, Instant::now() + Duration::from_secs(60));
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = zeitwork_net::stopped(&mut stop) => return,
        }
    }
}

/// Loads every issued certificate from the operator into the cert store.
async fn sync(state: &EdgeState, not_after: &mut HashMap<String, chrono::DateTime<chrono::Utc>>) {
    let certs: Vec<EdgeCertificate> = match state.operator.get("/api/v1/certificates").await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "cannot load certificates; keeping the current ones");
            return;
        }
    };
    for c in certs {
        if not_after.get(&c.domain) == Some(&c.not_after) && state.certs.has(&c.domain) {
            continue;
        }
        match certified_key(&c.cert_pem, &c.key_pem) {
            Ok(k) => {
                state.certs.insert(&c.domain, k);
                state
                    .metrics
                    .cert_expiry
                    .get_or_create(&crate::HostLabel { host: c.domain.clone() })
                    .set(c.not_after.timestamp());
                not_after.insert(c.domain.clone(), c.not_after);
                tracing::info!(domain = %c.domain, not_after = %c.not_after, "certificate loaded");
            }
            Err(e) => tracing::warn!(domain = %c.domain, error = %e, "unusable certificate"),
        }
    }
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    crate::tls::from_der(certs, key)
}

/// Runs one ACME order for `domain` if this edge gets the lease. Returns the
/// new certificate's expiry, or `None` when another edge is on it.
async fn issue(
    state: &EdgeState,
    account: &mut Option<Account>,
    domain: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    let lease = CertificateLease { holder: state.config.name.clone(), seconds: 300 };
    match state.operator.post::<_, serde_json::Value>(&format!("/api/v1/certificates/{domain}/lease"), &lease).await {
        Ok(_) => {}
        Err(e) if e.status() == Some(409) => return Ok(None),
        Err(e) => return Err(format!("lease: {e}")),
    }
    tracing::info!(%domain, "issuing a certificate");
    if account.is_none() {
        *account = Some(new_account(state).await?);
    }
    let acct = account.as_ref().ok_or("no ACME account")?;
    let ids = [Identifier::Dns(domain.to_owned())];
    let mut order = acct.new_order(&NewOrder::new(&ids)).await.map_err(|e| format!("new order: {e}"))?;
    let kind = match state.config.acme_challenge {
        Challenge::Http01 => ChallengeType::Http01,
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut tokens = Vec::new();
    let mut authzs = order.authorizations();
    while let Some(authz) = authzs.next().await {
        let mut authz = authz.map_err(|e| format!("authorization: {e}"))?;
        if authz.status != AuthorizationStatus::Pending {
            continue;
        }
        let mut challenge =
            authz.challenge(kind.clone()).ok_or_else(|| format!("the CA offers no {kind:?} challenge"))?;
        let answer = AcmeChallenge {
            token: challenge.token.clone(),
            domain: domain.to_owned(),
            key_authorization: challenge.key_authorization().as_str().to_owned(),
        };
        state
            .operator
            .put::<_, serde_json::Value>(&format!("/api/v1/acme/challenges/{}", answer.token), &answer)
            .await
            .map_err(|e| format!("publishing the challenge: {e}"))?;
        state.set_acme_answer(domain, &answer.token, Some(answer.key_authorization.clone()));
        tokens.push(answer.token);
        challenge.set_ready().await.map_err(|e| format!("challenge ready: {e}"))?;
    }
    let retry = RetryPolicy::new().timeout(Duration::from_secs(90));
    let result = async {
        let status = order.poll_ready(&retry).await.map_err(|e| format!("waiting for validation: {e}"))?;
        if status != OrderStatus::Ready {
            return Err(format!("the CA did not validate {domain} (order {status:?})"));
        }
        let key_pem = order.finalize().await.map_err(|e| format!("finalize: {e}"))?;
        let cert_pem = order.poll_certificate(&retry).await.map_err(|e| format!("certificate: {e}"))?;
        Ok((cert_pem, key_pem))
    }
    .await;
    for t in &tokens {
        state.set_acme_answer(domain, t, None);
        if let Err(e) = state.operator.delete(&format!("/api/v1/acme/challenges/{t}")).await {
            tracing::warn!(%domain, error = %e, "a used ACME challenge answer stays with the operator until it expires");
        }
    }
    let (cert_pem, key_pem) = result?;
    let key = certified_key(&cert_pem, &key_pem)?;
    let up = CertificateUpload { cert_pem: Some(cert_pem.clone()), key_pem: Some(key_pem), error: None };
    state
        .operator
        .put::<_, serde_json::Value>(&format!("/api/v1/certificates/{domain}"), &up)
        .await
        .map_err(|e| format!("storing the certificate: {e}"))?;
    state.certs.insert(domain, key);
    tracing::info!(%domain, "certificate issued");
    let not_after = zeitwork_net::x509::pem_blocks(&cert_pem, "CERTIFICATE")
        .first()
        .and_then(|der| zeitwork_net::x509::not_after(der))
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0));
    Ok(not_after)
}

async fn new_account(state: &EdgeState) -> Result<Account, String> {
    let directory = state.config.acme_directory.clone().ok_or("no ACME directory configured")?;
    let builder = match &state.config.acme_ca_root {
        Some(root) => Account::builder_with_root(root).map_err(|e| format!("ACME CA root {}: {e}", root.display()))?,
        None => Account::builder().map_err(|e| format!("ACME client: {e}"))?,
    };
    let contact: Vec<String> = state.config.acme_contact.iter().map(|c| format!("mailto:{c}")).collect();
    let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, _credentials) = builder
        .create(
            &NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false },
            directory,
            None,
        )
        .await
        .map_err(|e| format!("creating the ACME account: {e}"))?;
    Ok(account)
}

/// The one-off certificate that answers a TLS-ALPN-01 challenge for `domain`.
pub fn alpn_challenge_config(domain: &str, key_authorization: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key_authorization.as_bytes());
    let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        // Not `with_single_cert`: it refuses the critical acmeIdentifier extension the CA looks for.
        .with_cert_resolver(Arc::new(OneCert(crate::tls::from_der(vec![cert.der().clone()], der)?)));
    cfg.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct OneCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn builds_the_tls_alpn_challenge_certificate() {
        let cfg = super::alpn_challenge_config("www.example.com", "token.thumbprint").unwrap();
        assert_eq!(cfg.alpn_protocols, vec![super::ACME_TLS_ALPN.to_vec()]);
    }
}
