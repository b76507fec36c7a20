//! Backup and restore of a single-machine (SQLite) operator's whole state:
//! projects, env values (still encrypted), deployments, tokens, image
//! archives, certificates, the audit log. The encryption key is not in the
//! backup; a restore needs the same key and refuses to proceed without it.

use std::path::{Path, PathBuf};

use zeitwork_store::{inspect_backup, BackupInfo, Store, StoreError};

use crate::secrets::Cipher;

/// Why a backup or restore did not happen. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0} holds a platform already; restore into an empty data directory, or pass --force to set it aside")]
    NotEmpty(String),
    #[error("the backup is from a newer Zeitwork (schema {found}, this one knows {supported}); upgrade first")]
    TooNew { found: i64, supported: i64 },
    #[error("the backup was written with another encryption key; put the original key in {0} (or set encryption_key)")]
    WrongKey(String),
    #[error("{file} is damaged or truncated; restore another copy, or take a new backup")]
    Unreadable { file: String, source: StoreError },
    #[error("the backup has no key check; it is not a Zeitwork backup")]
    NoKeyCheck,
    #[error("{0}")]
    Key(#[from] crate::secrets::SecretsError),
    #[error("cannot {what}")]
    Io { what: String, source: std::io::Error },
}

impl BackupError {
    /// Something is in the way: existing state, or a file that exists.
    pub fn is_conflict(&self) -> bool {
        matches!(self, BackupError::NotEmpty(_) | BackupError::Store(StoreError::Conflict(_)))
    }

    /// The named backup file or store is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, BackupError::Store(StoreError::NotFound(_)))
    }
}

/// Takes a consistent snapshot of the operator's store at `data_dir` into `out`, online.
pub async fn backup(data_dir: &Path, out: &Path) -> Result<BackupInfo, BackupError> {
    let db = data_dir.join("zeitwork.db");
    if !db.exists() {
        return Err(StoreError::NotFound(format!("no store at {}", db.display())).into());
    }
    let store = Store::open_sqlite(&db).await?;
    let done = store.backup_into(out).await;
    store.close().await;
    done?;
    Ok(inspect_backup(out).await?)
}

/// Puts the backup `file` in place as the store of `data_dir`, after checking
/// it is readable, not from a newer schema, and written with the key this data
/// dir has (`secret.key`, or `key` when given). With `force`, an existing store
/// is moved aside (`zeitwork.db.before-restore-<time>`), never deleted.
pub async fn restore(file: &Path, data_dir: &Path, key: Option<&str>, force: bool) -> Result<BackupInfo, BackupError> {
    let info = inspect_backup(file).await.map_err(|e| match e {
        StoreError::NotFound(_) => BackupError::Store(e),
        source => BackupError::Unreadable { file: file.display().to_string(), source },
    })?;
    let supported = zeitwork_store::latest_version();
    if info.schema_version > supported {
        return Err(BackupError::TooNew { found: info.schema_version, supported });
    }
    let key_file = data_dir.join("secret.key");
    let cipher = match key {
        Some(k) => Cipher::from_base64(k)?,
        None if key_file.exists() => Cipher::load_or_create(&key_file)?,
        None => return Err(BackupError::WrongKey(key_file.display().to_string())),
    };
    let check = info.key_check.as_deref().ok_or(BackupError::NoKeyCheck)?;
    if cipher.decrypt("zeitwork:key-check", check).is_err() {
        return Err(BackupError::WrongKey(key_file.display().to_string()));
    }
    let db = data_dir.join("zeitwork.db");
    let io = |what: String| move |source| BackupError::Io { what, source };
    if db.exists() {
        if !force {
            return Err(BackupError::NotEmpty(data_dir.display().to_string()));
        }
        let aside = data_dir.join(format!("zeitwork.db.before-restore-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S")));
        std::fs::rename(&db, &aside).map_err(io(format!("move {} aside", db.display())))?;
        for ext in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{ext}", db.display()));
            if side.exists() {
                std::fs::rename(&side, PathBuf::from(format!("{}{ext}", aside.display())))
                    .map_err(io(format!("move {} aside", side.display())))?;
            }
        }
    }
    std::fs::create_dir_all(data_dir).map_err(io(format!("create {}", data_dir.display())))?;
    // Copied under a temporary name, then renamed: a crash leaves no half store.
    let tmp = data_dir.join("zeitwork.db.restoring");
    std::fs::copy(file, &tmp).map_err(io(format!("copy {}", file.display())))?;
    std::fs::rename(&tmp, &db).map_err(io(format!("put {} in place", db.display())))?;
    Ok(info)
}
