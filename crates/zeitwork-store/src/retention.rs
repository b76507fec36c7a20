//! Pruning of the audit log past its retention (the other growing tables
//! prune next to their own code: uptime samples in `checks`, delivered
//! notifications in `outbox`).

use crate::{Result, Store};

impl Store {
    /// Deletes audit events older than `before_ms`, at most `batch` at a time; how many went.
    pub async fn prune_events(&self, before_ms: i64, batch: u32) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < $1 ORDER BY id LIMIT $2)")
                .bind(before_ms)
                .bind(i64::from(batch))
                .execute(&self.writer)
                .await?;
        Ok(done.rows_affected())
    }
}
