//! Custom domains and their certificates.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[allow(unused_imports)]
use crate::*;

// ---------------------------------------------------------------- domains

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Domain {
    pub name: String,
    pub org: String,
    pub project: String,
    pub environment: Environment,
    pub verified: bool,
    /// `none`, `pending`, `issued`, `failed`.
    pub certificate: String,
    pub created_at: DateTime<Utc>,
    /// `verified` (routed, certificates issued) or `unverified` (not routed yet).
    #[serde(default)]
    pub status: String,
    /// The TXT record that proves ownership: `_zeitwork-challenge.<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txt_record: Option<String>,
    /// The value that TXT record must hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txt_value: Option<String>,
    /// What to do next while the domain is unverified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The DNS name whose TXT record proves that whoever added `domain` controls it.
pub fn domain_challenge_record(domain: &str) -> String {
    format!("_zeitwork-challenge.{domain}")
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDomain {
    pub name: String,
    #[serde(default)]
    pub environment: Option<Environment>,
}

// ---------------------------------------------------------------- certificates

/// A certificate with its private key, for edge proxies only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EdgeCertificate {
    pub domain: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: DateTime<Utc>,
}

/// An issued certificate (or why issuance failed) reported by an edge.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateUpload {
    #[serde(default)]
    pub cert_pem: Option<String>,
    #[serde(default)]
    pub key_pem: Option<String>,
    /// Set instead of the certificate when issuance failed.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateLease {
    /// Who asks (an edge's name); the same holder may renew its lease.
    pub holder: String,
    /// Lease length in seconds (10–600).
    pub seconds: u32,
}

/// An ACME challenge answer any edge can serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcmeChallenge {
    pub token: String,
    pub domain: String,
    pub key_authorization: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct VerifyDomain {
    /// Platform admins may mark a domain verified without a DNS check.
    #[serde(default)]
    pub force: bool,
}
