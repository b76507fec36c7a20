//! Zeitwork's store: the single source of truth for regions, nodes,
//! organisations, projects, deployments, instances, tokens, console sessions
//! and the audit log.
//!
//! One [`Store`] type, two real backends chosen by URL: SQLite (embedded, one
//! file, WAL, one writer connection) and PostgreSQL (pooled, for several
//! operators). Every change that touches several rows, including its audit
//! event, is one transaction. This crate owns SQL and nothing else: it does not
//! check permissions, encrypt, or know about HTTP; callers pass already
//! validated input and already encrypted secrets.

mod backup;
mod blobs;
mod builds;
mod certificates;
mod changes;
mod checks;
mod connect;
mod deployments;
mod edges;
mod events;
mod feed;
mod github;
mod leases;
mod lifecycle;
mod log_drains;
mod networks;
mod nodes;
mod orgs;
mod outbox;
mod projects;
mod reconcile;
mod regions;
mod releases;
mod retention;
mod routing;
mod schema;
mod sessions;
mod usage;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

pub use backup::*;
pub use blobs::*;
pub use builds::*;
pub use certificates::*;
pub use changes::*;
pub use checks::*;
pub use deployments::*;
pub use events::*;
pub use feed::*;
pub use github::*;
pub use lifecycle::*;
pub use log_drains::*;
pub use networks::*;
pub use nodes::*;
pub use orgs::*;
pub use outbox::*;
pub use projects::*;
pub use reconcile::*;
pub use releases::*;
pub use routing::*;
pub use schema::latest_version;
pub use sessions::*;
pub use usage::*;

/// Errors of the store. `NotFound` and `Conflict` carry a sentence for people.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change clashes with what is stored (duplicate name, thing in use).
    #[error("{0}")]
    Conflict(String),
    /// A field refers to something that does not exist or is out of bounds.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The database URL is neither `sqlite:` nor `postgres:`.
    #[error("unsupported database url {0:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    /// The database was migrated by a newer Zeitwork.
    #[error("the database schema is version {found} but this build supports up to {supported}; upgrade zeitwork")]
    SchemaTooNew { found: i64, supported: i64 },
    /// A stored value could not be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// PostgreSQL takes only TLS connections (`hostssl` in its pg_hba.conf) and
    /// `database_url` turned TLS off.
    #[error(
        "the database accepts only TLS connections but database_url has sslmode={mode}: \
         set sslmode=verify-full&sslrootcert=<the server's CA file> (or at least sslmode=require) in database_url"
    )]
    TlsRequired { mode: String, source: sqlx::Error },
    /// TLS to PostgreSQL failed: what went wrong and what to change.
    #[error("TLS to the database failed: {problem}; {fix}")]
    Tls { problem: String, fix: String, source: sqlx::Error },
    /// The database failed or is unreachable.
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// The fix is in the database URL (its scheme, `sslmode`, `sslrootcert`),
    /// not in the database: a configuration error.
    pub fn is_in_url(&self) -> bool {
        matches!(self, StoreError::UnsupportedUrl(_) | StoreError::TlsRequired { .. } | StoreError::Tls { .. })
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Handle to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    /// Serves reads. For SQLite several connections, for PostgreSQL the one pool.
    reader: AnyPool,
    /// Serves writes. For SQLite exactly one connection, so writers queue in
    /// the pool instead of failing with SQLITE_BUSY on lock upgrades.
    writer: AnyPool,
    dialect: Dialect,
    /// Wakes readers of routing, assignments and deployment state after a change.
    changes: changes::ChangeBus,
    /// Tokens read within the last [`TOKEN_CACHE_TTL`].
    tokens: orgs::TokenCache,
}

/// A page request: at most `limit` items after `cursor`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub limit: u32,
    pub cursor: Option<String>,
}

impl Page {
    pub fn first(limit: u32) -> Self {
        Self { limit, cursor: None }
    }
}

/// One page of results, and the cursor of the next page if there is one.
#[derive(Debug, Clone)]
pub struct Listing<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Who made a change and what it was; written as an event in the same
/// transaction as the change.
#[derive(Debug, Clone)]
pub struct Audit {
    pub actor: String,
    pub action: String,
    pub target: String,
    pub org: Option<String>,
    pub project: Option<String>,
    pub detail: Option<serde_json::Value>,
}

impl Audit {
    pub fn new(actor: &str, action: &str, target: impl Into<String>) -> Self {
        Self {
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.into(),
            org: None,
            project: None,
            detail: None,
        }
    }

    pub fn org(mut self, org: &str) -> Self {
        self.org = Some(org.to_owned());
        self
    }

    pub fn project(mut self, project: &str) -> Self {
        self.project = Some(project.to_owned());
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }
}

impl Store {
    /// Opens the SQLite file `path` (created if missing) and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        Self::connect(&url).await
    }

    /// Connects to `sqlite://PATH` or `postgres://…` and migrates the schema.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Dialect::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        let (reader, writer, changes) = match dialect {
            Dialect::Sqlite => {
                // A SQLite connection runs its queries on a thread of its own,
                // which takes the scheduling priority of the thread that opened
                // it: opened lazily, most are opened by the operator's
                // lower-priority background work (its whole reads), and run at
                // that priority for every user. Opening all of them up front at
                // the API's priority measured worse (bench/control/README.md).
                let pool = |n: u32| {
                    AnyPoolOptions::new()
                        .max_connections(n)
                        .acquire_timeout(Duration::from_secs(30))
                        .after_connect(|conn, _meta| Box::pin(sqlite_pragmas(conn)))
                        .connect(url)
                };
                let writer = pool(1).await?;
                let reader = pool(8).await?;
                (reader, writer, changes::ChangeBus::new(None))
            }
            Dialect::Postgres => {
                // Writes (the engine's placements, status reports) have
                // connections of their own: under a burst of reads they do
                // not queue behind them.
                let pool = |n: u32| {
                    AnyPoolOptions::new().max_connections(n).acquire_timeout(Duration::from_secs(10)).connect(url)
                };
                let writer = pool(8).await.map_err(|e| connect::explain(url, e))?;
                let reader = pool(16).await.map_err(|e| connect::explain(url, e))?;
                (reader, writer, changes::ChangeBus::new(Some(url)))
            }
        };
        let store = Store { reader, writer, dialect, changes, tokens: Default::default() };
        schema::migrate(&store.writer, dialect).await?;
        Ok(store)
    }

    /// How many connections reads may use at once (the reader pool's size).
    pub fn read_connections(&self) -> usize {
        self.reader.options().get_max_connections() as usize
    }

    /// Connections of the store's pools: (open, idle).
    pub fn pool_stats(&self) -> (u32, u32) {
        (self.reader.size() + self.writer.size(), (self.reader.num_idle() + self.writer.num_idle()) as u32)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// A cheap round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    /// Runs the migrations again (a no-op when up to date); returns what ran.
    pub async fn migrate(&self) -> Result<Vec<i64>> {
        schema::migrate(&self.writer, self.dialect).await
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    fn for_update(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }
}

async fn sqlite_pragmas(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    conn.execute(
        "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000; \
         PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL",
    )
    .await?;
    Ok(())
}

/// Removes a password from a database URL before it is shown anywhere.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((creds, host)) = rest.split_once('@') {
            let user = creds.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}:***@{host}");
        }
    }
    url.to_owned()
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(crate) fn ts(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Random id of `len` characters from `[a-z0-9]` (the nanoid alphabet the API promises).
pub fn nanoid(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

pub(crate) fn is_fk_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

/// Typed column access that names the column when a value is malformed.
pub(crate) trait RowExt {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
    fn parsed<T>(&self, col: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T>;
}

impl RowExt for AnyRow {
    fn text(&self, col: &str) -> Result<String> {
        Ok(self.try_get::<String, _>(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        Ok(self.try_get::<Option<String>, _>(col)?)
    }
    fn int(&self, col: &str) -> Result<i64> {
        Ok(self.try_get::<i64, _>(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        Ok(self.try_get::<Option<i64>, _>(col)?)
    }
    fn parsed<T>(&self, col: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
        let raw = self.text(col)?;
        parse(&raw).ok_or_else(|| StoreError::Corrupt(format!("column {col} holds {raw:?}")))
    }
}

/// A bind argument of a query built at run time.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// A query assembled from optional filters, with positional `$n` parameters
/// that both SQLite and PostgreSQL understand.
#[derive(Debug, Default)]
pub(crate) struct Sql {
    pub text: String,
    pub args: Vec<Arg>,
}

impl Sql {
    pub fn new(text: &str) -> Self {
        Self { text: text.to_owned(), args: Vec::new() }
    }

    /// Appends ` AND <cond>` where `?` in `cond` is replaced by the next parameter.
    pub fn and(&mut self, cond: &str, arg: Arg) -> &mut Self {
        self.args.push(arg);
        let p = format!("${}", self.args.len());
        self.text.push_str(" AND ");
        self.text.push_str(&cond.replace('?', &p));
        self
    }

    pub fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    pub fn arg(&mut self, arg: Arg) -> String {
        self.args.push(arg);
        format!("${}", self.args.len())
    }

    pub fn query(&self) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
        let mut q = sqlx::query(&self.text);
        for a in &self.args {
            q = match a {
                Arg::Text(s) => q.bind(s.clone()),
                Arg::Int(i) => q.bind(*i),
            };
        }
        q
    }
}

/// Splits `limit + 1` fetched rows into a page and the next cursor.
pub(crate) fn paginate<T>(mut items: Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> String) -> Listing<T> {
    let limit = limit as usize;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor_of)
    } else {
        None
    };
    Listing { items, next_cursor }
}

pub(crate) fn limit_arg(page: &Page) -> Arg {
    Arg::Int(i64::from(page.limit) + 1)
}

impl Store {
    /// Runs `q` as one keyset page ordered by `key` (ascending), after the
    /// page's cursor.
    pub(crate) async fn keyset_page<T>(
        &self,
        mut q: Sql,
        key: &str,
        page: &Page,
        from: fn(&AnyRow) -> Result<T>,
        cursor_of: impl Fn(&T) -> String,
    ) -> Result<Listing<T>> {
        if let Some(c) = &page.cursor {
            q.and(&format!("{key} > ?"), Arg::Text(c.clone()));
        }
        let l = q.arg(limit_arg(page));
        q.push(&format!(" ORDER BY {key} LIMIT {l}"));
        let rows = q.query().fetch_all(&self.reader).await?;
        let items = rows.iter().map(from).collect::<Result<Vec<_>>>()?;
        Ok(paginate(items, page.limit, cursor_of))
    }
}

/// `$1, $2, …, $n`: the parameters of an `IN` list of `n` values.
pub(crate) fn placeholders(n: usize) -> String {
    (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// Runs `sql(placeholders)` for each chunk of up to 500 `values` bound in order, and hands each row to `each`.
pub(crate) async fn for_each_chunk(
    pool: &sqlx::AnyPool,
    values: &[String],
    sql: impl Fn(&str) -> String,
    each: impl FnMut(&AnyRow) -> Result<()>,
) -> Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    for_each_chunk_in(&mut *pool.acquire().await?, values, sql, each).await
}

/// [`for_each_chunk`] on one connection (inside a transaction).
pub(crate) async fn for_each_chunk_in(
    conn: &mut sqlx::AnyConnection,
    values: &[String],
    sql: impl Fn(&str) -> String,
    mut each: impl FnMut(&AnyRow) -> Result<()>,
) -> Result<()> {
    for chunk in values.chunks(500) {
        let text = sql(&placeholders(chunk.len()));
        let mut q = sqlx::query(&text);
        for v in chunk {
            q = q.bind(v.as_str());
        }
        for r in q.fetch_all(&mut *conn).await? {
            each(&r)?;
        }
    }
    Ok(())
}

pub(crate) fn in_list(q: &mut Sql, col: &str, values: &[String]) {
    if values.is_empty() {
        q.push(" AND 1 = 0");
        return;
    }
    let params: Vec<String> = values.iter().map(|v| q.arg(Arg::Text(v.clone()))).collect();
    q.push(&format!(" AND {col} IN ({})", params.join(", ")));
}

impl FromStr for Dialect {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sqlite" => Ok(Dialect::Sqlite),
            "postgres" => Ok(Dialect::Postgres),
            other => Err(StoreError::UnsupportedUrl(other.to_owned())),
        }
    }
}
