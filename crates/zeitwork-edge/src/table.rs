//! The edge's copy of the routing table. Updates arrive as whole tables from
//! the operator and are applied as diffs, so counters of instances that stay
//! survive and the log says exactly what changed. The last table keeps
//! serving while the operator is unreachable.

use std::collections::HashMap;
use std::sync::Arc;

use zeitwork_api_types::{Route, RoutingTable};

/// Routes by host, as served.
#[derive(Debug, Default, Clone)]
pub struct Routes {
    pub version: String,
    pub apps_domain: String,
    pub hosts: HashMap<String, Arc<Route>>,
}

/// One step from one table to the next.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A host is new or now points elsewhere (other deployment, instances or limits).
    Upsert(Box<Route>),
    Remove(String),
}

/// What must change to go from `old` to `new`.
pub fn diff(old: &Routes, new: &RoutingTable) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in &new.routes {
        seen.insert(r.host.as_str());
        match old.hosts.get(&r.host) {
            Some(cur) if **cur == *r => {}
            _ => changes.push(Change::Upsert(Box::new(r.clone()))),
        }
    }
    let mut removed: Vec<&String> = old.hosts.keys().filter(|h| !seen.contains(h.as_str())).collect();
    removed.sort();
    changes.extend(removed.into_iter().map(|h| Change::Remove(h.clone())));
    changes
}

/// `old` with `changes` applied.
pub fn apply(old: &Routes, version: &str, apps_domain: &str, changes: Vec<Change>) -> Routes {
    let mut next = old.clone();
    next.version = version.to_owned();
    next.apps_domain = apps_domain.to_owned();
    for c in changes {
        match c {
            Change::Upsert(r) => {
                next.hosts.insert(r.host.clone(), Arc::new(*r));
            }
            Change::Remove(h) => {
                next.hosts.remove(&h);
            }
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeitwork_api_types::RouteInstance;

    fn route(host: &str, dep: &str, instances: &[&str]) -> Route {
        Route {
            host: host.into(),
            deployment: dep.into(),
            org: "acme".into(),
            project: "web".into(),
            environment: None,
            rate_limit: None,
            acme: false,
            instances: instances
                .iter()
                .map(|i| RouteInstance { id: (*i).into(), upstream: "http://n:1".into() })
                .collect(),
            wake: false,
            gone: false,
            served: vec![],
            skew_max_age_secs: None,
            canary: None,
            shadow: None,
        }
    }

    fn table(v: &str, routes: Vec<Route>) -> RoutingTable {
        RoutingTable { version: v.into(), apps_domain: "apps.test".into(), routes }
    }

    #[test]
    fn diffs_apply_to_the_new_table() {
        let empty = Routes::default();
        let t1 = table("1", vec![route("a.apps.test", "a", &["i1"]), route("b.apps.test", "b", &["i2"])]);
        let c1 = diff(&empty, &t1);
        assert_eq!(c1.len(), 2);
        let r1 = apply(&empty, "1", "apps.test", c1);
        assert!(diff(&r1, &t1).is_empty(), "applying a diff reaches the table");

        let t2 = table("2", vec![route("a.apps.test", "a", &["i1", "i3"]), route("c.apps.test", "c", &["i4"])]);
        let c2 = diff(&r1, &t2);
        assert_eq!(
            c2,
            vec![
                Change::Upsert(Box::new(route("a.apps.test", "a", &["i1", "i3"]))),
                Change::Upsert(Box::new(route("c.apps.test", "c", &["i4"]))),
                Change::Remove("b.apps.test".into()),
            ]
        );
        let r2 = apply(&r1, "2", "apps.test", c2);
        assert_eq!(r2.version, "2");
        assert!(diff(&r2, &t2).is_empty());
        assert!(!r2.hosts.contains_key("b.apps.test"));
    }
}
