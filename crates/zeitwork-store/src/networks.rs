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

/// The highest host number of a private network (a /24).
pub const MAX_PRIVATE_HOST: u32 = 254;

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
        let hosts = self.give_private_hosts(network, &[instance.to_owned()], max_host).await?;
        hosts.get(instance).copied().ok_or_else(|| StoreError::Conflict("no private address was handed out".into()))
    }

    /// [`Store::private_host`] for several instances of network `network` at
    /// once: the numbers they have, and the lowest free ones for the others,
    /// handed out in one transaction that announces the network's project once.
    pub async fn give_private_hosts(
        &self,
        network: u32,
        instances: &[String],
        max_host: u32,
    ) -> Result<std::collections::HashMap<String, u32>> {
        let mut out = self.private_hosts(instances).await?;
        for _ in 0..ATTEMPTS {
            let mut missing: Vec<String> = instances.iter().filter(|i| !out.contains_key(*i)).cloned().collect();
            missing.sort();
            missing.dedup();
            if missing.is_empty() {
                return Ok(out);
            }
            let mut tx = self.writer.begin().await?;
            let sql = |p: &str| format!("SELECT instance_id, host FROM private_addresses WHERE instance_id IN ({p})");
            crate::for_each_chunk_in(&mut tx, &missing, sql, |r| {
                out.insert(r.text("instance_id")?, r.int("host")? as u32);
                Ok(())
            })
            .await?;
            let missing: Vec<&String> = missing.iter().filter(|i| !out.contains_key(*i)).collect();
            if missing.is_empty() {
                return Ok(out);
            }
            let Some(given) = allocate_hosts(&mut tx, network, &missing, max_host).await? else {
                continue;
            };
            // The other members' lists now hold these addresses: their nodes' watches wake.
            let project = sqlx::query("SELECT project_id FROM project_networks WHERE idx = $1")
                .bind(i64::from(network))
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.text("project_id"))
                .transpose()?;
            let change = project.map_or(crate::Change::Anything, |p| crate::Change::Projects(vec![p]));
            self.commit_announcing(tx, change).await?;
            out.extend(given);
            return Ok(out);
        }
        Err(StoreError::Conflict("private address allocation kept clashing; try again".into()))
    }

    /// The host numbers `instances` already have, by instance id, in one read
    /// per 500 (an instance without one is absent: [`Store::private_host`] gives it one).
    pub async fn private_hosts(&self, instances: &[String]) -> Result<std::collections::HashMap<String, u32>> {
        let mut out = std::collections::HashMap::with_capacity(instances.len());
        let sql = |p: &str| format!("SELECT instance_id, host FROM private_addresses WHERE instance_id IN ({p})");
        crate::for_each_chunk(&self.reader, instances, sql, |r| {
            out.insert(r.text("instance_id")?, r.int("host")? as u32);
            Ok(())
        })
        .await?;
        Ok(out)
    }
}

/// A project and one of its environments: what a private network is of.
pub type NetworkKey = (String, String);

impl Store {
    /// The numbers of the networks of `keys` that have one, by key.
    pub async fn project_networks(&self, keys: &[NetworkKey]) -> Result<std::collections::HashMap<NetworkKey, u32>> {
        let projects = distinct_projects(keys);
        let mut out = std::collections::HashMap::new();
        let sql =
            |p: &str| format!("SELECT project_id, environment, idx FROM project_networks WHERE project_id IN ({p})");
        crate::for_each_chunk(&self.reader, &projects, sql, |r| {
            out.insert((r.text("project_id")?, r.text("environment")?), r.int("idx")? as u32);
            Ok(())
        })
        .await?;
        out.retain(|k, _| keys.contains(k));
        Ok(out)
    }

    /// [`Store::network_members`] of several networks at once, by key (one without members is absent).
    pub async fn networks_members(
        &self,
        keys: &[NetworkKey],
    ) -> Result<std::collections::HashMap<NetworkKey, Vec<PrivateMember>>> {
        let projects = distinct_projects(keys);
        let mut out: std::collections::HashMap<NetworkKey, Vec<PrivateMember>> = std::collections::HashMap::new();
        let sql = |p: &str| {
            format!(
                "SELECT d.project_id, d.environment, i.id, i.node_id, i.status, a.host FROM instances i \
                 JOIN deployments d ON d.id = i.deployment_id JOIN private_addresses a ON a.instance_id = i.id \
                 WHERE d.project_id IN ({p}) AND i.{LIVE_INSTANCE} AND d.status NOT IN ('retired', 'failed') \
                 ORDER BY i.id"
            )
        };
        crate::for_each_chunk(&self.reader, &projects, sql, |r| {
            out.entry((r.text("project_id")?, r.text("environment")?)).or_default().push(PrivateMember {
                instance: r.text("id")?,
                node: r.opt_text("node_id")?,
                host: r.int("host")? as u32,
                ready: r.text("status")? == "ready",
            });
            Ok(())
        })
        .await?;
        out.retain(|k, _| keys.contains(k));
        Ok(out)
    }
}

fn distinct_projects(keys: &[NetworkKey]) -> Vec<String> {
    let mut projects: Vec<String> = keys.iter().map(|(p, _)| p.clone()).collect();
    projects.sort();
    projects.dedup();
    projects
}

/// Hands out the lowest free numbers of network `network` to `instances`
/// (which have none) inside `tx`, giving back first the numbers of instances
/// no longer live. `None` when another operator took one of them first (the
/// transaction is then spoilt: try again in a new one).
pub(crate) async fn allocate_hosts(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    network: u32,
    instances: &[&String],
    max_host: u32,
) -> Result<Option<Vec<(String, u32)>>> {
    // Per address of this network, one look-up of its instance (not a list of every live instance).
    sqlx::query(&format!(
        "DELETE FROM private_addresses WHERE network = $1 AND NOT EXISTS \
         (SELECT 1 FROM instances i WHERE i.id = private_addresses.instance_id AND i.{LIVE_INSTANCE})"
    ))
    .bind(i64::from(network))
    .execute(&mut **tx)
    .await?;
    let mut used: Vec<i64> = sqlx::query("SELECT host FROM private_addresses WHERE network = $1 ORDER BY host")
        .bind(i64::from(network))
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| r.try_get::<i64, _>(0))
        .collect::<Result<_, _>>()?;
    let mut given = Vec::with_capacity(instances.len());
    for instance in instances {
        let Some(host) = lowest_free(&used, 1, i64::from(max_host) + 1) else {
            return Err(StoreError::Conflict(format!(
                "the private network has no free address for instance {instance} ({max_host} in use)"
            )));
        };
        let res = sqlx::query("INSERT INTO private_addresses (network, host, instance_id) VALUES ($1, $2, $3)")
            .bind(i64::from(network))
            .bind(host)
            .bind(instance.as_str())
            .execute(&mut **tx)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => return Ok(None),
            r => r?,
        };
        used.insert(used.partition_point(|&u| u < host), host);
        given.push(((*instance).clone(), host as u32));
    }
    Ok(Some(given))
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
