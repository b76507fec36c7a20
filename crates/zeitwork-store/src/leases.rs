//! Leases: one holder at a time for a named role (the engine's leader).

use crate::{now_ms, Result, RowExt, Store};

impl Store {
    /// Takes or renews the lease `name` for `holder` for `ttl_ms`; returns whether `holder` holds it.
    pub async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let taken =
            sqlx::query("UPDATE leases SET holder = $1, until = $2 WHERE name = $3 AND (holder = $1 OR until < $4)")
                .bind(holder)
                .bind(now + ttl_ms)
                .bind(name)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
        let held = if taken {
            true
        } else {
            sqlx::query("INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
                .bind(name)
                .bind(holder)
                .bind(now + ttl_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1
        };
        tx.commit().await?;
        Ok(held)
    }

    /// Gives a lease up (a clean stop), so another holder takes over at once.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

impl Store {
    /// Who holds lease `name`, and until when (ms since the epoch).
    pub async fn lease(&self, name: &str) -> Result<Option<(String, i64)>> {
        let row = sqlx::query("SELECT holder, until FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| Ok((r.text("holder")?, r.int("until")?))).transpose()
    }
}
