//! Image archives: blobs stored in chunks, and the archives (manifest and
//! blobs) served to node agents.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::events::append_event;
use crate::{now_ms, Audit, Result, Store};

/// Blobs are stored in chunks of this many bytes, so no request holds a whole layer in memory.
pub const BLOB_CHUNK: usize = 4 * 1024 * 1024;

/// An uploaded image archive: a manifest and the blobs it names, served to node agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArchive {
    pub id: String,
    pub org: String,
    pub name: String,
    pub manifest_digest: String,
    pub media_type: String,
    /// Digests of the config and layers.
    pub blobs: Vec<String>,
    pub size: i64,
    pub created_by: Option<String>,
}

impl Store {
    /// The size of a stored blob, when it is stored whole.
    pub async fn blob_size(&self, digest: &str) -> Result<Option<i64>> {
        let row =
            sqlx::query("SELECT size FROM blobs WHERE digest = $1").bind(digest).fetch_optional(&self.reader).await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<i64, _>(0)?),
            None => None,
        })
    }

    /// Stores one chunk of a blob being written; [`Store::finish_blob`] makes it visible.
    pub async fn put_blob_chunk(&self, digest: &str, seq: i64, data: Vec<u8>) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM blob_chunks WHERE digest = $1 AND seq = $2")
            .bind(digest)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO blob_chunks (digest, seq, data) VALUES ($1, $2, $3)")
            .bind(digest)
            .bind(seq)
            .bind(data)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks a blob whose chunks are all written as complete.
    pub async fn finish_blob(&self, digest: &str, size: i64) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM blob_chunks WHERE digest = $1 AND seq >= $2")
            .bind(digest)
            .bind(((size + BLOB_CHUNK as i64 - 1) / BLOB_CHUNK as i64).max(1))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM blobs WHERE digest = $1").bind(digest).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO blobs (digest, size, created_at) VALUES ($1, $2, $3)")
            .bind(digest)
            .bind(size)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Chunk `seq` of a complete blob.
    pub async fn blob_chunk(&self, digest: &str, seq: i64) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT data FROM blob_chunks WHERE digest = $1 AND seq = $2")
            .bind(digest)
            .bind(seq)
            .fetch_optional(&self.reader)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<Vec<u8>, _>(0)?),
            None => None,
        })
    }

    /// Records an archive whose blobs are stored; the same image uploaded again is the same record.
    pub async fn create_archive(&self, a: &StoredArchive, audit: &Audit) -> Result<StoredArchive> {
        let mut tx = self.writer.begin().await?;
        let existing = sqlx::query("SELECT * FROM archives WHERE org = $1 AND name = $2 AND manifest_digest = $3")
            .bind(&a.org)
            .bind(&a.name)
            .bind(&a.manifest_digest)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = existing {
            return archive_from(&row);
        }
        sqlx::query(
            "INSERT INTO archives (id, org, name, manifest_digest, media_type, blobs, size, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&a.id)
        .bind(&a.org)
        .bind(&a.name)
        .bind(&a.manifest_digest)
        .bind(&a.media_type)
        .bind(a.blobs.join(" "))
        .bind(a.size)
        .bind(a.created_by.clone())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(a.clone())
    }

    /// The archive of `org/name` with this manifest digest.
    pub async fn find_archive(&self, org: &str, name: &str, manifest_digest: &str) -> Result<Option<StoredArchive>> {
        let row = sqlx::query("SELECT * FROM archives WHERE org = $1 AND name = $2 AND manifest_digest = $3")
            .bind(org)
            .bind(name)
            .bind(manifest_digest)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(archive_from).transpose()
    }

    /// Whether an archive of `org/name` names this blob (a repository serves only its own blobs).
    pub async fn archive_names_blob(&self, org: &str, name: &str, digest: &str) -> Result<bool> {
        let rows = sqlx::query("SELECT blobs, manifest_digest FROM archives WHERE org = $1 AND name = $2")
            .bind(org)
            .bind(name)
            .fetch_all(&self.reader)
            .await?;
        for r in rows {
            let blobs: String = r.try_get(0)?;
            let manifest: String = r.try_get(1)?;
            if manifest == digest || blobs.split(' ').any(|b| b == digest) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn archive_from(r: &AnyRow) -> Result<StoredArchive> {
    let blobs: String = r.try_get("blobs")?;
    Ok(StoredArchive {
        id: r.try_get("id")?,
        org: r.try_get("org")?,
        name: r.try_get("name")?,
        manifest_digest: r.try_get("manifest_digest")?,
        media_type: r.try_get("media_type")?,
        blobs: blobs.split(' ').filter(|b| !b.is_empty()).map(str::to_owned).collect(),
        size: r.try_get("size")?,
        created_by: r.try_get("created_by")?,
    })
}
