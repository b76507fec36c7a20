//! Bearer tokens: minted with a random secret, stored as SHA-256 of the secret,
//! compared in constant time, and turned into a [`Caller`] that knows what it
//! may do.
//!
//! A token reads `zw_<id>_<secret>`: the id finds the row, the secret proves it.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::Method;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeitwork_api_types::{ClusterRole, Role, Token, TokenScope};
use zeitwork_store::{nanoid, Audit, StoreError, StoredToken};

use crate::error::ApiError;
use crate::AppState;

/// A freshly minted token: what to store and the bearer string shown once.
#[derive(Debug)]
pub struct Minted {
    pub stored: StoredToken,
    pub bearer: String,
}

pub fn mint(
    name: &str,
    scope: TokenScope,
    read_only: bool,
    created_by: Option<String>,
    expires_in_days: Option<u32>,
) -> Minted {
    let id = nanoid(12);
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let secret = URL_SAFE_NO_PAD.encode(secret);
    let now = chrono::Utc::now();
    Minted {
        bearer: format!("zw_{id}_{secret}"),
        stored: StoredToken {
            token: Token {
                id: format!("tok_{id}"),
                name: name.to_owned(),
                scope,
                read_only,
                created_by,
                created_at: now,
                expires_at: expires_in_days.map(|d| now + chrono::Duration::days(i64::from(d))),
                node: None,
            },
            secret_hash: hash_secret(&secret),
        },
    }
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Who is calling, as proven by their token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub scope: TokenScope,
    pub read_only: bool,
    /// The node a node's own credential acts for.
    pub node: Option<String>,
}

impl Caller {
    /// How events name this caller.
    pub fn actor(&self) -> String {
        format!("{} ({})", self.name, self.token_id)
    }

    pub fn audit(&self, action: &str, target: impl Into<String>) -> Audit {
        Audit::new(&self.actor(), action, target)
    }

    pub fn is_admin(&self) -> bool {
        self.scope == TokenScope::Admin
    }

    /// The caller's role in `org`: platform admins act as Owner everywhere.
    pub fn role_in(&self, org: &str) -> Option<Role> {
        match &self.scope {
            TokenScope::Admin => Some(Role::Owner),
            TokenScope::Org { org: o, role } if o == org => Some(*role),
            _ => None,
        }
    }

    /// Orgs this caller may see; `None` means all of them.
    pub fn visible_orgs(&self) -> Option<Vec<String>> {
        match &self.scope {
            TokenScope::Admin => None,
            TokenScope::Org { org, .. } => Some(vec![org.clone()]),
            TokenScope::Cluster { .. } => Some(Vec::new()),
        }
    }

    /// Values of secrets are shown only to Developers and above with a writable token.
    pub fn sees_secrets_of(&self, org: &str) -> bool {
        !self.read_only && self.role_in(org).is_some_and(|r| r >= Role::Developer)
    }
}

/// Checks of what a caller may do; denials are written to the audit log.
impl AppState {
    pub async fn require_admin(&self, caller: &Caller, action: &str, target: &str) -> Result<(), ApiError> {
        if caller.is_admin() {
            return Ok(());
        }
        self.deny(caller, action, target, None, "this needs a platform admin token").await
    }

    pub async fn require_role(
        &self,
        caller: &Caller,
        org: &str,
        min: Role,
        action: &str,
        target: &str,
    ) -> Result<Role, ApiError> {
        match caller.role_in(org) {
            Some(r) if r >= min => Ok(r),
            Some(r) => {
                let why = format!("this needs the {} role in {org:?}; the token has {}", min.as_str(), r.as_str());
                self.deny(caller, action, target, Some(org), &why).await
            }
            None => {
                let why = format!("the token has no access to organisation {org:?}");
                self.deny(caller, action, target, Some(org), &why).await
            }
        }
    }

    pub async fn require_cluster(
        &self,
        caller: &Caller,
        roles: &[ClusterRole],
        action: &str,
        target: &str,
    ) -> Result<(), ApiError> {
        match &caller.scope {
            TokenScope::Admin => Ok(()),
            TokenScope::Cluster { role } if roles.contains(role) => Ok(()),
            _ => {
                let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                let why = format!("this needs a platform admin token or a {} cluster token", names.join(" or "));
                self.deny(caller, action, target, None, &why).await
            }
        }
    }

    /// Calls a node makes about itself: its own credential (or a platform
    /// admin). The shared node-agent token only registers nodes.
    pub async fn require_node(&self, caller: &Caller, node: &str, action: &str) -> Result<(), ApiError> {
        match (&caller.scope, caller.node.as_deref()) {
            (TokenScope::Admin, _) => Ok(()),
            (TokenScope::Cluster { role: ClusterRole::NodeAgent }, Some(own)) if own == node => Ok(()),
            (TokenScope::Cluster { role: ClusterRole::NodeAgent }, Some(own)) => {
                let why = format!("this credential acts for node {own} only");
                self.deny(caller, action, node, None, &why).await
            }
            (TokenScope::Cluster { role: ClusterRole::NodeAgent }, None) => {
                let why = "register the node first (POST /api/v1/nodes) and use the credential it returns";
                self.deny(caller, action, node, None, why).await
            }
            _ => self.deny(caller, action, node, None, "this needs the node's own credential").await,
        }
    }

    pub async fn deny<T>(
        &self,
        caller: &Caller,
        action: &str,
        target: &str,
        org: Option<&str>,
        why: &str,
    ) -> Result<T, ApiError> {
        let mut audit = caller.audit(action, target);
        audit.org = org.map(str::to_owned);
        if let Err(e) = self.store.record_event(&audit, "denied").await {
            tracing::warn!(error = %e, "could not record a denied call");
        }
        Err(ApiError::Forbidden(why.to_owned()))
    }

    /// Verifies a bearer string against the store.
    pub async fn authenticate(&self, bearer: &str) -> Result<Caller, ApiError> {
        let bad =
            || ApiError::Unauthorized("the token is not valid; check ZEITWORK_TOKEN or create a new token".into());
        let rest = bearer.strip_prefix("zw_").ok_or_else(bad)?;
        let (id, secret) = rest.split_once('_').ok_or_else(bad)?;
        if id.len() != 12 || secret.len() != 43 {
            return Err(bad());
        }
        let stored = match self.store.get_token_recent(&format!("tok_{id}")).await {
            Ok(t) => t,
            Err(StoreError::NotFound(_)) => {
                // Spend the same hashing work as a real check.
                let _ = hash_secret(secret).as_bytes().ct_eq(&[0u8; 64]);
                return Err(bad());
            }
            Err(e) => return Err(e.into()),
        };
        let presented = hash_secret(secret);
        if !bool::from(presented.as_bytes().ct_eq(stored.secret_hash.as_bytes())) {
            return Err(bad());
        }
        if stored.token.expires_at.is_some_and(|e| e < chrono::Utc::now()) {
            return Err(ApiError::Unauthorized("the token has expired; create a new one".into()));
        }
        Ok(Caller {
            token_id: stored.token.id,
            name: stored.token.name,
            scope: stored.token.scope,
            read_only: stored.token.read_only,
            node: stored.token.node,
        })
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = match parts.headers.get(axum::http::header::AUTHORIZATION) {
            Some(header) => {
                let value = header
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                    .map(str::trim)
                    .ok_or_else(|| {
                        ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
                    })?;
                state.authenticate(value).await?
            }
            // The web console: its session cookie, or its own in-process calls.
            None => crate::console::session::caller_without_bearer(parts, state).await?.ok_or_else(|| {
                ApiError::Unauthorized("missing Authorization header; send `Authorization: Bearer <token>`".into())
            })?,
        };
        if caller.read_only && !matches!(parts.method, Method::GET | Method::HEAD) {
            let target = parts.uri.path().to_owned();
            return state.deny(&caller, "write", &target, None, "this token is read-only").await;
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_parse_and_hash() {
        let m = mint("ci", TokenScope::Admin, false, None, Some(1));
        let rest = m.bearer.strip_prefix("zw_").unwrap();
        let (id, secret) = rest.split_once('_').unwrap();
        assert_eq!(format!("tok_{id}"), m.stored.token.id);
        assert_eq!(secret.len(), 43);
        assert_eq!(hash_secret(secret), m.stored.secret_hash);
        assert!(!m.stored.secret_hash.contains(secret));
        assert!(m.stored.token.expires_at.is_some());
    }
}

/// The operator's own token towards node agents (cluster role `operator`):
/// minted on first use, valid for a day, replaced after half of that.
#[derive(Debug, Default)]
pub struct InternalToken {
    current: tokio::sync::Mutex<Option<(String, std::time::Instant)>>,
}

impl InternalToken {
    const RENEW: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

    pub async fn get(&self, store: &zeitwork_store::Store) -> Result<String, StoreError> {
        let mut current = self.current.lock().await;
        if let Some((t, at)) = &*current {
            if at.elapsed() < Self::RENEW {
                return Ok(t.clone());
            }
        }
        let m = mint("operator (internal)", TokenScope::Cluster { role: ClusterRole::Operator }, false, None, Some(1));
        store.create_token(&m.stored, &Audit::new("system", "token.create", &m.stored.token.id)).await?;
        *current = Some((m.bearer.clone(), std::time::Instant::now()));
        Ok(m.bearer)
    }
}
