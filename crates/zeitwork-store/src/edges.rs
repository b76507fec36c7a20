//! Edge proxies: their heartbeats and the addresses they serve on.

use crate::{now_ms, ts, Result, RowExt, Store};

impl Store {
    /// Records an edge proxy's addresses and that it is alive.
    pub async fn edge_heartbeat(&self, name: &str, http: Option<&str>, https: Option<&str>) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM edges WHERE name = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO edges (name, http_address, https_address, last_seen) VALUES ($1, $2, $3, $4)")
            .bind(name)
            .bind(http.map(str::to_owned))
            .bind(https.map(str::to_owned))
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Edge proxies seen since `since_ms`, by name.
    pub async fn live_edges(&self, since_ms: i64) -> Result<Vec<zeitwork_api_types::EdgeInfo>> {
        let rows = sqlx::query("SELECT * FROM edges WHERE last_seen >= $1 ORDER BY name")
            .bind(since_ms)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(zeitwork_api_types::EdgeInfo {
                    name: r.text("name")?,
                    http_address: r.opt_text("http_address")?,
                    https_address: r.opt_text("https_address")?,
                    last_seen: ts(r.int("last_seen")?),
                })
            })
            .collect()
    }
}
