//! Private project networks: one per project and environment, numbered so the
//! operator can give each a prefix of its private range, and a host number
//! per live instance inside it. Both are allocated on first use and kept while
//! used, so an instance keeps its address for its whole life, whichever
//! operator hands it out.

use sqlx::Row;

use crate::deployments::LIVE_INSTANCE;
use crate::{is_unique_violation, now_ms, Result, RowExt, Store, StoreError};

/// A live instance of a project network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateMember {
    pub instance: String,
    pub node: Option<String>,
    /// Its host number inside the network's prefix.
    pub host: u32,
    pub ready: bool,
}

/// Concurrent operators may pick the same free number; the loser tries again.
const ATTEMPTS: usize = 8;

impl Store {
    /// The number of the network of `project_id` in `environment` (the lowest
    /// free one below `limit` when it has none yet).
    pub async fn project_network(&self, project_id: &str, environment: &str, limit: u32) -> Result<u32> {
        // Almost always there already: a read, no write lock.
        let found = sqlx::query("SELECT idx FROM project_networks WHERE project_id = $1 AND environment = $2")
            .bind(project_id)
            .bind(environment)
            .fetch_optional(&self.reader)
            .await?;
        if let Some(r) = found {
            return Ok(r.int("idx")? as u32);
        }
        for _ in 0..ATTEMPTS {
            let mut tx = self.writer.begin().await?;
            let found = sqlx::query("SELECT idx FROM project_networks WHERE project_id = $1 AND environment = $2")
                .bind(project_id)
                .bind(environment)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(r) = found {
                return Ok(r.int("idx")? as u32);
            }
            let used: Vec<i64> = sqlx::query("SELECT idx FROM project_networks ORDER BY idx")
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>(0))
                .collect::<Result<_, _>>()?;
            let Some(idx) = lowest_free(&used, 0, i64::from(limit)) else {
                return Err(StoreError::Conflict(format!(
                    "every one of the {limit} private project networks is taken; widen the operator's private_network"
                )));
            };
            let res = sqlx::query(
                "INSERT INTO project_networks (project_id, environment, idx, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(project_id)
            .bind(environment)
            .bind(idx)
            .bind(now_ms())
            .execute(&mut *tx)
            .await;
            match res {
                Err(e) if is_unique_violation(&e) => continue,
                r => r?,
            };
            tx.commit().await?;
            return Ok(idx as u32);
        }
        Err(StoreError::Conflict("private network allocation kept clashing; try again".into()))
    }

    /// The host number of `instance` in network `network`: the one it has, or
    /// the lowest free one in `1..=max_host`. Numbers of instances that are no
    /// longer live are given back first.
    pub async fn private_host(&self, network: u32, instance: &str, max_host: u32) -> Result<u32> {
        let found = sqlx::query("SELECT host FROM private_addresses WHERE instance_id = $1")
            .bind(instance)
            .fetch_optional(&self.reader)
            .await?;
        if let Some(r) = found {
            return Ok(r.int("host")? as u32);
        }
        for _ in 0..ATTEMPTS {
            let mut tx = self.writer.begin().await?;
            let found = sqlx::query("SELECT host FROM private_addresses WHERE instance_id = $1")
                .bind(instance)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(r) = found {
                return Ok(r.int("host")? as u32);
            }
            sqlx::query(&format!(
                "DELETE FROM private_addresses WHERE network = $1 AND instance_id NOT IN \
                 (SELECT id FROM instances WHERE {LIVE_INSTANCE})"
            ))
            .bind(i64::from(network))
            .execute(&mut *tx)
            .await?;
            let used: Vec<i64> = sqlx::query("SELECT host FROM private_addresses WHERE network = $1 ORDER BY host")
                .bind(i64::from(network))
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>(0))
                .collect::<Result<_, _>>()?;
            let Some(host) = lowest_free(&used, 1, i64::from(max_host) + 1) else {
                return Err(StoreError::Conflict(format!(
                    "the private network has no free address for instance {instance} ({max_host} in use)"
                )));
            };
            let res = sqlx::query("INSERT INTO private_addresses (network, host, instance_id) VALUES ($1, $2, $3)")
                .bind(i64::from(network))
                .bind(host)
                .bind(instance)
                .execute(&mut *tx)
                .await;
            match res {
                Err(e) if is_unique_violation(&e) => continue,
                r => r?,
            };
            tx.commit().await?;
            // The other members' lists now hold this address: their nodes' watches wake.
            let project = sqlx::query("SELECT project_id FROM project_networks WHERE idx = $1")
                .bind(i64::from(network))
                .fetch_optional(&self.reader)
                .await?;
            match project.map(|r| r.text("project_id")).transpose()? {
                Some(p) => self.changed_in(crate::Change::Projects(vec![p])).await,
                None => self.changed().await,
            }
            return Ok(host as u32);
        }
        Err(StoreError::Conflict("private address allocation kept clashing; try again".into()))
    }

    /// The host numbers `instances` already have, by instance id, in one read
    /// per 500 (an instance without one is absent: [`Store::private_host`] gives it one).
    pub async fn private_hosts(&self, instances: &[String]) -> Result<std::collections::HashMap<String, u32>> {
        let mut out = std::collections::HashMap::with_capacity(instances.len());
        for chunk in instances.chunks(500) {
            let params: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql =
                format!("SELECT instance_id, host FROM private_addresses WHERE instance_id IN ({})", params.join(", "));
            let mut q = sqlx::query(&sql);
            for i in chunk {
                q = q.bind(i.as_str());
            }
            for r in q.fetch_all(&self.reader).await? {
                out.insert(r.text("instance_id")?, r.int("host")? as u32);
            }
        }
        Ok(out)
    }

    /// Live instances of `project_id` in `environment` that have an address,
    /// on any node, by id.
    pub async fn network_members(&self, project_id: &str, environment: &str) -> Result<Vec<PrivateMember>> {
        let rows = sqlx::query(&format!(
            "SELECT i.id, i.node_id, i.status, a.host FROM instances i JOIN deployments d ON d.id = i.deployment_id \
             JOIN private_addresses a ON a.instance_id = i.id \
             WHERE d.project_id = $1 AND d.environment = $2 AND i.{LIVE_INSTANCE} \
             AND d.status NOT IN ('retired', 'failed') ORDER BY i.id"
        ))
        .bind(project_id)
        .bind(environment)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PrivateMember {
                    instance: r.text("id")?,
                    node: r.opt_text("node_id")?,
                    host: r.int("host")? as u32,
                    ready: r.text("status")? == "ready",
                })
            })
            .collect()
    }
}

/// The lowest number in `from..to` not in `used` (sorted).
fn lowest_free(used: &[i64], from: i64, to: i64) -> Option<i64> {
    let mut next = from;
    for &u in used {
        if u == next {
            next += 1;
        } else if u > next {
            break;
        }
    }
    (next < to).then_some(next)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lowest_free_fills_gaps_first() {
        assert_eq!(super::lowest_free(&[], 1, 5), Some(1));
        assert_eq!(super::lowest_free(&[1, 2, 4], 1, 5), Some(3));
        assert_eq!(super::lowest_free(&[0, 1], 0, 2), None);
        assert_eq!(super::lowest_free(&[2, 3], 1, 5), Some(1));
    }
}
