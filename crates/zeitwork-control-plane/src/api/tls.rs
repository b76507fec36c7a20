//! Custom domain verification, certificates and ACME challenges. Edges run
//! ACME; the operator keeps certificates (keys encrypted) so every edge
//! serves them, hands out one issuance lease per domain, and keeps challenge
//! answers so any edge can answer the CA.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use zeitwork_api_types::validate::ValidationError;
use zeitwork_api_types::{
    AcmeChallenge, CertificateLease, CertificateUpload, ClusterRole, Domain, EdgeCertificate, Role, VerifyDomain,
};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use crate::AppState;
use zeitwork_net::x509 as certs;

const EDGE: &[ClusterRole] = &[ClusterRole::EdgeProxy];

fn cert_context(domain: &str) -> String {
    format!("cert:{domain}")
}

/// Mark a custom domain verified, so it is routed and gets a certificate: its
/// `_zeitwork-challenge` TXT record holds the value given when it was added, and
/// it points at the platform (a CNAME to the project's address, or an address in
/// `public_addresses`). A platform admin may skip both with `{"force": true}`.
/// Other organisations' unverified claims of the name are removed; 409 when
/// another project verified it first.
#[utoipa::path(post, path = "/api/v1/projects/{org}/{project}/domains/{name}/verify", tag = "domains",
    params(("org" = String, Path), ("project" = String, Path), ("name" = String, Path)), request_body = VerifyDomain,
    responses((status = 200, body = Domain), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn verify_domain(
    State(s): State<AppState>,
    caller: Caller,
    Path((org, name, domain)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Domain>> {
    s.require_role(&caller, &org, Role::Developer, "domain.verify", &domain).await?;
    let req: VerifyDomain = if body.is_empty() { VerifyDomain::default() } else { crate::extract::parse_json(&body)? };
    let p = s.store.get_project(&org, &name).await?;
    super::projects::expire_domain_claims(&s).await?;
    let Some(known) = s.store.list_domains(&p.id).await?.into_iter().find(|d| d.name == domain) else {
        return Err(ApiError::NotFound(format!("domain {domain:?} is not registered to {org}/{name}")));
    };
    if req.force {
        s.require_admin(&caller, "domain.verify", &domain).await?;
    } else {
        prove_ownership(&s, &known, &format!("{name}-{org}.{}", s.config.apps_domain)).await?;
    }
    s.store.verify_domain(&p.id, &domain, &caller.audit("domain.verify", &domain).org(&org).project(&name)).await?;
    s.routing.changed();
    let d = s.store.list_domains(&p.id).await?.into_iter().find(|d| d.name == domain);
    d.map(Json).ok_or_else(|| ApiError::NotFound(format!("domain {domain:?} vanished")))
}

/// The ownership TXT record first, then where the domain points; a 409 that says
/// what to fix when either is not there yet.
async fn prove_ownership(s: &AppState, d: &Domain, project_host: &str) -> ApiResult<()> {
    use hickory_proto::rr::RecordType;
    let server = crate::dns::resolver(s.config.dns_resolver).map_err(|e| ApiError::Conflict(e.to_string()))?;
    let dns_failed = |e: crate::dns::DnsError| ApiError::Conflict(format!("cannot verify {} yet: {e}", d.name));
    if let (Some(record), Some(value)) = (&d.txt_record, &d.txt_value) {
        let found = crate::dns::lookup(server, record, &[RecordType::TXT]).await.map_err(dns_failed)?;
        if !found.txt.iter().any(|t| t.trim() == value) {
            return Err(ApiError::Conflict(format!(
                "ownership of {} is not proven: add a TXT record {record} with the value {value} (found: [{}])",
                d.name,
                found.txt.join(", ")
            )));
        }
    }
    let found = crate::dns::lookup(server, &d.name, &[RecordType::A, RecordType::AAAA]).await.map_err(dns_failed)?;
    let expected = &s.config.public_addresses;
    let to_us =
        found.cnames.iter().any(|c| c == project_host) || found.addresses.iter().any(|ip| expected.contains(ip));
    if !to_us {
        let mut seen: Vec<String> = found.cnames.iter().map(|c| format!("CNAME {c}")).collect();
        seen.extend(found.addresses.iter().map(ToString::to_string));
        return Err(ApiError::Conflict(format!(
            "{} points at [{}], not at the platform; add a CNAME to {project_host}{}",
            d.name,
            seen.join(", "),
            if expected.is_empty() {
                String::new()
            } else {
                format!(
                    " or an A/AAAA record for {}",
                    expected.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                )
            }
        )));
    }
    Ok(())
}

/// Issued certificates with their keys (edge proxies only).
#[utoipa::path(get, path = "/api/v1/certificates", tag = "certificates", responses((status = 200, body = Vec<EdgeCertificate>)))]
pub async fn list_certificates(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<EdgeCertificate>>> {
    s.require_cluster(&caller, EDGE, "certificate.list", "certificates").await?;
    let mut out = Vec::new();
    for c in s.store.list_certificates().await? {
        let (Some(cert_pem), Some(key_enc), Some(not_after)) = (c.cert_pem, c.key_enc, c.not_after) else { continue };
        match s.cipher.decrypt(&cert_context(&c.domain), &key_enc) {
            Ok(key_pem) => out.push(EdgeCertificate { domain: c.domain, cert_pem, key_pem, not_after }),
            Err(e) => tracing::error!(domain = %c.domain, error = %e, "cannot decrypt a certificate key"),
        }
    }
    Ok(Json(out))
}

async fn require_acme_domain(s: &AppState, domain: &str) -> ApiResult<()> {
    if s.store.domain_is_verified(domain).await? {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "{domain:?} is not a verified custom domain; certificates are issued only for those"
        )))
    }
}

/// Take the issuance lease of a domain: one edge at a time issues or renews.
#[utoipa::path(post, path = "/api/v1/certificates/{domain}/lease", tag = "certificates", params(("domain" = String, Path)),
    request_body = CertificateLease, responses((status = 204), (status = 409, body = zeitwork_api_types::ApiError)))]
pub async fn lease_certificate(
    State(s): State<AppState>,
    caller: Caller,
    Path(domain): Path<String>,
    JsonBody(lease): JsonBody<CertificateLease>,
) -> ApiResult<StatusCode> {
    s.require_cluster(&caller, EDGE, "certificate.lease", &domain).await?;
    zeitwork_api_types::validate::text("holder", &lease.holder, 128)?;
    if !(10..=600).contains(&lease.seconds) {
        return Err(ValidationError::new("seconds", "use 10 to 600").into());
    }
    require_acme_domain(&s, &domain).await?;
    let until = chrono::Utc::now().timestamp_millis() + i64::from(lease.seconds) * 1000;
    if s.store.lease_certificate(&domain, &lease.holder, until).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::Conflict(format!("another edge is issuing the certificate of {domain}")))
    }
}

/// Store an issued certificate, or record why issuance failed.
#[utoipa::path(put, path = "/api/v1/certificates/{domain}", tag = "certificates", params(("domain" = String, Path)),
    request_body = CertificateUpload, responses((status = 204), (status = 400, body = zeitwork_api_types::ApiError)))]
pub async fn put_certificate(
    State(s): State<AppState>,
    caller: Caller,
    Path(domain): Path<String>,
    JsonBody(up): JsonBody<CertificateUpload>,
) -> ApiResult<StatusCode> {
    s.require_cluster(&caller, EDGE, "certificate.store", &domain).await?;
    require_acme_domain(&s, &domain).await?;
    // Told to the domain's project (its notification channels hear of it).
    let owner = s.store.domain_owner(&domain).await?;
    let owned = |action: &str| {
        let a = caller.audit(action, &domain);
        match &owner {
            Some((org, project)) => a.org(org).project(project),
            None => a,
        }
    };
    match (up.cert_pem, up.key_pem, up.error) {
        (Some(cert), Some(key), None) => {
            let der = certs::pem_blocks(&cert, "CERTIFICATE");
            let leaf = der.first().ok_or_else(|| ValidationError::new("cert_pem", "no PEM CERTIFICATE block"))?;
            let not_after = certs::not_after(leaf)
                .ok_or_else(|| ValidationError::new("cert_pem", "the certificate's validity cannot be read"))?;
            if ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"]
                .iter()
                .all(|l| certs::pem_blocks(&key, l).is_empty())
            {
                return Err(ValidationError::new("key_pem", "no PEM PRIVATE KEY block").into());
            }
            let enc = s.cipher.encrypt(&cert_context(&domain), &key);
            let audit = owned("certificate.issue").detail(serde_json::json!({"not_after": not_after}));
            s.store.store_certificate(&domain, &cert, &enc, not_after * 1000, &audit).await?;
        }
        (None, None, Some(error)) => {
            zeitwork_api_types::validate::text("error", &error, 2000)?;
            s.store
                .certificate_failed(
                    &domain,
                    &error,
                    &owned("certificate.fail").detail(serde_json::json!({"error": error})),
                )
                .await?;
        }
        _ => return Err(ValidationError::new("cert_pem", "send cert_pem and key_pem, or error").into()),
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Publish an ACME challenge answer so every edge can serve it.
#[utoipa::path(put, path = "/api/v1/acme/challenges/{token}", tag = "certificates", params(("token" = String, Path)),
    request_body = AcmeChallenge, responses((status = 204)))]
pub async fn put_challenge(
    State(s): State<AppState>,
    caller: Caller,
    Path(token): Path<String>,
    JsonBody(c): JsonBody<AcmeChallenge>,
) -> ApiResult<StatusCode> {
    s.require_cluster(&caller, EDGE, "acme.challenge", &c.domain).await?;
    if c.token != token
        || token.is_empty()
        || token.len() > 256
        || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
    {
        return Err(ValidationError::new("token", "must match the path and be base64url").into());
    }
    require_acme_domain(&s, &c.domain).await?;
    s.store.put_challenge(&token, &c.domain, &c.key_authorization).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove an ACME challenge answer.
#[utoipa::path(delete, path = "/api/v1/acme/challenges/{token}", tag = "certificates", params(("token" = String, Path)),
    responses((status = 204)))]
pub async fn delete_challenge(
    State(s): State<AppState>,
    caller: Caller,
    Path(token): Path<String>,
) -> ApiResult<StatusCode> {
    s.require_cluster(&caller, EDGE, "acme.challenge", &token).await?;
    s.store.delete_challenge(&token).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ChallengeQuery {
    /// HTTP-01: the token in the request path.
    token: Option<String>,
    /// TLS-ALPN-01: the name in the SNI.
    domain: Option<String>,
}

/// Look up a challenge answer by token or by domain.
#[utoipa::path(get, path = "/api/v1/acme/challenges", tag = "certificates", params(ChallengeQuery),
    responses((status = 200, body = AcmeChallenge), (status = 404, body = zeitwork_api_types::ApiError)))]
pub async fn find_challenge(
    State(s): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<ChallengeQuery>,
) -> ApiResult<Json<AcmeChallenge>> {
    s.require_cluster(&caller, EDGE, "acme.challenge", "lookup").await?;
    if q.token.is_none() && q.domain.is_none() {
        return Err(ApiError::InvalidQuery("give token or domain".into()));
    }
    match s.store.find_challenge(q.token.as_deref(), q.domain.as_deref()).await? {
        Some((token, domain, key_authorization)) => Ok(Json(AcmeChallenge { token, domain, key_authorization })),
        None => Err(ApiError::NotFound("no such challenge".into())),
    }
}
