//! TLS certificates of custom domains: domain verification, issuance leases,
//! issued certificates (key encrypted) and ACME HTTP-01 challenges.

use sqlx::any::AnyRow;

use crate::events::append_event;
use crate::{is_unique_violation, now_ms, ts, Arg, Audit, Result, RowExt, Sql, Store, StoreError};

/// A certificate as stored: the key is ciphertext.
#[derive(Debug, Clone)]
pub struct StoredCertificate {
    pub domain: String,
    /// `pending`, `issued`, `failed`.
    pub state: String,
    pub cert_pem: Option<String>,
    pub key_enc: Option<String>,
    pub not_after: Option<chrono::DateTime<chrono::Utc>>,
    pub error: Option<String>,
}

fn cert_from(row: &AnyRow) -> Result<StoredCertificate> {
    Ok(StoredCertificate {
        domain: row.text("domain")?,
        state: row.text("state")?,
        cert_pem: row.opt_text("cert_pem")?,
        key_enc: row.opt_text("key_enc")?,
        not_after: row.opt_int("not_after")?.map(ts),
        error: row.opt_text("error")?,
    })
}

impl Store {
    /// Marks a domain verified (its owner proved it, or an admin said so). The
    /// name is the project's from now on: other projects' unverified claims of
    /// it are removed, each with a `domain.release` event for its project. A
    /// conflict when another project verified it first.
    pub async fn verify_domain(&self, project_id: &str, name: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let others = sqlx::query(
            "SELECT d.project_id, d.verified, o.slug, p.name FROM domains d JOIN projects p ON p.id = d.project_id \
             JOIN orgs o ON o.id = p.org_id WHERE d.name = $1 AND d.project_id <> $2",
        )
        .bind(name)
        .bind(project_id)
        .fetch_all(&mut *tx)
        .await?;
        if others.iter().any(|r| r.int("verified").is_ok_and(|v| v != 0)) {
            return Err(StoreError::Conflict(format!("domain {name:?} was verified by another project first")));
        }
        let done = sqlx::query("UPDATE domains SET verified = 1 WHERE project_id = $1 AND name = $2")
            .bind(project_id)
            .bind(name)
            .execute(&mut *tx)
            .await;
        let done = match done {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("domain {name:?} was verified by another project first")))
            }
            r => r?,
        };
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("domain {name:?} is not registered to this project")));
        }
        for r in &others {
            sqlx::query("DELETE FROM domains WHERE name = $1 AND project_id = $2 AND verified = 0")
                .bind(name)
                .bind(r.text("project_id")?)
                .execute(&mut *tx)
                .await?;
            let released = Audit::new(&audit.actor, "domain.release", name)
                .org(&r.text("slug")?)
                .project(&r.text("name")?)
                .detail(serde_json::json!({"reason": "another organisation proved it owns the domain"}));
            append_event(&mut tx, &released, "ok").await?;
        }
        append_event(&mut tx, audit, "ok").await?;
        self.commit_announcing(tx, crate::Change::Projects(vec![project_id.to_owned()])).await?;
        Ok(())
    }

    /// Whether `name` is a custom domain registered to a project and verified.
    pub async fn domain_is_verified(&self, name: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM domains WHERE name = $1 AND verified = 1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.is_some())
    }

    pub async fn list_certificates(&self) -> Result<Vec<StoredCertificate>> {
        let rows = sqlx::query("SELECT * FROM certificates ORDER BY domain").fetch_all(&self.reader).await?;
        rows.iter().map(cert_from).collect()
    }

    pub async fn get_certificate(&self, domain: &str) -> Result<Option<StoredCertificate>> {
        let row = sqlx::query("SELECT * FROM certificates WHERE domain = $1")
            .bind(domain)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| cert_from(&r)).transpose()
    }

    /// Takes the issuance lease of `domain` for `holder` until `until_ms`, if
    /// nobody else holds it. Returns whether `holder` has it now.
    pub async fn lease_certificate(&self, domain: &str, holder: &str, until_ms: i64) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT lease_holder, lease_until FROM certificates WHERE domain = $1{}",
            self.for_update()
        ))
        .bind(domain)
        .fetch_optional(&mut *tx)
        .await?;
        let granted = match row {
            None => {
                let res = sqlx::query(
                    "INSERT INTO certificates (domain, state, lease_holder, lease_until, updated_at) VALUES ($1, 'pending', $2, $3, $4)",
                )
                .bind(domain)
                .bind(holder)
                .bind(until_ms)
                .bind(now)
                .execute(&mut *tx)
                .await;
                match res {
                    Err(e) if is_unique_violation(&e) => false,
                    r => r.map(|_| true)?,
                }
            }
            Some(r) => {
                let free = r.opt_int("lease_until")?.is_none_or(|u| u < now)
                    || r.opt_text("lease_holder")?.as_deref() == Some(holder);
                if free {
                    sqlx::query("UPDATE certificates SET lease_holder = $1, lease_until = $2, updated_at = $3 WHERE domain = $4")
                        .bind(holder)
                        .bind(until_ms)
                        .bind(now)
                        .bind(domain)
                        .execute(&mut *tx)
                        .await?;
                }
                free
            }
        };
        tx.commit().await?;
        Ok(granted)
    }

    /// Stores an issued certificate (key already encrypted) and releases the lease.
    pub async fn store_certificate(
        &self,
        domain: &str,
        cert_pem: &str,
        key_enc: &str,
        not_after_ms: i64,
        audit: &Audit,
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE certificates SET state = 'issued', cert_pem = $1, key_enc = $2, not_after = $3, error = NULL, \
             lease_holder = NULL, lease_until = NULL, updated_at = $4 WHERE domain = $5",
        )
        .bind(cert_pem)
        .bind(key_enc)
        .bind(not_after_ms)
        .bind(now_ms())
        .bind(domain)
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// The organisation and project a custom domain belongs to: the verified
    /// claim, or else the oldest unverified one.
    pub async fn domain_owner(&self, name: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query(
            "SELECT o.slug, p.name FROM domains d JOIN projects p ON p.id = d.project_id \
             JOIN orgs o ON o.id = p.org_id WHERE d.name = $1 ORDER BY d.verified DESC, d.created_at LIMIT 1",
        )
        .bind(name)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| Ok((r.text("slug")?, r.text("name")?))).transpose()
    }

    /// Records a failed issuance (a previous certificate, if any, stays served).
    pub async fn certificate_failed(&self, domain: &str, error: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE certificates SET state = CASE WHEN cert_pem IS NULL THEN 'failed' ELSE state END, error = $1, \
             lease_holder = NULL, lease_until = NULL, updated_at = $2 WHERE domain = $3",
        )
        .bind(error)
        .bind(now_ms())
        .bind(domain)
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "failed").await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn put_challenge(&self, token: &str, domain: &str, key_authorization: &str) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM acme_challenges WHERE token = $1").bind(token).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO acme_challenges (token, domain, key_authorization, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(token)
        .bind(domain)
        .bind(key_authorization)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn delete_challenge(&self, token: &str) -> Result<()> {
        sqlx::query("DELETE FROM acme_challenges WHERE token = $1").bind(token).execute(&self.writer).await?;
        Ok(())
    }

    /// (domain, key authorization) of a token, or of the newest challenge of a domain.
    pub async fn find_challenge(
        &self,
        token: Option<&str>,
        domain: Option<&str>,
    ) -> Result<Option<(String, String, String)>> {
        let mut q = Sql::new("SELECT token, domain, key_authorization FROM acme_challenges WHERE 1 = 1");
        if let Some(t) = token {
            q.and("token = ?", Arg::Text(t.to_owned()));
        }
        if let Some(d) = domain {
            q.and("domain = ?", Arg::Text(d.to_owned()));
        }
        q.push(" ORDER BY created_at DESC LIMIT 1");
        let row = q.query().fetch_optional(&self.reader).await?;
        row.map(|r| Ok((r.text("token")?, r.text("domain")?, r.text("key_authorization")?))).transpose()
    }
}
