//! The console's HTML. maud escapes every interpolated string, so names,
//! commit messages, keys and log lines from users reach the browser as text.
//! Write buttons appear only where the caller's role allows the call; the API
//! decides again when it is made.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};
use zeitwork_api_types::{
    Build, Channel, Deployment, DeploymentStatus, Domain, EnvVar, EnvironmentHealth, Event, Instance, Member, Node,
    Org, Project, ProjectRoute, Region, Role, Token, TokenScope,
};

use super::session::Session;
use super::{enc, AuditFilter, ReadError};

const ENVIRONMENTS: [&str; 3] = ["production", "staging", "preview"];

fn role(s: &Session, org: &str) -> Option<Role> {
    s.caller.role_in(org)
}

/// May change things in `org` (deploy, env, domains): Developer and up, writable token.
fn can_write(s: &Session, org: &str) -> bool {
    !s.caller.read_only && role(s, org).is_some_and(|r| r >= Role::Developer)
}

/// May manage members and tokens of `org`.
fn can_admin(s: &Session, org: &str) -> bool {
    !s.caller.read_only && role(s, org).is_some_and(|r| r >= Role::Admin)
}

fn who(s: &Session) -> String {
    match &s.caller.scope {
        TokenScope::Admin => format!("{} · platform admin", s.caller.name),
        TokenScope::Org { org, role } => format!("{} · {} of {org}", s.caller.name, role.as_str()),
        TokenScope::Cluster { role } => format!("{} · {}", s.caller.name, role.as_str()),
    }
}

fn page(title: &str, body: Markup) -> Markup {
    let v = super::asset_version();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                link rel="icon" href="data:,";
                title { (title) " · Zeitwork" }
                link rel="stylesheet" href={ "/console/console.css?v=" (v) };
                script src={ "/console/console.js?v=" (v) } defer {}
            }
            (body)
        }
    }
}

/// A signed-in page: header, live-update banner, main content.
fn layout(s: &Session, title: &str, stream: &str, main: Markup) -> Markup {
    page(
        title,
        html! {
            body data-stream=(stream) {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Console" {
                        a.brand href="/" { "Zeitwork" }
                        a href="/" { "Overview" }
                        a href="/audit" { "Audit log" }
                        a href="/settings" { "Members & tokens" }
                    }
                    div.me {
                        span { (who(s)) }
                        form method="post" action="/sign-out" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                meta name="csrf-token" content=(s.csrf);
                div #banner .banner role="status" hidden {
                    "Live updates are paused: the event stream dropped. Reconnecting… Changes are disabled until it is back."
                }
                main #main { (main) }
            }
        },
    )
}

fn time(t: DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S UTC")) } }
}

fn status(id: &str, status: &str) -> Markup {
    html! { span.status.{"s-" (status)} data-status-of=(id) { (status) } }
}

fn cli(cmd: &str) -> Markup {
    html! { p.cli { span { "CLI " } code { (cmd) } } }
}

/// A form whose fields become the JSON body of an API call made by console.js.
fn action(method: &str, path: &str, then: &str, label: &str, fields: Markup) -> Markup {
    html! {
        form.action data-method=(method) data-path=(path) data-then=(then) {
            (fields)
            button type="submit" { (label) }
            p.error role="alert" hidden {}
        }
    }
}

/// A one-button action in a table row; the button names what it acts on for screen readers.
fn row_action(method: &str, path: &str, label: &str, what: &str, confirm: Option<&str>) -> Markup {
    html! {
        form.action data-method=(method) data-path=(path) data-then="reload" data-confirm=[confirm] {
            button type="submit" aria-label={ (label) " " (what) } { (label) }
            p.error role="alert" hidden {}
        }
    }
}

fn duration(d: &Deployment) -> String {
    let secs = (d.updated_at - d.created_at).num_seconds().max(0);
    if secs < 120 {
        format!("{secs} s")
    } else {
        format!("{} min", secs / 60)
    }
}

fn short_sha(sha: &Option<String>) -> String {
    sha.as_deref().map(|s| s.chars().take(7).collect()).unwrap_or_default()
}

fn deployments_table(list: &[Deployment], with_project: bool) -> Markup {
    html! {
        @if list.is_empty() {
            p.empty { "No deployments yet." }
        } @else {
            div.scroll {
                table #history {
                    thead { tr {
                        th scope="col" { "Deployment" }
                        @if with_project { th scope="col" { "Project" } }
                        th scope="col" { "Environment" }
                        th scope="col" { "Status" }
                        th scope="col" { "Duration" }
                        th scope="col" { "Commit" }
                        th scope="col" { "Who" }
                        th scope="col" { "Created" }
                    } }
                    tbody {
                        @for d in list {
                            tr data-deployment=(d.id) {
                                td { a href={ "/deployments/" (enc(&d.id)) } { (d.id) } }
                                @if with_project {
                                    td { a href={ "/projects/" (enc(&d.org)) "/" (enc(&d.project)) } { (d.org) "/" (d.project) } }
                                }
                                td { (d.environment.as_str()) }
                                td { (status(&d.id, d.status.as_str())) }
                                td { (duration(d)) }
                                td.commit {
                                    @if d.commit_sha.is_some() { code { (short_sha(&d.commit_sha)) } " " }
                                    @if let Some(m) = &d.commit_message { span { (m) } }
                                }
                                td { (d.created_by.as_deref().unwrap_or("—")) }
                                td { (time(d.created_at)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ sign-in

pub fn sign_in(nonce: &str, message: Option<&str>, github: bool) -> Markup {
    page(
        "Sign in",
        html! {
            body {
                main #main .signin {
                    h1 { "Sign in to Zeitwork" }
                    @if let Some(m) = message { p.error role="alert" { (m) } }
                    form method="post" action="/sign-in" {
                        input type="hidden" name="csrf" value=(nonce);
                        label for="token" { "API token" }
                        input #token type="password" name="token" autocomplete="off" required placeholder="zw_…";
                        button type="submit" { "Sign in" }
                    }
                    p.hint {
                        "Paste a token once; the console keeps a session for 12 hours. "
                        "The first admin token of " code { "zeitwork up" } " is in its data directory ("
                        code { "admin.token" } "); create others with " code { "zeitwork tokens create" } "."
                    }
                    @if github {
                        p { a.button href="/auth/github" { "Sign in with GitHub" } }
                    }
                }
            }
        },
    )
}

/// After a sign-in that arrived from another site: go on from a page of ours.
pub fn continue_to(to: &str) -> Markup {
    page(
        "Signed in",
        html! {
            body {
                meta http-equiv="refresh" content={ "0;url=" (to) };
                main #main .signin { h1 { "Signed in" } p { a href=(to) { "Continue to the console" } } }
            }
        },
    )
}

pub fn error(s: &Session, e: &ReadError) -> Markup {
    layout(
        s,
        "Error",
        "/api/v1/events/stream",
        html! {
            h1 { (e.status.as_u16()) " " (e.status.canonical_reason().unwrap_or("")) }
            p.error role="alert" { (e.message) }
            p { a href="/" { "Back to the overview" } }
        },
    )
}

// ------------------------------------------------------------------ overview

#[derive(Debug)]
pub struct Overview {
    pub orgs: Vec<Org>,
    pub projects: Vec<Project>,
    pub deployments: Vec<Deployment>,
    /// None when the caller may not list nodes.
    pub nodes: Option<Vec<Node>>,
    pub regions: Vec<Region>,
}

pub fn overview(s: &Session, o: &Overview) -> Markup {
    let writable: Vec<&Org> = o.orgs.iter().filter(|org| can_write(s, &org.slug)).collect();
    let mut by_region: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for n in o.nodes.iter().flatten() {
        by_region.entry(n.region.as_str()).or_default().push(n);
    }
    layout(
        s,
        "Overview",
        "/api/v1/events/stream",
        html! {
            h1 { "Overview" }
            section #projects aria-labelledby="projects-h" {
                h2 #projects-h { "Projects" }
                @if o.projects.is_empty() { p.empty { "No projects yet." } } @else {
                    ul.cards {
                        @for p in &o.projects {
                            li {
                                a href={ "/projects/" (enc(&p.org)) "/" (enc(&p.name)) } { (p.org) "/" (p.name) }
                                @if let Some(id) = p.current_deployment.get("production") {
                                    " " span.muted { "production: " } (status(id, "active"))
                                }
                            }
                        }
                    }
                }
                @if !writable.is_empty() {
                    details {
                        summary { "New project" }
                        (action("POST", "/api/v1/projects", "go:/projects/{org}/{name}", "Create project", html! {
                            label for="np-org" { "Organisation" }
                            select #np-org name="org" {
                                @for org in &writable { option value=(org.slug) { (org.slug) } }
                            }
                            label for="np-name" { "Name" }
                            input #np-name name="name" required pattern="[a-z0-9]([a-z0-9\\-]*[a-z0-9])?" maxlength="40"
                                autocomplete="off" aria-describedby="np-hint";
                            p #np-hint .hint { "Lowercase letters, digits and dashes." }
                        }))
                        (cli("zeitwork projects create ORG/NAME"))
                    }
                }
            }
            @if s.caller.is_admin() && !s.caller.read_only {
                details open[o.orgs.is_empty()] {
                    summary { "New organisation" }
                    (action("POST", "/api/v1/orgs", "reload", "Create organisation", html! {
                        label for="no-slug" { "Slug" }
                        input #no-slug name="slug" required pattern="[a-z0-9]([a-z0-9\\-]*[a-z0-9])?" maxlength="40" autocomplete="off";
                        label for="no-name" { "Display name (optional)" }
                        input #no-name name="name" autocomplete="off";
                    }))
                    (cli("zeitwork orgs create SLUG"))
                }
            }
            section #nodes aria-labelledby="nodes-h" data-refresh {
                h2 #nodes-h { "Nodes by region" }
                @match &o.nodes {
                    None => p.muted { "Nodes are shown to platform admins." },
                    Some(nodes) if nodes.is_empty() => p.empty { "No nodes have registered yet." },
                    Some(_) => {
                        @for (code, nodes) in &by_region {
                            @let name = o.regions.iter().find(|r| r.code == *code).map(|r| r.name.as_str()).unwrap_or(code);
                            h3 { (name) " " span.muted { "(" (code) ")" } }
                            div.scroll {
                                table {
                                    thead { tr {
                                        th scope="col" { "Node" } th scope="col" { "Status" } th scope="col" { "Memory" }
                                        th scope="col" { "vCPU" } th scope="col" { "Instances" } th scope="col" { "Runtime" }
                                        th scope="col" { "Last heartbeat" }
                                    } }
                                    tbody {
                                        @for n in nodes {
                                            tr {
                                                td { (n.hostname) }
                                                td { (status(&n.id, n.status.as_str())) }
                                                td {
                                                    meter min="0" max=(n.capacity.memory) value=(n.allocated.memory)
                                                        aria-label={ "memory of " (n.hostname) } {}
                                                    " " (n.allocated.memory) " / " (n.capacity.memory) " MiB"
                                                }
                                                td { (n.allocated.vcpu) " / " (n.capacity.vcpu) }
                                                td { (n.instances) }
                                                td { (n.runtime) }
                                                td { @if let Some(t) = n.last_heartbeat { (time(t)) } @else { "—" } }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                (cli("zeitwork nodes list"))
            }
            section #recent aria-labelledby="recent-h" data-refresh {
                h2 #recent-h { "Recent deployments" }
                (deployments_table(&o.deployments, true))
                (cli("zeitwork deployments list"))
            }
        },
    )
}

// ------------------------------------------------------------------ project

#[derive(Debug)]
pub struct ProjectPage {
    pub project: Project,
    pub health: Vec<EnvironmentHealth>,
    pub routes: Vec<ProjectRoute>,
    pub history: Vec<Deployment>,
    /// None when the caller may not list them.
    pub channels: Option<Vec<Channel>>,
    /// Uptime checks; None when they could not be read.
    pub checks: Option<Vec<zeitwork_api_types::HealthCheck>>,
    /// What custom domains point their CNAME at.
    pub cname: String,
    /// `scheme://` and `:port` of app URLs.
    pub url_scheme: String,
    pub url_port: String,
}

fn project_nav(org: &str, name: &str, here: &str) -> Markup {
    let base = format!("/projects/{}/{}", enc(org), enc(name));
    let tabs =
        [("Overview", base.clone()), ("Env vars", format!("{base}/env")), ("Domains", format!("{base}/domains"))];
    html! {
        nav.tabs aria-label="Project" {
            @for (label, href) in tabs {
                @if label == here { a href=(href) aria-current="page" { (label) } } @else { a href=(href) { (label) } }
            }
        }
    }
}

fn project_stream(org: &str, name: &str) -> String {
    format!("/api/v1/events/stream?org={}&project={}", enc(org), enc(name))
}

/// Ready and total instances per region.
fn per_region(instances: &[Instance]) -> BTreeMap<&str, (u32, u32)> {
    let mut m: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for i in instances {
        let e = m.entry(i.region.as_str()).or_default();
        e.1 += 1;
        if i.status == zeitwork_api_types::InstanceStatus::Ready {
            e.0 += 1;
        }
    }
    m
}

pub fn project(s: &Session, d: &ProjectPage) -> Markup {
    let p = &d.project;
    let full = format!("{}/{}", p.org, p.name);
    layout(
        s,
        &full,
        &project_stream(&p.org, &p.name),
        html! {
            h1 { (full) }
            (project_nav(&p.org, &p.name, "Overview"))
            section #urls aria-labelledby="urls-h" data-refresh {
                h2 #urls-h { "URLs" }
                @let env_routes: Vec<&ProjectRoute> = d.routes.iter().filter(|r| r.environment.is_some()).collect();
                @if env_routes.is_empty() { p.empty { "Nothing is live yet: deploy an image below." } } @else {
                    ul {
                        @for r in env_routes {
                            @let url = format!("{}{}{}", d.url_scheme, r.host, d.url_port);
                            li {
                                strong { (r.environment.map(|e| e.as_str()).unwrap_or("")) } ": "
                                a href=(url) { (url) } " "
                                span.muted { "(" (r.instances) " ready)" }
                            }
                        }
                    }
                }
            }
            section #current aria-labelledby="health-h" data-refresh {
                h2 #health-h { "Current deployments" }
                @if d.health.is_empty() { p.empty { "No environment has an active deployment." } } @else {
                    div.scroll { table {
                        thead { tr {
                            th scope="col" { "Environment" } th scope="col" { "Deployment" } th scope="col" { "Status" }
                            th scope="col" { "Health" } th scope="col" { "Instances per region" }
                        } }
                        tbody {
                            @for h in &d.health {
                                @let regions = per_region(&h.instances);
                                tr {
                                    td { (h.environment.as_str()) }
                                    td { a href={ "/deployments/" (enc(&h.deployment)) } { (h.deployment) } }
                                    td { (status(&h.deployment, h.status.as_str())) }
                                    td { span.{"h-" (h.health)} { (h.health) } " (" (h.ready) "/" (h.total) " ready)" }
                                    td { @for (r, (ready, total)) in &regions { span.pill { (r) ": " (ready) "/" (total) } " " } }
                                }
                            }
                        }
                    } }
                }
            }
            @if can_write(s, &p.org) {
                section aria-labelledby="deploy-h" {
                    h2 #deploy-h { "Deploy" }
                    (action("POST", "/api/v1/deployments", "go:/deployments/{id}", "Deploy", html! {
                        input type="hidden" name="org" value=(p.org);
                        input type="hidden" name="project" value=(p.name);
                        label for="dp-image" { "Image" }
                        input #dp-image name="image" placeholder="registry.example.com/acme/web:1.2" autocomplete="off";
                        label for="dp-archive" { "or an image archive (.tar)" }
                        input #dp-archive type="file" accept=".tar,application/x-tar"
                            data-upload={ "/api/v1/orgs/" (enc(&p.org)) "/images?name=" (enc(&p.name)) };
                        label for="dp-env" { "Environment" }
                        select #dp-env name="environment" {
                            @for e in ENVIRONMENTS { option value=(e) { (e) } }
                        }
                        label for="dp-sha" { "Commit SHA (optional)" }
                        input #dp-sha name="commit_sha" autocomplete="off";
                        label for="dp-msg" { "Commit message (optional)" }
                        input #dp-msg name="commit_message" autocomplete="off";
                    }))
                    (cli(&format!("zeitwork deploy {full} --image IMAGE --environment ENVIRONMENT")))
                    p.hint { "With an archive (" code { "docker save" } " or an OCI archive): "
                        code { "zeitwork deploy " (full) " --archive app.tar" } }
                }
            }
            section #history-section aria-labelledby="history-h" data-refresh {
                h2 #history-h { "Deployment history" }
                (deployments_table(&d.history, false))
                (cli(&format!("zeitwork deployments list {full}")))
            }
            section aria-labelledby="notify-h" {
                h2 #notify-h { "Notifications" }
                @let npath = format!("/api/v1/projects/{}/{}/notifications", enc(&p.org), enc(&p.name));
                @match &d.channels {
                    None => p.muted { "The notification channels could not be read." },
                    Some(list) if list.is_empty() => p.empty { "No notification channels." },
                    Some(list) => div.scroll { table #channels {
                        thead { tr { th scope="col" { "Kind" } th scope="col" { "Delivers to" } th scope="col" { "Events" }
                            @if can_admin(s, &p.org) { th scope="col" { span.sr { "Actions" } } } } }
                        tbody { @for ch in list { tr {
                            td { (ch.kind) } td { code { (ch.url) } }
                            td { @if ch.events.is_empty() { "all" } @else { (ch.events.join(", ")) } }
                            @if can_admin(s, &p.org) { td {
                                (row_action("DELETE", &format!("{npath}/{}", enc(&ch.id)), "Remove", &format!("the {} channel to {}", ch.kind, ch.url), None))
                            } }
                        } } }
                    } },
                }
                @if can_admin(s, &p.org) {
                    details {
                        summary { "Add a channel" }
                        (action("POST", &npath, "reload", "Add channel", html! {
                            label for="nc-kind" { "Kind" }
                            select #nc-kind name="kind" { option value="webhook" { "signed webhook" } option value="slack" { "Slack" } }
                            label for="nc-url" { "URL" }
                            input #nc-url name="url" type="url" required autocomplete="off";
                            label for="nc-secret" { "Signing secret (webhooks)" }
                            input #nc-secret name="secret" type="password" minlength="16" autocomplete="off";
                            label for="nc-events" { "Events (comma-separated; empty: all)" }
                            input #nc-events name="events" data-list placeholder="deployment.activate, deployment.fail" autocomplete="off";
                        }))
                        p.cli { span { "API " } code { "POST " (npath) } }
                    }
                }
            }
            section aria-labelledby="checks-h" {
                h2 #checks-h { "Uptime checks" }
                @let cpath = format!("/api/v1/projects/{}/{}/health-checks", enc(&p.org), enc(&p.name));
                @match &d.checks {
                    None => p.muted { "The uptime checks could not be read." },
                    Some(list) if list.is_empty() => p.empty { "No uptime checks." },
                    Some(list) => div.scroll { table #checks {
                        thead { tr { th scope="col" { "Probes" } th scope="col" { "State" } th scope="col" { "Uptime (24 h)" }
                            th scope="col" { "p50 / p95" } th scope="col" { "Last sample" }
                            @if can_write(s, &p.org) { th scope="col" { span.sr { "Actions" } } } } }
                        tbody { @for c in list { tr {
                            td { code { (c.spec.method) " " (c.url) } " every " (c.spec.interval_secs) " s" }
                            td { span.{"h-" (c.state)} { (c.state) } }
                            td { @match c.uptime_percent { Some(u) => { (format!("{u:.2} %")) }, None => "—" } }
                            td { @match (c.p50_ms, c.p95_ms) { (Some(a), Some(b)) => { (a) " / " (b) " ms" }, _ => "—" } }
                            td { @match &c.last_sample {
                                Some(x) => { (x.at.format("%H:%M:%S")) " " @if x.ok { "ok" } @else { (x.error.as_deref().unwrap_or("failed")) } },
                                None => "—",
                            } }
                            @if can_write(s, &p.org) { td {
                                (row_action("DELETE", &format!("{cpath}/{}", enc(&c.id)), "Remove", &format!("the check of {}", c.url), None))
                            } }
                        } } }
                    } },
                }
                @if can_write(s, &p.org) {
                    details {
                        summary { "Add a check" }
                        (action("POST", &cpath, "reload", "Add check", html! {
                            label for="hc-path" { "Path" }
                            input #hc-path name="path" value="/" required autocomplete="off";
                            label for="hc-status" { "Expected status" }
                            input #hc-status name="expected_status" type="number" min="100" max="599" value="200" data-number;
                            label for="hc-body" { "Body contains (optional)" }
                            input #hc-body name="body_contains" autocomplete="off";
                            label for="hc-interval" { "Every (seconds, 10 or more)" }
                            input #hc-interval name="interval_secs" type="number" min="10" max="3600" value="60" data-number;
                        }))
                        p.cli { span { "API " } code { "POST " (cpath) } }
                    }
                }
            }
            section aria-labelledby="settings-h" {
                h2 #settings-h { "Settings" }
                dl.facts {
                    dt { "Regions" } dd { @if p.regions.is_empty() { "all" } @else { (p.regions.join(", ")) } }
                    dt { "Instances per region" } dd { (p.instances_per_region) }
                    dt { "Resources" } dd { (p.resources.vcpu) " vCPU, " (p.resources.memory) " MiB" }
                    dt { "Port" } dd { (p.port) }
                    dt { "Repository" } dd { (p.github_repo.as_deref().unwrap_or("—")) " (" (p.branch) ")" }
                    dt { "Custom domains point at" } dd { code { (d.cname) } }
                }
                (cli(&format!("zeitwork projects update {full} --help")))
            }
        },
    )
}

// ------------------------------------------------------------------ deployment

#[derive(Debug)]
pub struct DeploymentPage {
    pub deployment: Deployment,
    pub instances: Vec<Instance>,
    /// Audit events about this deployment.
    pub events: Vec<Event>,
    /// The project's active deployment per environment.
    pub serving: BTreeMap<String, String>,
    /// Its build, when it was built from source.
    pub build: Option<Build>,
}

pub fn deployment(s: &Session, p: &DeploymentPage) -> Markup {
    let d = &p.deployment;
    let full = format!("{}/{}", d.org, d.project);
    let env = d.environment.as_str();
    let serving_here = p.serving.get(env) == Some(&d.id);
    // What a rollback can route to: running, asleep, or retired (deployed again from its image).
    let can_serve = matches!(
        d.status,
        DeploymentStatus::Ready
            | DeploymentStatus::Active
            | DeploymentStatus::Standby
            | DeploymentStatus::Sleeping
            | DeploymentStatus::Waking
            | DeploymentStatus::Retired
    );
    let stream = format!("{}&deployment={}", project_stream(&d.org, &d.project), enc(&d.id));
    let mut events = p.events.clone();
    events.sort_by_key(|e| e.at);
    layout(
        s,
        &d.id,
        &stream,
        html! {
            p.crumbs { a href={ "/projects/" (enc(&d.org)) "/" (enc(&d.project)) } { (full) } " › deployment" }
            h1 { (d.id) " " span aria-live="polite" { (status(&d.id, d.status.as_str())) } }
            @if let Some(r) = &d.reason { p.reason { (r) } }
            dl.facts {
                dt { "Environment" } dd { (env) @if serving_here { " (serving)" } }
                dt { "Image" } dd { code { (d.image) } }
                @if let Some(dg) = &d.image_digest { dt { "Digest" } dd { code.wrap { (dg) } } }
                dt { "Commit" } dd { (short_sha(&d.commit_sha)) " " (d.commit_message.as_deref().unwrap_or("")) }
                dt { "Who" } dd { (d.created_by.as_deref().unwrap_or("—")) }
                dt { "URL" } dd { a href=(d.url) { (d.url) } }
                dt { "Created" } dd { (time(d.created_at)) }
            }
            @if can_write(s, &d.org) {
                section aria-labelledby="actions-h" .actions {
                    h2 #actions-h { "Actions" }
                    @if serving_here {
                        p.muted { "This deployment serves " (env) ". To stop it, roll back to or deploy another first." }
                    }
                    div.row {
                        @if can_serve && !serving_here { div {
                            (action("POST", &format!("/api/v1/projects/{}/{}/rollback", enc(&d.org), enc(&d.project)), "reload",
                                "Roll back to this", html! {
                                input type="hidden" name="to" value=(d.id);
                                input type="hidden" name="environment" value=(env);
                            }))
                            (cli(&format!("zeitwork rollback {full} --to {} --environment {env}", d.id)))
                        } }
                        @if serving_here {
                            div {
                                (action("POST", &format!("/api/v1/projects/{}/{}/promote", enc(&d.org), enc(&d.project)), "reload",
                                    "Promote", html! {
                                    input type="hidden" name="from" value=(env);
                                    label for="pr-to" { "to" }
                                    select #pr-to name="to" {
                                        @for e in ENVIRONMENTS.iter().filter(|e| **e != env) { option value=(e) { (e) } }
                                    }
                                }))
                                (cli(&format!("zeitwork promote {full} --from {env} --to ENVIRONMENT")))
                            }
                        }
                        @if !serving_here && d.status != DeploymentStatus::Retired { div {
                            (row_action("POST", &format!("/api/v1/deployments/{}/stop", enc(&d.id)), "Stop", &d.id, Some("Stop this deployment? Its instances end.")))
                            (cli(&format!("zeitwork deployments stop {}", d.id)))
                        } }
                    }
                }
            }
            section aria-labelledby="timeline-h" {
                h2 #timeline-h { "Timeline" }
                ol #timeline .timeline data-deployment=(d.id) data-last=(d.status.as_str()) {
                    li { (time(d.created_at)) " created " span.muted { "by " (d.created_by.as_deref().unwrap_or("—")) } }
                    @for e in &events {
                        li { (time(e.at)) " " (e.action) " " span.muted { "by " (e.actor) " (" (e.result) ")" } }
                    }
                    li { (time(d.updated_at)) " " (d.status.as_str()) @if let Some(r) = &d.reason { " — " (r) } }
                }
            }
            section #instances-section aria-labelledby="instances-h" data-refresh {
                h2 #instances-h { "Instances" }
                @if p.instances.is_empty() { p.empty { "No instances." } } @else {
                    div.scroll { table #instances {
                        thead { tr {
                            th scope="col" { "Instance" } th scope="col" { "Region" } th scope="col" { "Node" }
                            th scope="col" { "Status" } th scope="col" { "Ready since" } th scope="col" { "Exit" }
                        } }
                        tbody {
                            @for i in &p.instances {
                                tr {
                                    td { code { (i.id) } }
                                    td { (i.region) }
                                    td { (i.node.as_deref().unwrap_or("—")) }
                                    td { (status(&i.id, i.status.as_str())) }
                                    td { @if let Some(t) = i.ready_at { (time(t)) } @else { "—" } }
                                    td { (i.exit_reason.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    } }
                }
                (cli(&format!("zeitwork deployments instances {}", d.id)))
            }
            section aria-labelledby="metrics-h" {
                h2 #metrics-h { "Memory" }
                figure.spark {
                    svg #spark viewBox="0 0 300 40" role="img" aria-label="memory use over the last minutes"
                        data-metrics={ "/api/v1/deployments/" (enc(&d.id)) "/metrics" } {}
                    figcaption #spark-now { "measuring…" }
                }
                (cli(&format!("zeitwork deployments metrics {}", d.id)))
            }
            section aria-labelledby="build-h" {
                h2 #build-h { "Build" }
                @match &p.build {
                    None => p.muted { "Deployed from the image " code { (d.image) } "; no build ran." },
                    Some(b) => {
                        dl.facts {
                            dt { "Status" } dd { span.status.{"s-" (b.status)} #build-status { (b.status) } }
                            dt { "Source" } dd { code { (b.source) } }
                            dt { "Dockerfile" } dd { code { (b.dockerfile) } @if let Some(t) = &b.target { " (stage " (t) ")" } }
                            @if let Some(ms) = b.duration_ms { dt { "Took" } dd { (ms / 1000) " s" } }
                            @if let Some(i) = &b.image { dt { "Image" } dd { code { (i) } } }
                            @if let Some(e) = &b.error { dt { "Error" } dd.error { (e) } }
                        }
                        pre #build-log .logs tabindex="0" aria-label="build log"
                            data-build={ "/api/v1/deployments/" (enc(&d.id)) "/build" } {}
                        (cli(&format!("zeitwork logs {} --build --follow", d.id)))
                    }
                }
            }
            section aria-labelledby="logs-h" {
                h2 #logs-h { "Logs" }
                pre #logs .logs tabindex="0" aria-label="live logs"
                    data-follow={ "/api/v1/deployments/" (enc(&d.id)) "/logs?follow=true&since=1d" } {}
                (cli(&format!("zeitwork logs {} --follow", d.id)))
            }
        },
    )
}

// ------------------------------------------------------------------ env vars

pub fn env_vars(s: &Session, org: &str, name: &str, vars: &[EnvVar]) -> Markup {
    let full = format!("{org}/{name}");
    let base = format!("/api/v1/projects/{}/{}/env", enc(org), enc(name));
    let write = can_write(s, org);
    layout(
        s,
        &format!("{full} · env vars"),
        &project_stream(org, name),
        html! {
            h1 { (full) }
            (project_nav(org, name, "Env vars"))
            h2 { "Environment variables" }
            p.muted { "Values are encrypted at rest. Changes apply to the next deployment." }
            @if vars.is_empty() { p.empty { "No variables." } } @else {
                div.scroll { table #env {
                    thead { tr { th scope="col" { "Key" } th scope="col" { "Value" } th scope="col" { "Updated" }
                        @if write { th scope="col" { span.sr { "Actions" } } } } }
                    tbody {
                        @for v in vars {
                            tr {
                                th scope="row" { code { (v.key) } }
                                td {
                                    @match (&v.value, write) {
                                        (Some(val), true) => {
                                            (action("PUT", &format!("{base}/{}", enc(&v.key)), "reload", "Save", html! {
                                                label.sr for={ "ev-" (v.key) } { "Value of " (v.key) }
                                                input id={ "ev-" (v.key) } name="value" value=(val) autocomplete="off";
                                            }))
                                        }
                                        (Some(val), false) => code { (val) },
                                        (None, _) => em.muted { "redacted" },
                                    }
                                }
                                td { (time(v.updated_at)) }
                                @if write {
                                    td { (row_action("DELETE", &format!("{base}/{}", enc(&v.key)), "Delete", &v.key, None)) }
                                }
                            }
                        }
                    }
                } }
            }
            @if write {
                h2 { "Add a variable" }
                (action("PUT", &format!("{base}/{{key}}"), "reload", "Add", html! {
                    label for="nv-key" { "Key" }
                    input #nv-key name="key" data-in="path" required pattern="[A-Za-z_][A-Za-z0-9_]*" autocomplete="off";
                    label for="nv-value" { "Value" }
                    input #nv-value name="value" autocomplete="off";
                }))
                (cli(&format!("zeitwork env set {full} KEY=VALUE")))
                h2 { "Paste a .env file" }
                form.action data-kind="dotenv" data-path=(base) data-then="reload" {
                    label for="dotenv" { "Lines of KEY=VALUE (comments and blank lines are skipped)" }
                    textarea #dotenv name="dotenv" rows="6" spellcheck="false" {}
                    button type="submit" { "Set all" }
                    p.error role="alert" hidden {}
                }
                (cli(&format!("zeitwork env set {full} KEY1=VALUE1 KEY2=VALUE2")))
                p.hint { "To remove one: " code { "zeitwork env unset " (full) " KEY" } }
            }
        },
    )
}

// ------------------------------------------------------------------ domains

pub fn domains(s: &Session, org: &str, name: &str, cname: &str, list: &[Domain]) -> Markup {
    let full = format!("{org}/{name}");
    let base = format!("/api/v1/projects/{}/{}/domains", enc(org), enc(name));
    let write = can_write(s, org);
    layout(
        s,
        &format!("{full} · domains"),
        &project_stream(org, name),
        html! {
            h1 { (full) }
            (project_nav(org, name, "Domains"))
            h2 { "Custom domains" }
            p { "Point a CNAME record of each domain at " code { (cname) } "; the certificate is issued once it resolves." }
            @if list.is_empty() { p.empty { "No custom domains." } } @else {
                div.scroll { table #domains {
                    thead { tr { th scope="col" { "Domain" } th scope="col" { "Environment" } th scope="col" { "DNS record to set" }
                        th scope="col" { "Verified" } th scope="col" { "Certificate" } @if write { th scope="col" { span.sr { "Actions" } } } } }
                    tbody {
                        @for d in list {
                            tr {
                                th scope="row" { (d.name) }
                                td { (d.environment.as_str()) }
                                td { code { (d.name) " CNAME " (cname) } }
                                td { @if d.verified { "yes" } @else { "not yet" } }
                                td { span.status.{"s-" (d.certificate)} { (d.certificate) } }
                                @if write { td { (row_action("DELETE", &format!("{base}/{}", enc(&d.name)), "Remove", &d.name, None)) } }
                            }
                        }
                    }
                } }
            }
            @if write {
                h2 { "Add a domain" }
                (action("POST", &base, "reload", "Add domain", html! {
                    label for="nd-name" { "Domain" }
                    input #nd-name name="name" required placeholder="www.example.com" autocomplete="off";
                    label for="nd-env" { "Environment" }
                    select #nd-env name="environment" { @for e in ENVIRONMENTS { option value=(e) { (e) } } }
                }))
                (cli(&format!("zeitwork domains add {full} DOMAIN --environment production")))
                p.hint { "To remove one: " code { "zeitwork domains remove " (full) " DOMAIN" } }
            }
        },
    )
}

// ------------------------------------------------------------------ members and tokens

pub fn settings(
    s: &Session,
    members: &[(String, Result<Vec<Member>, ReadError>)],
    tokens: Result<Vec<Token>, ReadError>,
) -> Markup {
    layout(
        s,
        "Members & tokens",
        "/api/v1/events/stream",
        html! {
            h1 { "Members & tokens" }
            @for (org, list) in members {
                section {
                    h2 { "Members of " (org) }
                    @match list {
                        Err(e) => p.muted { (e.message) },
                        Ok(list) => {
                            div.scroll { table {
                                thead { tr { th scope="col" { "User" } th scope="col" { "Role" } th scope="col" { "Since" }
                                    @if can_admin(s, org) { th scope="col" { span.sr { "Actions" } } } } }
                                tbody { @for m in list { tr {
                                    th scope="row" { (m.user) } td { (m.role.as_str()) } td { (time(m.created_at)) }
                                    @if can_admin(s, org) { td {
                                        (row_action("DELETE", &format!("/api/v1/orgs/{}/members?user={}", enc(org), enc(&m.user)), "Remove", &m.user, None))
                                    } }
                                } } }
                            } }
                        }
                    }
                    @if can_admin(s, org) {
                        (action("POST", &format!("/api/v1/orgs/{}/members", enc(org)), "reload", "Add member", html! {
                            label for={ "am-user-" (org) } { "User (e-mail or name)" }
                            input id={ "am-user-" (org) } name="user" required autocomplete="off";
                            label for={ "am-role-" (org) } { "Role" }
                            select id={ "am-role-" (org) } name="role" {
                                // Only an Owner grants Owner.
                                @for r in [Role::Guest, Role::Developer, Role::Admin, Role::Owner] {
                                    @if r < Role::Owner || role(s, org) == Some(Role::Owner) { option value=(r.as_str()) { (r.as_str()) } }
                                }
                            }
                        }))
                        (cli(&format!("zeitwork orgs add-member {org} USER --role ROLE")))
                        p.hint { "To remove one: " code { "zeitwork orgs remove-member " (org) " USER" } }
                    }
                }
            }
            section {
                h2 { "Tokens" }
                @match &tokens {
                    Err(e) => p.muted { (e.message) },
                    Ok(list) => {
                        div.scroll { table #tokens {
                            thead { tr { th scope="col" { "Name" } th scope="col" { "Id" } th scope="col" { "Scope" }
                                th scope="col" { "Read-only" } th scope="col" { "Expires" } th scope="col" { span.sr { "Actions" } } } }
                            tbody { @for t in list {
                                @let scope = match &t.scope {
                                    TokenScope::Admin => "platform admin".to_owned(),
                                    TokenScope::Org { org, role } => format!("{} of {org}", role.as_str()),
                                    TokenScope::Cluster { role } => format!("cluster {}", role.as_str()),
                                };
                                // An operator's own token towards node agents is renewed only every 12 hours: revoking it breaks logs.
                                @let revocable = match &t.scope {
                                    TokenScope::Org { org, .. } => can_admin(s, org),
                                    TokenScope::Cluster { role: zeitwork_api_types::ClusterRole::Operator } => false,
                                    _ => s.caller.is_admin() && !s.caller.read_only,
                                };
                                tr {
                                    th scope="row" { (t.name) } td { code { (t.id) } } td { (scope) }
                                    td { @if t.read_only { "yes" } @else { "no" } }
                                    td {
                                        @if let Some(e) = t.expires_at {
                                            @if e < Utc::now() { span.status.s-failed { "expired" } " " }
                                            (time(e))
                                        } @else { "never" }
                                    }
                                    td { @if revocable && t.id != s.caller.token_id {
                                        (row_action("DELETE", &format!("/api/v1/tokens/{}", enc(&t.id)), "Revoke", &t.name, Some("Revoke this token? Whatever uses it stops working.")))
                                    } }
                                }
                            } }
                        } }
                        (cli("zeitwork tokens delete ID"))
                    }
                }
                @let admin_orgs: Vec<&String> = members.iter().map(|(o, _)| o).filter(|o| can_admin(s, o)).collect();
                @if !admin_orgs.is_empty() {
                    h3 { "Create a token" }
                    (action("POST", "/api/v1/tokens", "secret", "Create token", html! {
                        input type="hidden" name="scope.kind" value="org";
                        label for="nt-name" { "Name" }
                        input #nt-name name="name" required autocomplete="off";
                        label for="nt-org" { "Organisation" }
                        select #nt-org name="scope.org" { @for o in &admin_orgs { option value=(o) { (o) } } }
                        label for="nt-role" { "Role" }
                        select #nt-role name="scope.role" { @for r in ["guest", "developer", "admin"] { option value=(r) { (r) } } }
                        label.check { input type="checkbox" name="read_only"; " Read-only" }
                        label for="nt-days" { "Expires in days (optional)" }
                        input #nt-days name="expires_in_days" type="number" min="1" data-number;
                    }))
                    output #secret .secret hidden {}
                    (cli("zeitwork tokens create NAME --org ORG --role ROLE"))
                }
            }
        },
    )
}

// ------------------------------------------------------------------ audit log

pub fn audit(s: &Session, f: &AuditFilter, events: Result<Vec<Event>, ReadError>) -> Markup {
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    layout(
        s,
        "Audit log",
        "/api/v1/events/stream",
        html! {
            h1 { "Audit log" }
            form.filters method="get" action="/audit" {
                label for="f-org" { "Organisation" } input #f-org name="org" value=(v(&f.org));
                label for="f-project" { "Project" } input #f-project name="project" value=(v(&f.project));
                label for="f-action" { "Action" } input #f-action name="action" value=(v(&f.action)) placeholder="deployment.create";
                label for="f-result" { "Result" }
                select #f-result name="result" {
                    @for (val, label) in [("", "any"), ("ok", "ok"), ("denied", "denied")] {
                        @if f.result.as_deref().unwrap_or("") == val { option value=(val) selected { (label) } }
                        @else { option value=(val) { (label) } }
                    }
                }
                button type="submit" { "Filter" }
            }
            (cli("zeitwork events list --org ORG"))
            @match events {
                Err(e) => p.error role="alert" { (e.message) },
                Ok(list) if list.is_empty() => p.empty { "No events match." },
                Ok(list) => div.scroll { table #audit {
                    thead { tr { th scope="col" { "When" } th scope="col" { "Who" } th scope="col" { "Action" }
                        th scope="col" { "Target" } th scope="col" { "Result" } th scope="col" { "Detail" } } }
                    tbody { @for e in &list { tr {
                        td { (time(e.at)) } td { (e.actor) } td { code { (e.action) } } td { (e.target) }
                        td { span.{"r-" (e.result)} { (e.result) } }
                        td { @if let Some(d) = &e.detail { code.wrap { (d.to_string()) } } }
                    } } }
                } },
            }
        },
    )
}
