//! The routing table the edge proxies follow: built from the store, versioned
//! by content, published through a watch channel so long-polling edges learn
//! of a change as soon as this operator sees it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use zeitwork_api_types::{Environment, Route, RouteCanary, RouteInstance, RouteShadow, RoutingTable};
use zeitwork_store::{RoutingRows, Store};

/// How often the table is rebuilt from the store, to see changes made
/// through other operators. Changes through this one are seen at once.
pub const REFRESH: Duration = Duration::from_millis(200);

#[derive(Debug)]
pub struct RoutingHub {
    table: watch::Sender<Arc<RoutingTable>>,
    nudge: Notify,
}

impl RoutingHub {
    pub fn new(apps_domain: &str) -> Arc<Self> {
        let empty = build(
            &RoutingRows { deployments: vec![], current: vec![], domains: vec![], canaries: vec![], shadows: vec![] },
            apps_domain,
        );
        Arc::new(Self { table: watch::Sender::new(Arc::new(empty)), nudge: Notify::new() })
    }

    pub fn current(&self) -> Arc<RoutingTable> {
        self.table.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.table.subscribe()
    }

    /// Rebuild now (after a change made through this operator).
    pub fn changed(&self) {
        self.nudge.notify_one();
    }

    /// Rebuilds the table until `stop` turns true.
    pub async fn run(self: Arc<Self>, store: Store, apps_domain: String, mut stop: watch::Receiver<bool>) {
        loop {
            match store.routing_rows().await {
                Ok(rows) => {
                    let table = build(&rows, &apps_domain);
                    self.table.send_if_modified(|cur| {
                        if cur.version == table.version {
                            false
                        } else {
                            tracing::debug!(version = %table.version, routes = table.routes.len(), "routing table changed");
                            *cur = Arc::new(table);
                            true
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot rebuild the routing table; keeping the last one"),
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = self.nudge.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Builds the table: `<deployment>.<apps>` for every deployment with ready
/// instances, `<project>-<org>.<apps>` for production's active deployment,
/// `<project>-pr-<n>-<org>.<apps>` for pull request `n`'s preview,
/// and custom domains for their environment's active deployment.
///
/// Addresses are reserved in the store so two routes never claim one host;
/// should one still appear twice (a custom domain equal to another project's
/// address), the first claim in that order keeps it and the other is refused
/// with a warning naming both, never silently replaced.
pub fn build(rows: &RoutingRows, apps_domain: &str) -> RoutingTable {
    let by_id: HashMap<&str, &zeitwork_store::RoutedDeployment> =
        rows.deployments.iter().map(|d| (d.id.as_str(), d)).collect();
    let route = |host: String, d: &zeitwork_store::RoutedDeployment, env: Option<Environment>| Route {
        acme: false,
        host,
        deployment: d.id.clone(),
        org: d.org.clone(),
        project: d.project.clone(),
        environment: env,
        rate_limit: d.rate_limit,
        instances: d.instances.iter().map(|(id, up)| RouteInstance { id: id.clone(), upstream: up.clone() }).collect(),
        wake: d.wake,
        gone: d.gone,
        // A deployment's own host says where it may stand in (skew protection);
        // its environment's stable hosts say for how long a client stays pinned.
        served: if env.is_none() { d.served.clone() } else { Vec::new() },
        skew_max_age_secs: env.filter(|e| *e != Environment::Preview).and(d.skew_max_age_secs),
        canary: None,
        shadow: None,
    };
    // An environment in a canary rollout sends a share of its clients to the candidate,
    // once the candidate has ready instances.
    let canaries: HashMap<(&str, &str, Environment), RouteCanary> = rows
        .canaries
        .iter()
        .filter_map(|c| {
            let d = by_id.get(c.deployment.as_str()).filter(|d| !d.instances.is_empty() && c.weight > 0)?;
            let instances =
                d.instances.iter().map(|(id, up)| RouteInstance { id: id.clone(), upstream: up.clone() }).collect();
            Some((
                (c.org.as_str(), c.project.as_str(), c.environment),
                RouteCanary { deployment: c.deployment.clone(), weight: c.weight, instances },
            ))
        })
        .collect();
    let canary_of = |org: &str, project: &str, env: Environment| canaries.get(&(org, project, env)).cloned();
    // An environment in its shadow stage copies a share of its requests to the
    // candidate, once the candidate has ready instances.
    let shadows: HashMap<(&str, &str, Environment), RouteShadow> = rows
        .shadows
        .iter()
        .filter_map(|s| {
            let d = by_id.get(s.deployment.as_str()).filter(|d| !d.instances.is_empty())?;
            let instances =
                d.instances.iter().map(|(id, up)| RouteInstance { id: id.clone(), upstream: up.clone() }).collect();
            Some((
                (s.org.as_str(), s.project.as_str(), s.environment),
                RouteShadow {
                    deployment: s.deployment.clone(),
                    share: s.shadow.share,
                    all_methods: s.shadow.all_methods,
                    instances,
                },
            ))
        })
        .collect();
    let shadow_of =
        |org: &str, project: &str, env: Environment| shadows.get(&(org, project, env)).cloned().map(Box::new);
    let mut routes: Vec<Route> =
        rows.deployments.iter().map(|d| route(format!("{}.{apps_domain}", d.id), d, None)).collect();
    let mut active: HashMap<(&str, &str, Environment), &str> = HashMap::new();
    for c in &rows.current {
        if c.pull_request.is_none() {
            active.insert((&c.org, &c.project, c.environment), &c.deployment);
        }
        let stable = match (c.environment, c.pull_request) {
            (Environment::Production, _) => Some(format!("{}-{}", c.project, c.org)),
            (Environment::Preview, Some(n)) => Some(zeitwork_store::preview_label(&c.project, n, &c.org)),
            _ => None,
        };
        if let (Some(label), true) = (stable, c.owns_stable_host) {
            if let Some(d) = by_id.get(c.deployment.as_str()) {
                let (canary, shadow) = if c.pull_request.is_none() {
                    (canary_of(&c.org, &c.project, c.environment), shadow_of(&c.org, &c.project, c.environment))
                } else {
                    (None, None)
                };
                routes.push(Route {
                    canary,
                    shadow,
                    ..route(format!("{label}.{apps_domain}"), d, Some(c.environment))
                });
            }
        }
    }
    // A custom domain is routed only once its ownership is verified.
    for (domain, org, project, env, verified) in rows.domains.iter().filter(|d| d.4) {
        if let Some(d) = active.get(&(org.as_str(), project.as_str(), *env)).and_then(|id| by_id.get(id)) {
            let (canary, shadow) = (canary_of(org, project, *env), shadow_of(org, project, *env));
            routes.push(Route { acme: *verified, canary, shadow, ..route(domain.clone(), d, Some(*env)) });
        }
    }
    let mut seen: HashMap<String, (String, String)> = HashMap::new();
    routes.retain(|r| match seen.get(&r.host) {
        None => {
            seen.insert(r.host.clone(), (r.org.clone(), r.project.clone()));
            true
        }
        Some((org, project)) => {
            if (org, project) != (&r.org, &r.project) {
                tracing::warn!(host = %r.host, kept = %format!("{org}/{project}"), refused = %format!("{}/{}", r.org, r.project),
                    "two projects claim one host; the first claim keeps it");
            }
            false
        }
    });
    routes.sort_by(|a, b| a.host.cmp(&b.host));
    let digest = Sha256::digest(serde_json::to_vec(&(&routes, apps_domain)).unwrap_or_default());
    RoutingTable { version: hex::encode(&digest[..8]), apps_domain: apps_domain.to_owned(), routes }
}
