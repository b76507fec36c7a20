//! Sessions of the web console: a browser's signed-in state, found by the
//! hash of its cookie and tied to the token it acts with.

use sqlx::Row;

use crate::{now_ms, Result, RowExt, Store, StoreError};

/// A stored console session. The cookie's secret is never stored, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 (hex) of the cookie's secret.
    pub id_hash: String,
    /// The token the session acts with.
    pub token_id: String,
    /// Sent back by the browser in `X-CSRF-Token` on every change.
    pub csrf: String,
    /// The session minted its token (a GitHub sign-in) and deletes it when it ends.
    pub owns_token: bool,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

impl Store {
    pub async fn create_console_session(&self, s: &ConsoleSession) -> Result<()> {
        sqlx::query(
            "INSERT INTO console_sessions (id_hash, token_id, csrf, owns_token, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&s.id_hash)
        .bind(&s.token_id)
        .bind(&s.csrf)
        .bind(i64::from(s.owns_token))
        .bind(s.created_at_ms)
        .bind(s.expires_at_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The unexpired session with this hash.
    pub async fn get_console_session(&self, id_hash: &str) -> Result<ConsoleSession> {
        let row = sqlx::query("SELECT * FROM console_sessions WHERE id_hash = $1 AND expires_at > $2")
            .bind(id_hash)
            .bind(now_ms())
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound("the session has ended; sign in again".into()))?;
        Ok(ConsoleSession {
            id_hash: row.text("id_hash")?,
            token_id: row.text("token_id")?,
            csrf: row.text("csrf")?,
            owns_token: row.int("owns_token")? != 0,
            created_at_ms: row.int("created_at")?,
            expires_at_ms: row.int("expires_at")?,
        })
    }

    /// Ends a session; returns it (to delete the token it owns), if it existed.
    pub async fn delete_console_session(&self, id_hash: &str) -> Result<Option<ConsoleSession>> {
        let found = match self.get_console_session(id_hash).await {
            Ok(s) => Some(s),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1").bind(id_hash).execute(&self.writer).await?;
        Ok(found)
    }

    /// Forgets expired sessions; returns the tokens they owned.
    pub async fn expire_console_sessions(&self) -> Result<Vec<String>> {
        let now = now_ms();
        let owned: Vec<String> =
            sqlx::query("SELECT token_id FROM console_sessions WHERE expires_at <= $1 AND owns_token = 1")
                .bind(now)
                .fetch_all(&self.reader)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<std::result::Result<_, _>>()?;
        sqlx::query("DELETE FROM console_sessions WHERE expires_at <= $1").bind(now).execute(&self.writer).await?;
        Ok(owned)
    }
}
