//! The change feed's snapshot: the status of deployments, instances and nodes.

use crate::{Result, RowExt, Store};

/// One row of the change feed's snapshot: something with a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRow {
    /// `deployment`, `instance` or `node`.
    pub kind: &'static str,
    pub id: String,
    pub org: Option<String>,
    pub project: Option<String>,
    pub deployment: Option<String>,
    pub status: String,
    pub reason: Option<String>,
}

impl Store {
    /// What the change feed compares: deployments still moving or changed since
    /// `since_ms`, their instances, and every node.
    pub async fn feed_snapshot(&self, since_ms: i64) -> Result<Vec<FeedRow>> {
        let mut out = Vec::new();
        let recent = "(d.status NOT IN ('retired', 'failed') OR d.updated_at >= $1)";
        // Instances first: an instance getting ready comes before the activation it causes.
        for r in sqlx::query(&format!(
            "SELECT i.id, i.deployment_id, i.status, i.exit_reason, d.org, d.project FROM instances i \
             JOIN deployments d ON d.id = i.deployment_id WHERE {recent}"
        ))
        .bind(since_ms)
        .fetch_all(&self.reader)
        .await?
        {
            out.push(FeedRow {
                kind: "instance",
                id: r.text("id")?,
                org: Some(r.text("org")?),
                project: Some(r.text("project")?),
                deployment: Some(r.text("deployment_id")?),
                status: r.text("status")?,
                reason: r.opt_text("exit_reason")?,
            });
        }
        for r in
            sqlx::query(&format!("SELECT d.id, d.org, d.project, d.status, d.reason FROM deployments d WHERE {recent}"))
                .bind(since_ms)
                .fetch_all(&self.reader)
                .await?
        {
            out.push(FeedRow {
                kind: "deployment",
                id: r.text("id")?,
                org: Some(r.text("org")?),
                project: Some(r.text("project")?),
                deployment: None,
                status: r.text("status")?,
                reason: r.opt_text("reason")?,
            });
        }
        for r in sqlx::query("SELECT id, status FROM nodes").fetch_all(&self.reader).await? {
            out.push(FeedRow {
                kind: "node",
                id: r.text("id")?,
                org: None,
                project: None,
                deployment: None,
                status: r.text("status")?,
                reason: None,
            });
        }
        Ok(out)
    }
}
