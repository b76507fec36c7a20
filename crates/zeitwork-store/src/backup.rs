//! Backups of an SQLite store: a consistent snapshot taken online
//! (`VACUUM INTO`, a read transaction: writers go on), and what a restore
//! checks before it puts one in place. PostgreSQL stores are backed up with
//! the database's own tools (see docs/operations.md).

use std::path::Path;

use sqlx::any::AnyPoolOptions;
use sqlx::Row;

use crate::{Dialect, Result, Store, StoreError};

/// What a backup file holds, read without changing it.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    /// Newest schema migration applied.
    pub schema_version: i64,
    /// The stored key check (ciphertext of a known text under the encryption key).
    pub key_check: Option<String>,
    pub projects: i64,
    pub deployments: i64,
}

impl Store {
    /// Writes a consistent copy of the whole store to `out` (which must not exist).
    pub async fn backup_into(&self, out: &Path) -> Result<()> {
        if self.dialect() != Dialect::Sqlite {
            return Err(StoreError::Invalid {
                field: "database_url".into(),
                message: "this store is PostgreSQL: back it up with pg_dump (docs/operations.md)".into(),
            });
        }
        if out.exists() {
            return Err(StoreError::Conflict(format!("{} exists; choose a new file", out.display())));
        }
        let path = out
            .to_str()
            .ok_or_else(|| StoreError::Invalid { field: "out".into(), message: "the path is not UTF-8".into() })?;
        sqlx::query("VACUUM INTO $1").bind(path).execute(&self.reader).await?;
        Ok(())
    }
}

/// Reads a backup file without changing it; an unreadable or truncated file is an error.
pub async fn inspect_backup(file: &Path) -> Result<BackupInfo> {
    sqlx::any::install_default_drivers();
    if !file.is_file() {
        return Err(StoreError::NotFound(format!("{} is not a file", file.display())));
    }
    let url = format!("sqlite://{}?mode=ro&immutable=1", file.display());
    let pool = AnyPoolOptions::new().max_connections(1).connect(&url).await?;
    let result = async {
        let integrity: String = sqlx::query("PRAGMA quick_check").fetch_one(&pool).await?.try_get(0)?;
        if integrity != "ok" {
            return Err(StoreError::Corrupt(format!("the backup is damaged: {integrity}")));
        }
        let version: i64 = sqlx::query("SELECT CAST(MAX(version) AS BIGINT) FROM schema_migrations")
            .fetch_one(&pool)
            .await?
            .try_get(0)?;
        let key_check: Option<String> = sqlx::query("SELECT value FROM bootstrap WHERE key = 'key_check'")
            .fetch_optional(&pool)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        let count = |table: &'static str| {
            let pool = pool.clone();
            async move {
                let n: i64 =
                    sqlx::query(&format!("SELECT COUNT(*) FROM {table}")).fetch_one(&pool).await?.try_get(0)?;
                Ok::<_, StoreError>(n)
            }
        };
        Ok(BackupInfo {
            schema_version: version,
            key_check,
            projects: count("projects").await?,
            deployments: count("deployments").await?,
        })
    }
    .await;
    pool.close().await;
    result
}
