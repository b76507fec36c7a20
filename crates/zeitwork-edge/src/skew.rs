//! Skew protection: a response from an environment's stable address (the
//! project's `<project>-<org>` host, staging's, a custom domain) names the
//! deployment that served it in a cookie, and a later request that carries
//! the cookie is served by that deployment for as long as it still runs or
//! sleeps, so a page loaded before a deploy keeps talking to its own version.
//!
//! The cookie only chooses among deployments the client could reach anyway
//! (each has its own public address), and only among those of the same
//! project that have served the same environment: a value naming anything
//! else (another project's deployment, a staging deployment on the production
//! address, a retired or failed one, garbage) is ignored and the request goes
//! to the active deployment, whose response sets a fresh cookie. Membership is
//! checked against the routing table on every request, so the value needs no
//! signature.
//!
//! Nothing here changes a request that carries no cookie, or a host whose
//! project has skew protection off.

use std::sync::Arc;

use hyper::header::HeaderValue;
use zeitwork_api_types::{Environment, Route};

use crate::EdgeState;

/// The cookie naming the deployment that served the client.
pub const COOKIE: &str = "zeitwork_deployment";
/// The response header naming it too (for scripts that pin their own requests).
pub const HEADER: &str = "x-zeitwork-deployment";

/// Whether responses of `route` take part: a stable host of production or
/// staging (or a custom domain of either) whose project turned it on.
/// Pull request previews each have a host of their own and are left alone.
fn protected(route: &Route) -> Option<(Environment, u32)> {
    let env = route.environment.filter(|e| *e != Environment::Preview)?;
    Some((env, route.skew_max_age_secs?))
}

/// This edge's cookie in a `Cookie` header value, if well-formed.
pub(crate) fn cookie_value(header: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(header).ok()?;
    text.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name.trim() == COOKIE).then(|| value.trim().trim_matches('"')).filter(|v| deployment_id_shaped(v))
    })
}

/// Deployment ids are host labels: `[a-z0-9-]`, at most 63 characters.
fn deployment_id_shaped(v: &str) -> bool {
    !v.is_empty() && v.len() <= 63 && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The route to serve a request for `stable` with: the deployment its cookie
/// names when that one may serve it, else `stable` itself.
pub(crate) fn pin(state: &EdgeState, stable: Arc<Route>, cookie: Option<&str>) -> Arc<Route> {
    let (Some((env, _)), Some(id)) = (protected(&stable), cookie) else { return stable };
    if id == stable.deployment {
        return stable;
    }
    match state.route(&format!("{id}.{}", state.apps_domain())) {
        Some(pinned) if may_serve(&stable, env, &pinned) => pinned,
        _ => stable,
    }
}

/// Whether `pinned` (a deployment's own route) may answer for `stable`:
/// same organisation and project, has served `env`, not retired, and either
/// ready or asleep (a sleeping one is woken like any other).
fn may_serve(stable: &Route, env: Environment, pinned: &Route) -> bool {
    pinned.environment.is_none()
        && pinned.org == stable.org
        && pinned.project == stable.project
        && pinned.served.contains(&env)
        && !pinned.gone
        && (!pinned.instances.is_empty() || pinned.wake)
}

/// Response headers for a request to `host` answered by `served` (the route
/// admission chose): the deployment's name, and a cookie when the client's
/// does not name it yet.
pub(crate) fn stamp(
    host: &str,
    stable_cookie: Option<&str>,
    served: &Route,
    tls: bool,
) -> Vec<(&'static str, HeaderValue)> {
    let mut out = Vec::new();
    if served.host != host {
        // Pinned: the client's cookie already names this deployment.
        if let Ok(v) = HeaderValue::from_str(&served.deployment) {
            out.push((HEADER, v));
        }
        return out;
    }
    let Some((_, max_age)) = protected(served) else { return out };
    if let Ok(v) = HeaderValue::from_str(&served.deployment) {
        out.push((HEADER, v));
    }
    if stable_cookie != Some(served.deployment.as_str()) {
        let secure = if tls { "; Secure" } else { "" };
        let cookie =
            format!("{COOKIE}={}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax{secure}", served.deployment);
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            out.push(("set-cookie", v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeitwork_api_types::RouteInstance;

    fn route(host: &str, dep: &str, project: &str, env: Option<Environment>) -> Route {
        Route {
            host: host.into(),
            deployment: dep.into(),
            org: "acme".into(),
            project: project.into(),
            environment: env,
            rate_limit: None,
            acme: false,
            instances: vec![RouteInstance { id: format!("i-{dep}"), upstream: "http://n:1".into() }],
            wake: false,
            gone: false,
            served: vec![],
            skew_max_age_secs: None,
            canary: None,
            shadow: None,
        }
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        assert_eq!(cookie_value(b"a=1; zeitwork_deployment=web-abc1234-acme; b=2"), Some("web-abc1234-acme"));
        assert_eq!(cookie_value(b"zeitwork_deployment=\"web-abc1234-acme\""), Some("web-abc1234-acme"));
        assert_eq!(cookie_value(b"zeitwork_deployment=../etc"), None);
        assert_eq!(cookie_value(b"zeitwork_deployment=Web.Other"), None);
        assert_eq!(cookie_value(b"other=web-abc1234-acme"), None);
        assert_eq!(cookie_value(b"\xff\xfe"), None);
    }

    #[test]
    fn only_same_project_deployments_that_served_the_environment_qualify() {
        let env = Environment::Production;
        let stable = route("web-acme.apps.test", "web-new0000-acme", "web", Some(env));
        let mut old = route("web-old0000-acme.apps.test", "web-old0000-acme", "web", None);
        old.served = vec![env];
        assert!(may_serve(&stable, env, &old));

        let mut other = old.clone();
        other.project = "shop".into();
        assert!(!may_serve(&stable, env, &other), "another project's deployment");
        let mut other_org = old.clone();
        other_org.org = "evil".into();
        assert!(!may_serve(&stable, env, &other_org), "another organisation's deployment");
        let mut staging = old.clone();
        staging.served = vec![Environment::Staging];
        assert!(!may_serve(&stable, env, &staging), "a deployment that never served production");
        let mut retired = old.clone();
        retired.gone = true;
        retired.instances.clear();
        assert!(!may_serve(&stable, env, &retired), "a retired deployment");
        let mut sleeping = old.clone();
        sleeping.instances.clear();
        sleeping.wake = true;
        assert!(may_serve(&stable, env, &sleeping), "a sleeping one is woken");
        let mut stable_host = old.clone();
        stable_host.environment = Some(env);
        assert!(!may_serve(&stable, env, &stable_host), "only a deployment's own route");
    }

    #[test]
    fn responses_are_stamped_only_when_protection_is_on() {
        let mut stable = route("web-acme.apps.test", "web-new0000-acme", "web", Some(Environment::Production));
        assert!(stamp("web-acme.apps.test", None, &stable, false).is_empty(), "off by default");

        stable.skew_max_age_secs = Some(600);
        let h = stamp("web-acme.apps.test", None, &stable, true);
        let cookie = h.iter().find(|(n, _)| *n == "set-cookie").map(|(_, v)| v.to_str().unwrap().to_owned()).unwrap();
        assert_eq!(cookie, "zeitwork_deployment=web-new0000-acme; Max-Age=600; Path=/; HttpOnly; SameSite=Lax; Secure");
        let plain = stamp("web-acme.apps.test", None, &stable, false);
        assert!(plain.iter().all(|(n, v)| *n != "set-cookie" || !v.to_str().unwrap().contains("Secure")));
        let again = stamp("web-acme.apps.test", Some("web-new0000-acme"), &stable, false);
        assert!(again.iter().all(|(n, _)| *n != "set-cookie"), "a cookie already right is not set again");

        let mut preview = stable.clone();
        preview.environment = Some(Environment::Preview);
        assert!(stamp("web-acme.apps.test", None, &preview, false).is_empty(), "previews are left alone");
    }
}
