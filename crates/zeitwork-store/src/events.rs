//! The audit log: every change writes its event in the same transaction as the change.

use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use zeitwork_api_types::Event;

use crate::{
    in_list, limit_arg, now_ms, paginate, ts, Arg, Audit, Listing, Page, Result, RowExt, Sql, Store, StoreError,
};

pub(crate) async fn append_event(conn: &mut AnyConnection, audit: &Audit, result: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO events (at, actor, action, target, org, project, result, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(now_ms())
    .bind(&audit.actor)
    .bind(&audit.action)
    .bind(&audit.target)
    .bind(audit.org.clone())
    .bind(audit.project.clone())
    .bind(result)
    .bind(audit.detail.as_ref().map(|d| d.to_string()))
    .execute(&mut *conn)
    .await?;
    // What is worth telling goes to the outbox in the same transaction.
    crate::outbox::enqueue(conn, audit, result).await
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub org: Option<String>,
    pub orgs_visible: Option<Vec<String>>,
    pub project: Option<String>,
    pub action: Option<String>,
    pub result: Option<String>,
}

fn event_from(row: &AnyRow) -> Result<Event> {
    Ok(Event {
        id: row.int("id")?,
        at: ts(row.int("at")?),
        actor: row.text("actor")?,
        action: row.text("action")?,
        target: row.text("target")?,
        org: row.opt_text("org")?,
        project: row.opt_text("project")?,
        result: row.text("result")?,
        detail: row.opt_text("detail")?.and_then(|d| serde_json::from_str(&d).ok()),
    })
}

impl Store {
    /// Records a call that changed nothing (e.g. a denied one).
    pub async fn record_event(&self, audit: &Audit, result: &str) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        append_event(&mut tx, audit, result).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The id of the newest event (0 when there is none).
    pub async fn newest_event_id(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS id FROM events").fetch_one(&self.reader).await?;
        row.int("id")
    }

    /// Events after `id`, oldest first.
    pub async fn events_after(&self, id: i64, limit: u32) -> Result<Vec<Event>> {
        let rows = sqlx::query(&format!("SELECT * FROM events WHERE id > $1 ORDER BY id LIMIT {limit}"))
            .bind(id)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(event_from).collect()
    }

    pub async fn list_events(&self, filter: &EventFilter, page: &Page) -> Result<Listing<Event>> {
        let mut q = Sql::new("SELECT * FROM events WHERE 1 = 1");
        if let Some(org) = &filter.org {
            q.and("org = ?", Arg::Text(org.clone()));
        }
        if let Some(orgs) = &filter.orgs_visible {
            in_list(&mut q, "org", orgs);
        }
        if let Some(p) = &filter.project {
            q.and("project = ?", Arg::Text(p.clone()));
        }
        if let Some(a) = &filter.action {
            q.and("action = ?", Arg::Text(a.clone()));
        }
        if let Some(r) = &filter.result {
            q.and("result = ?", Arg::Text(r.clone()));
        }
        if let Some(c) = &page.cursor {
            let id: i64 = c.parse().map_err(|_| StoreError::Invalid {
                field: "cursor".into(),
                message: "not a cursor this list returned".into(),
            })?;
            q.and("id < ?", Arg::Int(id));
        }
        let l = q.arg(limit_arg(page));
        q.push(&format!(" ORDER BY id DESC LIMIT {l}"));
        let rows = q.query().fetch_all(&self.reader).await?;
        let items = rows.iter().map(event_from).collect::<Result<Vec<_>>>()?;
        Ok(paginate(items, page.limit, |e| e.id.to_string()))
    }
}
