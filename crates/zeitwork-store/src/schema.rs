//! Versioned schema migrations. Each migration runs once, in its own
//! transaction, and is recorded in `schema_migrations`; re-running is a no-op.
//! PostgreSQL operators starting together serialise on an advisory lock.

use sqlx::{AnyPool, Row};

use crate::{now_ms, Dialect, StoreError};

/// (version, name, SQL). `{{text_key}}` is a text column that takes part in
/// ordering and cursors: byte-wise collation on both backends.
/// `{{serial}}` is an auto-incrementing 64-bit primary key.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        r#"
CREATE TABLE regions (
    id TEXT PRIMARY KEY,
    code {{text_key}} NOT NULL UNIQUE,
    name TEXT NOT NULL,
    country TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    hostname {{text_key}} NOT NULL UNIQUE,
    region TEXT NOT NULL REFERENCES regions(code),
    address TEXT NOT NULL,
    status TEXT NOT NULL,
    vcpu BIGINT NOT NULL,
    memory BIGINT NOT NULL,
    runtime TEXT NOT NULL,
    last_heartbeat BIGINT,
    created_at BIGINT NOT NULL
);
CREATE TABLE orgs (
    id TEXT PRIMARY KEY,
    slug {{text_key}} NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE members (
    org_id TEXT NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    user_name {{text_key}} NOT NULL,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, user_name)
);
CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    name {{text_key}} NOT NULL,
    github_repo TEXT,
    branch TEXT NOT NULL,
    auto_deploy BIGINT NOT NULL,
    port BIGINT NOT NULL,
    vcpu BIGINT NOT NULL,
    memory BIGINT NOT NULL,
    instances_per_region BIGINT NOT NULL,
    regions TEXT NOT NULL,
    image_template TEXT,
    rate_limit TEXT,
    current_deployments TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (org_id, name)
);
CREATE TABLE env_vars (
    project_id TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    key {{text_key}} NOT NULL,
    value_enc TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (project_id, key)
);
CREATE TABLE domains (
    name {{text_key}} PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    environment TEXT NOT NULL,
    verified BIGINT NOT NULL,
    certificate TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE deployments (
    id {{text_key}} PRIMARY KEY,
    project_id TEXT NOT NULL,
    org TEXT NOT NULL,
    project TEXT NOT NULL,
    environment TEXT NOT NULL,
    image TEXT NOT NULL,
    image_digest TEXT,
    commit_sha TEXT,
    commit_message TEXT,
    instances_per_region BIGINT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    url TEXT NOT NULL,
    created_by TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX deployments_project ON deployments (org, project, created_at);
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    deployment_id TEXT NOT NULL,
    node_id TEXT,
    region TEXT NOT NULL,
    address TEXT,
    status TEXT NOT NULL,
    runtime TEXT,
    vcpu BIGINT NOT NULL,
    memory BIGINT NOT NULL,
    started_at BIGINT,
    ready_at BIGINT,
    exit_code BIGINT,
    exit_reason TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX instances_node ON instances (node_id);
CREATE TABLE events (
    id {{serial}},
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    org TEXT,
    project TEXT,
    result TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX events_org ON events (org, id);
CREATE TABLE tokens (
    id {{text_key}} PRIMARY KEY,
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    scope_kind TEXT NOT NULL,
    scope_org TEXT,
    scope_role TEXT,
    read_only BIGINT NOT NULL,
    created_by TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);
CREATE TABLE bootstrap (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"#,
    ),
    (
        2,
        "certificates",
        r#"
CREATE TABLE certificates (
    domain {{text_key}} PRIMARY KEY,
    state TEXT NOT NULL,
    cert_pem TEXT,
    key_enc TEXT,
    not_after BIGINT,
    error TEXT,
    lease_holder TEXT,
    lease_until BIGINT,
    updated_at BIGINT NOT NULL
);
CREATE TABLE acme_challenges (
    token {{text_key}} PRIMARY KEY,
    domain TEXT NOT NULL,
    key_authorization TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX acme_challenges_domain ON acme_challenges (domain, created_at)
"#,
    ),
    (
        3,
        "image archives",
        r#"
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE blob_chunks (
    digest TEXT NOT NULL,
    seq BIGINT NOT NULL,
    data {{blob}} NOT NULL,
    PRIMARY KEY (digest, seq)
);
CREATE TABLE archives (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    blobs TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_by TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (org, name, manifest_digest)
)
"#,
    ),
    (
        4,
        "drain and leases",
        r#"
ALTER TABLE instances ADD COLUMN replaced_by TEXT;
ALTER TABLE instances ADD COLUMN stop_after BIGINT;
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until BIGINT NOT NULL
)
"#,
    ),
    (
        5,
        "github intake",
        r#"
CREATE TABLE github_hooks (
    repo {{text_key}} PRIMARY KEY,
    events TEXT NOT NULL,
    secret_enc TEXT NOT NULL,
    created_by TEXT,
    created_at BIGINT NOT NULL
);
CREATE TABLE github_deliveries (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    event TEXT NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT NOT NULL,
    git_ref TEXT,
    sha TEXT,
    deployments TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX github_deliveries_repo ON github_deliveries (repo, received_at)
"#,
    ),
    (
        6,
        "edge proxies",
        r#"
CREATE TABLE edges (
    name {{text_key}} PRIMARY KEY,
    http_address TEXT,
    https_address TEXT,
    last_seen BIGINT NOT NULL
)
"#,
    ),
    (7, "node runtime detail", "ALTER TABLE nodes ADD COLUMN runtime_detail TEXT"),
    (
        8,
        "tenant isolation",
        r#"
CREATE TABLE hosts (
    label {{text_key}} PRIMARY KEY,
    project_id TEXT NOT NULL,
    kind TEXT NOT NULL
);
CREATE INDEX hosts_project ON hosts (project_id);
INSERT INTO hosts (label, project_id, kind)
    SELECT id, project_id, 'deployment' FROM deployments WHERE true ORDER BY created_at
    ON CONFLICT DO NOTHING;
INSERT INTO hosts (label, project_id, kind)
    SELECT p.name || '-' || o.slug, p.id, 'project' FROM projects p JOIN orgs o ON o.id = p.org_id WHERE true
    ORDER BY p.created_at ON CONFLICT DO NOTHING;
CREATE TABLE github_hooks_by_org (
    org {{text_key}} NOT NULL,
    repo {{text_key}} NOT NULL,
    events TEXT NOT NULL,
    secret_enc TEXT NOT NULL,
    created_by TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org, repo)
);
INSERT INTO github_hooks_by_org (org, repo, events, secret_enc, created_by, created_at)
    SELECT MIN(o.slug), h.repo, h.events, h.secret_enc, h.created_by, h.created_at
    FROM github_hooks h JOIN projects p ON p.github_repo = h.repo JOIN orgs o ON o.id = p.org_id
    GROUP BY h.repo, h.events, h.secret_enc, h.created_by, h.created_at
    HAVING COUNT(DISTINCT o.slug) = 1;
DROP TABLE github_hooks;
ALTER TABLE github_hooks_by_org RENAME TO github_hooks;
CREATE TABLE github_deliveries_by_org (
    org {{text_key}} NOT NULL,
    id TEXT NOT NULL,
    repo TEXT NOT NULL,
    event TEXT NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT NOT NULL,
    git_ref TEXT,
    sha TEXT,
    deployments TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (org, id)
);
INSERT INTO github_deliveries_by_org (org, id, repo, event, status, outcome, git_ref, sha, deployments, received_at)
    SELECT COALESCE((SELECT h.org FROM github_hooks h WHERE h.repo = d.repo), ''), d.id, d.repo, d.event, d.status,
        d.outcome, d.git_ref, d.sha, d.deployments, d.received_at
    FROM github_deliveries d;
DROP TABLE github_deliveries;
ALTER TABLE github_deliveries_by_org RENAME TO github_deliveries;
CREATE INDEX github_deliveries_org_repo ON github_deliveries (org, repo, received_at)
"#,
    ),
    (
        9,
        "shared capacity and sleeping deployments",
        r#"
ALTER TABLE nodes ADD COLUMN physical_vcpu BIGINT;
ALTER TABLE nodes ADD COLUMN physical_memory BIGINT;
ALTER TABLE projects ADD COLUMN sleep_after_secs BIGINT NOT NULL DEFAULT 900;
ALTER TABLE projects ADD COLUMN retain_deployments BIGINT NOT NULL DEFAULT 20;
ALTER TABLE deployments ADD COLUMN last_request_at BIGINT;
ALTER TABLE deployments ADD COLUMN woken_at BIGINT;
ALTER TABLE deployments ADD COLUMN wake_for TEXT;
CREATE INDEX deployments_status ON deployments (status, updated_at);
CREATE INDEX instances_deployment ON instances (deployment_id)
"#,
    ),
    (10, "node credentials", "ALTER TABLE tokens ADD COLUMN node_id TEXT"),
    (
        11,
        "autoscaling",
        r#"
ALTER TABLE projects ADD COLUMN scaling TEXT;
ALTER TABLE deployments ADD COLUMN scale_target BIGINT
"#,
    ),
    (
        12,
        "notifications and outbox",
        r#"
CREATE TABLE notification_channels (
    id TEXT PRIMARY KEY,
    org {{text_key}} NOT NULL,
    project {{text_key}},
    kind TEXT NOT NULL,
    target_enc TEXT NOT NULL,
    secret_enc TEXT,
    events TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX notification_channels_org ON notification_channels (org, project);
CREATE TABLE outbox (
    id {{serial}},
    channel_id TEXT NOT NULL,
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_at BIGINT NOT NULL,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    delivered_at BIGINT
);
CREATE INDEX outbox_channel ON outbox (channel_id, status, id)
"#,
    ),
    (
        13,
        "builds from source and previews",
        r#"
CREATE TABLE sources (
    org {{text_key}} NOT NULL,
    digest {{text_key}} NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org, digest)
);
CREATE TABLE builds (
    id {{text_key}} PRIMARY KEY,
    org TEXT NOT NULL,
    project TEXT NOT NULL,
    status TEXT NOT NULL,
    node_id TEXT,
    spec TEXT NOT NULL,
    secrets_enc TEXT,
    log TEXT NOT NULL,
    image TEXT,
    error TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    heartbeat_at BIGINT
);
CREATE INDEX builds_status ON builds (status, created_at);
ALTER TABLE deployments ADD COLUMN pull_request BIGINT;
ALTER TABLE deployments ADD COLUMN build_ms BIGINT;
ALTER TABLE projects ADD COLUMN staging_branch TEXT;
ALTER TABLE projects ADD COLUMN tag_pattern TEXT;
ALTER TABLE projects ADD COLUMN build TEXT;
ALTER TABLE github_hooks ADD COLUMN token_enc TEXT
"#,
    ),
    (
        14,
        "console sessions",
        r#"
CREATE TABLE console_sessions (
    id_hash {{text_key}} PRIMARY KEY,
    token_id TEXT NOT NULL,
    csrf TEXT NOT NULL,
    owns_token BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at)
"#,
    ),
    (
        15,
        "uptime checks",
        r#"
CREATE TABLE health_checks (
    id {{text_key}} PRIMARY KEY,
    project_id TEXT NOT NULL,
    org TEXT NOT NULL,
    project TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    fails BIGINT NOT NULL,
    passes BIGINT NOT NULL,
    next_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX health_checks_project ON health_checks (org, project);
CREATE TABLE health_samples (
    id {{serial}},
    check_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    region TEXT NOT NULL,
    ok BIGINT NOT NULL,
    status BIGINT,
    latency_ms BIGINT NOT NULL,
    error TEXT
);
CREATE INDEX health_samples_check ON health_samples (check_id, at)
"#,
    ),
    (
        16,
        "releases: automatic rollback and canary rollouts",
        r#"
ALTER TABLE projects ADD COLUMN auto_rollback TEXT;
ALTER TABLE projects ADD COLUMN rollout TEXT;
ALTER TABLE deployments ADD COLUMN rollout TEXT;
CREATE TABLE traffic_samples (
    deployment_id {{text_key}} NOT NULL,
    edge {{text_key}} NOT NULL,
    period BIGINT NOT NULL,
    at BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    latency TEXT NOT NULL,
    PRIMARY KEY (deployment_id, edge, period)
);
CREATE INDEX traffic_samples_at ON traffic_samples (at);
CREATE TABLE rollouts (
    deployment_id {{text_key}} PRIMARY KEY,
    project_id TEXT NOT NULL,
    org TEXT NOT NULL,
    project TEXT NOT NULL,
    environment TEXT NOT NULL,
    baseline TEXT,
    state TEXT NOT NULL,
    steps TEXT NOT NULL,
    step_secs BIGINT NOT NULL,
    step BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    step_started_at BIGINT NOT NULL,
    activated_at BIGINT,
    watch_until BIGINT,
    reason TEXT,
    analysis TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX rollouts_state ON rollouts (state)
"#,
    ),
    (
        17,
        "skew protection and release commands",
        r#"
ALTER TABLE projects ADD COLUMN skew_protection TEXT;
ALTER TABLE projects ADD COLUMN release_command TEXT;
ALTER TABLE deployments ADD COLUMN release_command TEXT;
ALTER TABLE deployments ADD COLUMN migration BIGINT NOT NULL DEFAULT 0;
ALTER TABLE deployments ADD COLUMN served TEXT;
UPDATE deployments SET served = environment WHERE status IN ('active', 'standby', 'sleeping', 'waking', 'retired')
"#,
    ),
    (
        18,
        "regions insertable by hand",
        // The operations guide adds regions with plain SQL that names only
        // id, name, code and country. SQLite cannot change a column's default
        // in place; the guide's SQL is PostgreSQL's there too (gen_random_uuid).
        "/*postgres*/ ALTER TABLE regions ALTER COLUMN created_at SET DEFAULT \
         ((extract(epoch FROM clock_timestamp()) * 1000)::BIGINT)",
    ),
    (
        19,
        "releases: shadow traffic",
        r#"
ALTER TABLE projects ADD COLUMN shadow TEXT;
ALTER TABLE deployments ADD COLUMN shadow TEXT
"#,
    ),
    (
        21,
        "private project networks",
        // A network per project and environment (its index picks the prefix
        // out of the operator's private range) and a host number per live
        // instance in it; both stay as long as they are used.
        r#"
CREATE TABLE project_networks (
    project_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    idx BIGINT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (project_id, environment)
);
CREATE TABLE private_addresses (
    network BIGINT NOT NULL,
    host BIGINT NOT NULL,
    instance_id TEXT NOT NULL UNIQUE,
    PRIMARY KEY (network, host)
);
ALTER TABLE projects ADD COLUMN egress TEXT
"#,
    ),
    // The token a custom domain's `_zeitwork-challenge` TXT record must hold before it
    // is routed; domains added before have none and keep the address check alone.
    (22, "domains: ownership challenge", "ALTER TABLE domains ADD COLUMN challenge TEXT"),
    (
        23,
        "domains: competing unverified claims",
        // A name may be claimed by several projects until one proves it owns it;
        // only one verified row per name. Rebuilt, since SQLite cannot change a
        // primary key in place.
        r#"
CREATE TABLE domains_claims (
    name {{text_key}} NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    environment TEXT NOT NULL,
    verified BIGINT NOT NULL,
    certificate TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    challenge TEXT,
    PRIMARY KEY (name, project_id)
);
INSERT INTO domains_claims (name, project_id, environment, verified, certificate, created_at, challenge)
    SELECT name, project_id, environment, verified, certificate, created_at, challenge FROM domains;
DROP TABLE domains;
ALTER TABLE domains_claims RENAME TO domains;
CREATE UNIQUE INDEX domains_verified_name ON domains (name) WHERE verified = 1;
CREATE INDEX domains_unverified_age ON domains (created_at) WHERE verified = 0
"#,
    ),
    // An organisation's own log drains: destination and token encrypted by the control plane.
    (
        24,
        "organisation log drains",
        r#"
CREATE TABLE log_drains (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    kind TEXT NOT NULL,
    target_enc TEXT NOT NULL,
    token_enc TEXT,
    ca TEXT,
    sources TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX log_drains_org ON log_drains (org)
"#,
    ),
    // A node's end of the tunnel that carries private project networks between
    // nodes: its WireGuard public key and UDP endpoint, sent at registration.
    (
        25,
        "nodes: tunnel key and endpoint",
        "ALTER TABLE nodes ADD COLUMN tunnel_public_key TEXT;
ALTER TABLE nodes ADD COLUMN tunnel_endpoint TEXT",
    ),
    // What instances used, from samples of the node agents' measurements: one row per
    // instance (kept after it is gone), CPU time added up across restarts of its counter.
    (
        27,
        "instance usage",
        r#"
CREATE TABLE instance_usage (
    instance_id TEXT PRIMARY KEY,
    org {{text_key}} NOT NULL,
    project TEXT NOT NULL,
    deployment_id TEXT NOT NULL,
    cpu_ms BIGINT NOT NULL,
    cpu_counter_ms BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    since_at BIGINT NOT NULL,
    last_at BIGINT NOT NULL,
    samples BIGINT NOT NULL
);
CREATE INDEX instance_usage_org ON instance_usage (org)
"#,
    ),
    // The routing table applies a change by reading the routes of the projects it
    // touched: their deployments and domains by project, not by scanning every row.
    (
        28,
        "routing reads by project",
        r#"
CREATE INDEX deployments_project_id ON deployments (project_id);
CREATE INDEX domains_project ON domains (project_id)
"#,
    ),
    // The deployment engine's set-based reads answered from indexes alone:
    // instances counted per deployment, region and status, what the live
    // instances on each node hold, and the instances whose drain grace ends;
    // nodes by status (down, draining). The two older single-column indexes
    // are prefixes of the new ones.
    (
        29,
        "engine: covering indexes for instance counts and node allocations",
        r#"
CREATE INDEX instances_deployment_region_status ON instances (deployment_id, region, status);
CREATE INDEX instances_node_holds ON instances (node_id, status, vcpu, memory);
CREATE INDEX instances_stopping ON instances (stop_after) WHERE status = 'stopping';
CREATE INDEX nodes_status ON nodes (status);
DROP INDEX instances_deployment;
DROP INDEX instances_node
"#,
    ),
    // Deployment lists are newest first: walked through this index they read
    // one page of rows instead of sorting every deployment on each call.
    (
        30,
        "deployment lists newest first by index",
        r#"
CREATE INDEX deployments_created ON deployments (created_at, id)
"#,
    ),
    // What the live instances on each node hold is kept with the node instead
    // of summed over every instance on each placement. Triggers on `instances`
    // append each change as a delta to `node_holds_pending` (inserts only: no
    // lock on the node's row, so concurrent writers never wait on or deadlock
    // over it); readers add the pending deltas to the node's columns, and the
    // engine folds them into the columns now and then.
    (
        31,
        "what each node holds, kept by triggers",
        r#"
ALTER TABLE nodes ADD COLUMN held_instances BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN held_vcpu BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN held_memory BIGINT NOT NULL DEFAULT 0;
CREATE TABLE node_holds_pending (
    seq {{serial}},
    node_id TEXT NOT NULL,
    instances BIGINT NOT NULL,
    vcpu BIGINT NOT NULL,
    memory BIGINT NOT NULL
);
CREATE INDEX node_holds_pending_node ON node_holds_pending (node_id);
UPDATE nodes SET
    held_instances = (SELECT COUNT(*) FROM instances i WHERE i.node_id = nodes.id AND i.status NOT IN ('stopped', 'failed', 'exited')),
    held_vcpu = (SELECT COALESCE(SUM(i.vcpu), 0) FROM instances i WHERE i.node_id = nodes.id AND i.status NOT IN ('stopped', 'failed', 'exited')),
    held_memory = (SELECT COALESCE(SUM(i.memory), 0) FROM instances i WHERE i.node_id = nodes.id AND i.status NOT IN ('stopped', 'failed', 'exited'));
/*sqlite*/ CREATE TRIGGER instances_hold_insert AFTER INSERT ON instances
WHEN NEW.node_id IS NOT NULL AND NEW.status NOT IN ('stopped', 'failed', 'exited')
BEGIN
    INSERT INTO node_holds_pending (node_id, instances, vcpu, memory) VALUES (NEW.node_id, 1, NEW.vcpu, NEW.memory);
END;
/*sqlite*/ CREATE TRIGGER instances_hold_delete AFTER DELETE ON instances
WHEN OLD.node_id IS NOT NULL AND OLD.status NOT IN ('stopped', 'failed', 'exited')
BEGIN
    INSERT INTO node_holds_pending (node_id, instances, vcpu, memory) VALUES (OLD.node_id, -1, -OLD.vcpu, -OLD.memory);
END;
/*sqlite*/ CREATE TRIGGER instances_hold_update AFTER UPDATE OF node_id, status, vcpu, memory ON instances
WHEN OLD.node_id IS NOT NEW.node_id OR OLD.vcpu IS NOT NEW.vcpu OR OLD.memory IS NOT NEW.memory
    OR (OLD.status NOT IN ('stopped', 'failed', 'exited')) <> (NEW.status NOT IN ('stopped', 'failed', 'exited'))
BEGIN
    INSERT INTO node_holds_pending (node_id, instances, vcpu, memory)
        SELECT OLD.node_id, -1, -OLD.vcpu, -OLD.memory
        WHERE OLD.node_id IS NOT NULL AND OLD.status NOT IN ('stopped', 'failed', 'exited');
    INSERT INTO node_holds_pending (node_id, instances, vcpu, memory)
        SELECT NEW.node_id, 1, NEW.vcpu, NEW.memory
        WHERE NEW.node_id IS NOT NULL AND NEW.status NOT IN ('stopped', 'failed', 'exited');
END;
/*postgres*/ CREATE FUNCTION instances_hold() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_held BOOLEAN := FALSE;
    is_held BOOLEAN := FALSE;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        was_held := OLD.node_id IS NOT NULL AND OLD.status NOT IN ('stopped', 'failed', 'exited');
    END IF;
    IF TG_OP <> 'DELETE' THEN
        is_held := NEW.node_id IS NOT NULL AND NEW.status NOT IN ('stopped', 'failed', 'exited');
    END IF;
    IF TG_OP = 'UPDATE' AND was_held AND is_held AND OLD.node_id = NEW.node_id
        AND OLD.vcpu = NEW.vcpu AND OLD.memory = NEW.memory THEN
        RETURN NULL;
    END IF;
    IF was_held THEN
        INSERT INTO node_holds_pending (node_id, instances, vcpu, memory) VALUES (OLD.node_id, -1, -OLD.vcpu, -OLD.memory);
    END IF;
    IF is_held THEN
        INSERT INTO node_holds_pending (node_id, instances, vcpu, memory) VALUES (NEW.node_id, 1, NEW.vcpu, NEW.memory);
    END IF;
    RETURN NULL;
END
$$;
/*postgres*/ CREATE TRIGGER instances_hold AFTER INSERT OR DELETE OR UPDATE OF node_id, status, vcpu, memory
ON instances FOR EACH ROW EXECUTE FUNCTION instances_hold()
"#,
    ),
    // A column joined to a key in "C" collation compares in "C": its own index
    // (in the database's collation) was unusable for the join, so PostgreSQL
    // scanned every instance to find a few deployments' (77 ms instead of 5
    // at 200,000 instances). SQLite has one collation.
    (
        32,
        "columns joined to keys share their collation",
        r#"
/*postgres*/ ALTER TABLE instances ALTER COLUMN deployment_id TYPE TEXT COLLATE "C";
/*postgres*/ ALTER TABLE instance_usage ALTER COLUMN deployment_id TYPE TEXT COLLATE "C";
/*postgres*/ ALTER TABLE health_samples ALTER COLUMN check_id TYPE TEXT COLLATE "C"
"#,
    ),
];

/// Newest schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

pub(crate) async fn migrate(pool: &AnyPool, dialect: Dialect) -> Result<Vec<i64>, StoreError> {
    migrate_until(pool, dialect, latest_version()).await
}

/// Applies the migrations up to and including version `until`.
async fn migrate_until(pool: &AnyPool, dialect: Dialect, until: i64) -> Result<Vec<i64>, StoreError> {
    let mut tx = pool.begin().await?;
    if dialect == Dialect::Postgres {
        // Serialise concurrent operators; released at commit.
        sqlx::query("SELECT pg_advisory_xact_lock(7366428201)").execute(&mut *tx).await?;
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<i64, _>(0))
        .collect::<Result<_, _>>()?;
    if let Some(&newest) = applied.last() {
        if newest > latest_version() {
            return Err(StoreError::SchemaTooNew { found: newest, supported: latest_version() });
        }
    }
    let mut ran = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) || *version > until {
            continue;
        }
        let sql = render(sql, dialect);
        for statement in statements(&sql) {
            // Statements marked `/*postgres*/` or `/*sqlite*/` apply to that database only.
            let statement = match (statement.strip_prefix("/*postgres*/"), statement.strip_prefix("/*sqlite*/")) {
                (Some(_), _) if dialect == Dialect::Sqlite => continue,
                (_, Some(_)) if dialect == Dialect::Postgres => continue,
                (Some(rest), _) | (_, Some(rest)) => rest.trim(),
                (None, None) => statement,
            };
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
            .bind(*version)
            .bind(*name)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tracing::info!(version, name, "applied schema migration");
        ran.push(*version);
    }
    tx.commit().await?;
    Ok(ran)
}

/// The statements of a migration, split at `;` except inside a `$$`-quoted
/// function body or a trigger's `BEGIN … END`.
fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"$$") {
            quoted = !quoted;
            i += 2;
            continue;
        }
        if bytes[i] == b';' && !quoted {
            let statement = sql[start..i].trim();
            let upper = statement.to_ascii_uppercase();
            let in_trigger = upper.contains("CREATE TRIGGER") && upper.contains("BEGIN") && !upper.ends_with("END");
            if !in_trigger {
                out.push(statement);
                start = i + 1;
            }
        }
        i += 1;
    }
    out.push(sql[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

fn render(sql: &str, dialect: Dialect) -> String {
    match dialect {
        Dialect::Sqlite => sql
            .replace("{{text_key}}", "TEXT")
            .replace("{{serial}}", "INTEGER PRIMARY KEY AUTOINCREMENT")
            .replace("{{blob}}", "BLOB"),
        Dialect::Postgres => sql
            .replace("{{text_key}}", "TEXT COLLATE \"C\"")
            .replace("{{serial}}", "BIGSERIAL PRIMARY KEY")
            .replace("{{blob}}", "BYTEA"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exec(pool: &AnyPool, sql: &str) {
        sqlx::query(sql).execute(pool).await.unwrap();
    }

    /// A new SQLite database (in a directory kept while the first value lives)
    /// migrated up to and including `version`.
    async fn sqlite_at(version: i64) -> (tempfile::TempDir, AnyPool) {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("db").display());
        let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
        migrate_until(&pool, Dialect::Sqlite, version).await.unwrap();
        (dir, pool)
    }

    async fn texts(pool: &AnyPool, sql: &str) -> Vec<String> {
        sqlx::query(sql).fetch_all(pool).await.unwrap().iter().map(|r| r.try_get::<String, _>(0).unwrap()).collect()
    }

    #[test]
    fn statements_split_outside_function_bodies_and_trigger_blocks() {
        let sql = "CREATE TABLE a (x INT);\n\
            /*sqlite*/ CREATE TRIGGER t AFTER INSERT ON a BEGIN INSERT INTO b VALUES (1); INSERT INTO b VALUES (2); END;\n\
            /*postgres*/ CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;\n\
            CREATE TRIGGER u AFTER INSERT ON a FOR EACH ROW EXECUTE FUNCTION f();\n";
        assert_eq!(
            statements(sql),
            [
                "CREATE TABLE a (x INT)",
                "/*sqlite*/ CREATE TRIGGER t AFTER INSERT ON a BEGIN INSERT INTO b VALUES (1); INSERT INTO b VALUES (2); END",
                "/*postgres*/ CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
                "CREATE TRIGGER u AFTER INSERT ON a FOR EACH ROW EXECUTE FUNCTION f()",
            ]
        );
        assert_eq!(statements("SELECT 1"), ["SELECT 1"]);
        assert!(statements(" ; ;\n").is_empty());
    }

    /// Nodes upgraded to kept holds start from what their live instances hold;
    /// the triggers keep the count from there through moves, stops, inserts
    /// and deletes (the PostgreSQL triggers are run by the store suite).
    #[tokio::test]
    async fn node_holds_start_from_existing_instances_and_follow_changes() {
        let (_dir, pool) = sqlite_at(30).await;
        exec(&pool, "INSERT INTO regions VALUES ('r1', 'us-east', 'US East', 'US', 1)").await;
        exec(
            &pool,
            "INSERT INTO nodes (id, hostname, region, address, status, vcpu, memory, runtime, created_at) VALUES \
             ('n1', 'a', 'us-east', '10.0.0.1', 'ready', 8, 8192, 'runc', 1), \
             ('n2', 'b', 'us-east', '10.0.0.2', 'ready', 8, 8192, 'runc', 1), \
             ('n3', 'c', 'us-east', '10.0.0.3', 'ready', 8, 8192, 'runc', 1)",
        )
        .await;
        exec(
            &pool,
            "INSERT INTO instances (id, deployment_id, node_id, region, status, vcpu, memory, created_at) VALUES \
             ('i1', 'd', 'n1', 'us-east', 'ready', 1, 256, 1), ('i2', 'd', 'n1', 'us-east', 'stopped', 2, 512, 1), \
             ('i3', 'd', 'n2', 'us-east', 'pending', 2, 1024, 1), ('i4', 'd', NULL, 'us-east', 'pending', 1, 64, 1)",
        )
        .await;
        migrate(&pool, Dialect::Sqlite).await.unwrap();
        let held = "SELECT n.id || ' ' || (n.held_instances + COALESCE(SUM(p.instances), 0)) || ' ' || \
            (n.held_vcpu + COALESCE(SUM(p.vcpu), 0)) || ' ' || (n.held_memory + COALESCE(SUM(p.memory), 0)) \
            FROM nodes n LEFT JOIN node_holds_pending p ON p.node_id = n.id GROUP BY n.id ORDER BY n.id";
        assert_eq!(texts(&pool, held).await, ["n1 1 1 256", "n2 1 2 1024", "n3 0 0 0"]);
        exec(&pool, "UPDATE instances SET node_id = 'n2' WHERE id = 'i1'").await;
        exec(&pool, "UPDATE instances SET status = 'failed' WHERE id = 'i3'").await;
        exec(&pool, "INSERT INTO instances (id, deployment_id, node_id, region, status, vcpu, memory, created_at) VALUES ('i5', 'd', 'n1', 'us-east', 'starting', 4, 2048, 2)").await;
        exec(&pool, "UPDATE instances SET status = 'ready', address = '10.1.0.5:8080' WHERE id = 'i5'").await;
        exec(&pool, "UPDATE instances SET node_id = 'n3' WHERE id = 'i4'").await;
        exec(&pool, "DELETE FROM instances WHERE id IN ('i2', 'i3')").await;
        assert_eq!(texts(&pool, held).await, ["n1 1 4 2048", "n2 1 1 256", "n3 1 1 64"]);
        // A readiness change adds no delta.
        let pending = texts(&pool, "SELECT CAST(COUNT(*) AS TEXT) FROM node_holds_pending").await;
        exec(&pool, "UPDATE instances SET status = 'ready' WHERE id = 'i4'").await;
        assert_eq!(texts(&pool, "SELECT CAST(COUNT(*) AS TEXT) FROM node_holds_pending").await, pending);
    }

    /// Data written before addresses were reserved and webhooks owned keeps
    /// working for the rightful owner; what two organisations claimed is
    /// given to neither.
    #[tokio::test]
    async fn tenant_isolation_migration_keeps_owned_data_and_drops_contested_hooks() {
        let (_dir, pool) = sqlite_at(7).await;
        exec(&pool, "INSERT INTO orgs VALUES ('o1', 'corp', 'corp', 1), ('o2', 'acme-corp', 'acme-corp', 2), ('o3', 'solo', 'solo', 3)").await;
        for (id, org, name, repo, at) in [
            ("p1", "o1", "web-acme", "gh/shared", 1),
            ("p2", "o2", "web", "gh/shared", 2),
            ("p3", "o3", "site", "gh/own", 3),
        ] {
            exec(
                &pool,
                &format!(
                    "INSERT INTO projects (id, org_id, name, github_repo, branch, auto_deploy, port, vcpu, memory, \
                     instances_per_region, regions, current_deployments, created_at, updated_at) \
                     VALUES ('{id}', '{org}', '{name}', '{repo}', 'main', 1, 8080, 1, 256, 1, '[]', '{{}}', {at}, {at})"
                ),
            )
            .await;
        }
        exec(
            &pool,
            "INSERT INTO github_hooks VALUES ('gh/shared', 'push', 'x', NULL, 1), ('gh/own', 'push', 'y', NULL, 1)",
        )
        .await;
        exec(&pool, "INSERT INTO github_deliveries VALUES ('d1', 'gh/own', 'push', 'deployed', '', NULL, NULL, '', 1)")
            .await;
        migrate(&pool, Dialect::Sqlite).await.unwrap();
        // The older project keeps the address both would have had.
        let owners = texts(&pool, "SELECT project_id FROM hosts WHERE label = 'web-acme-corp'").await;
        assert_eq!(owners, ["p1"]);
        assert_eq!(texts(&pool, "SELECT label FROM hosts WHERE project_id = 'p3'").await, ["site-solo"]);
        // An uncontested hook keeps working for its only organisation; a contested one is dropped.
        assert_eq!(texts(&pool, "SELECT org || ' ' || repo FROM github_hooks").await, ["solo gh/own"]);
        assert_eq!(texts(&pool, "SELECT org || ' ' || id FROM github_deliveries").await, ["solo d1"]);
        // Running again changes nothing.
        assert!(migrate(&pool, Dialect::Sqlite).await.unwrap().is_empty());
    }
}
