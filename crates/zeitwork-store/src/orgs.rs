//! Organisations, their members, API tokens, and the platform-wide
//! bootstrap settings (first admin token, key check).

use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use zeitwork_api_types::{ClusterRole, Member, Org, Role, Token, TokenScope};

use crate::events::append_event;
use crate::{
    in_list, is_unique_violation, nanoid, now_ms, ts, Arg, Audit, Listing, Page, Result, RowExt, Sql, Store, StoreError,
};

fn org_from(row: &AnyRow) -> Result<Org> {
    Ok(Org {
        id: row.text("id")?,
        slug: row.text("slug")?,
        name: row.text("name")?,
        created_at: ts(row.int("created_at")?),
    })
}

fn member_from(row: &AnyRow) -> Result<Member> {
    Ok(Member {
        org: row.text("slug")?,
        user: row.text("user_name")?,
        role: row.parsed("role", Role::parse)?,
        created_at: ts(row.int("created_at")?),
    })
}

// ------------------------------------------------------------------ tokens

/// How long [`Store::get_token_recent`] answers a token from memory.
pub(crate) const TOKEN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// At most this many tokens are held in memory.
const TOKEN_CACHE_MAX: usize = 10_000;

/// Tokens read within the last [`TOKEN_CACHE_TTL`] (see [`Store::get_token_recent`]).
#[derive(Clone, Default)]
pub(crate) struct TokenCache(std::sync::Arc<std::sync::Mutex<TokenCacheInner>>);

#[derive(Default)]
struct TokenCacheInner {
    entries: std::collections::HashMap<String, (StoredToken, std::time::Instant)>,
    /// Bumped by every deletion: a read begun before one is not kept.
    generation: u64,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("TokenCache").field("entries", &self.lock().entries.len()).finish()
    }
}

impl TokenCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, TokenCacheInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: &str) -> Option<StoredToken> {
        match self.lock().entries.get(id) {
            Some((t, at)) if at.elapsed() < TOKEN_CACHE_TTL => Some(t.clone()),
            _ => None,
        }
    }

    fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps `t`, read from `since` on after [`TokenCache::generation`] gave
    /// `generation`, unless a token was deleted since.
    fn put(&self, id: &str, t: &StoredToken, generation: u64, since: std::time::Instant) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if inner.entries.len() >= TOKEN_CACHE_MAX {
            inner.entries.retain(|_, (_, at)| at.elapsed() < TOKEN_CACHE_TTL);
            if inner.entries.len() >= TOKEN_CACHE_MAX {
                inner.entries.clear();
            }
        }
        inner.entries.insert(id.to_owned(), (t.clone(), since));
    }

    /// After a deletion: nothing read before it is answered again.
    fn forget_all(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.clear();
    }

    /// Commits `tx`, which deleted tokens, and forgets everything read
    /// before it, also when the caller is gone during the commit.
    pub(crate) async fn commit(&self, tx: sqlx::Transaction<'_, sqlx::Any>) -> Result<()> {
        struct Forget<'a>(&'a TokenCache);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.forget_all();
            }
        }
        let _forget = Forget(self);
        tx.commit().await?;
        Ok(())
    }
}

/// A token as stored: its public part and the SHA-256 of its secret.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub token: Token,
    pub secret_hash: String,
}

fn token_from(row: &AnyRow) -> Result<StoredToken> {
    let kind = row.text("scope_kind")?;
    let scope = match kind.as_str() {
        "admin" => TokenScope::Admin,
        "org" => TokenScope::Org {
            org: row.opt_text("scope_org")?.ok_or_else(|| StoreError::Corrupt("token without org".into()))?,
            role: row.parsed("scope_role", Role::parse)?,
        },
        "cluster" => TokenScope::Cluster { role: row.parsed("scope_role", ClusterRole::parse)? },
        other => return Err(StoreError::Corrupt(format!("token scope {other:?}"))),
    };
    Ok(StoredToken {
        token: Token {
            id: row.text("id")?,
            name: row.text("name")?,
            scope,
            read_only: row.int("read_only")? != 0,
            created_by: row.opt_text("created_by")?,
            created_at: ts(row.int("created_at")?),
            expires_at: row.opt_int("expires_at")?.map(ts),
            node: row.opt_text("node_id")?,
        },
        secret_hash: row.text("secret_hash")?,
    })
}

fn scope_columns(scope: &TokenScope) -> (&'static str, Option<String>, Option<String>) {
    match scope {
        TokenScope::Admin => ("admin", None, None),
        TokenScope::Org { org, role } => ("org", Some(org.clone()), Some(role.as_str().to_owned())),
        TokenScope::Cluster { role } => ("cluster", None, Some(role.as_str().to_owned())),
    }
}

impl Store {
    /// Creates an organisation; `owner`, when given, becomes its first Owner.
    pub async fn create_org(&self, slug: &str, name: &str, owner: Option<&str>, audit: &Audit) -> Result<Org> {
        let org = Org {
            id: format!("org_{}", nanoid(12)),
            slug: slug.to_owned(),
            name: name.to_owned(),
            created_at: ts(now_ms()),
        };
        let mut tx = self.writer.begin().await?;
        let res = sqlx::query("INSERT INTO orgs (id, slug, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&org.id)
            .bind(&org.slug)
            .bind(&org.name)
            .bind(org.created_at.timestamp_millis())
            .execute(&mut *tx)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("organisation {slug:?} already exists")))
            }
            r => r?,
        };
        if let Some(owner) = owner {
            sqlx::query("INSERT INTO members (org_id, user_name, role, created_at) VALUES ($1, $2, 'owner', $3)")
                .bind(&org.id)
                .bind(owner)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(org)
    }

    pub async fn list_orgs(&self, only: Option<&[String]>, page: &Page) -> Result<Listing<Org>> {
        let mut q = Sql::new("SELECT * FROM orgs WHERE 1 = 1");
        if let Some(only) = only {
            in_list(&mut q, "slug", only);
        }
        self.keyset_page(q, "slug", page, org_from, |o| o.slug.clone()).await
    }

    pub async fn get_org(&self, slug: &str) -> Result<Org> {
        let row = sqlx::query("SELECT * FROM orgs WHERE slug = $1")
            .bind(slug)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("organisation {slug:?} does not exist")))?;
        org_from(&row)
    }

    pub async fn list_members(&self, org: &str) -> Result<Vec<Member>> {
        let org = self.get_org(org).await?;
        let rows = sqlx::query(
            "SELECT o.slug, m.user_name, m.role, m.created_at FROM members m JOIN orgs o ON o.id = m.org_id \
             WHERE m.org_id = $1 ORDER BY m.user_name",
        )
        .bind(&org.id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(member_from).collect()
    }

    /// Adds a member or changes their role; returns the member and whether it is new.
    pub async fn put_member(&self, org: &str, user: &str, role: Role, audit: &Audit) -> Result<(Member, bool)> {
        let org = self.get_org(org).await?;
        let mut tx = self.writer.begin().await?;
        let existing =
            sqlx::query(&format!("SELECT role FROM members WHERE org_id = $1 AND user_name = $2{}", self.for_update()))
                .bind(&org.id)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await?;
        let now = now_ms();
        let created = match existing {
            Some(row) => {
                let old = row.parsed("role", Role::parse)?;
                if old == Role::Owner && role != Role::Owner {
                    ensure_other_owner(&mut tx, &org.id, user).await?;
                }
                sqlx::query("UPDATE members SET role = $1 WHERE org_id = $2 AND user_name = $3")
                    .bind(role.as_str())
                    .bind(&org.id)
                    .bind(user)
                    .execute(&mut *tx)
                    .await?;
                false
            }
            None => {
                sqlx::query("INSERT INTO members (org_id, user_name, role, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(&org.id)
                    .bind(user)
                    .bind(role.as_str())
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| {
                        if is_unique_violation(&e) {
                            StoreError::Conflict(format!("{user:?} was added concurrently; retry"))
                        } else {
                            e.into()
                        }
                    })?;
                true
            }
        };
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        let member = self
            .list_members(&org.slug)
            .await?
            .into_iter()
            .find(|m| m.user == user)
            .ok_or_else(|| StoreError::NotFound(format!("member {user:?} vanished")))?;
        Ok((member, created))
    }

    pub async fn get_member_role(&self, org: &str, user: &str) -> Result<Option<Role>> {
        let row = sqlx::query(
            "SELECT m.role FROM members m JOIN orgs o ON o.id = m.org_id WHERE o.slug = $1 AND m.user_name = $2",
        )
        .bind(org)
        .bind(user)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| r.parsed("role", Role::parse)).transpose()
    }

    pub async fn remove_member(&self, org: &str, user: &str, audit: &Audit) -> Result<()> {
        let org = self.get_org(org).await?;
        let mut tx = self.writer.begin().await?;
        let row =
            sqlx::query(&format!("SELECT role FROM members WHERE org_id = $1 AND user_name = $2{}", self.for_update()))
                .bind(&org.id)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("{user:?} is not a member of {:?}", org.slug)))?;
        if row.parsed("role", Role::parse)? == Role::Owner {
            ensure_other_owner(&mut tx, &org.id, user).await?;
        }
        sqlx::query("DELETE FROM members WHERE org_id = $1 AND user_name = $2")
            .bind(&org.id)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }
}

impl Store {
    pub async fn create_token(&self, t: &StoredToken, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        insert_token(&mut tx, t).await?;
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a node's own credential (bound to `t.token.node`), replacing the
    /// ones issued to that node before: a re-registered node holds one credential.
    pub async fn issue_node_credential(&self, t: &StoredToken, audit: &Audit) -> Result<()> {
        let node = t.token.node.clone().ok_or_else(|| StoreError::Invalid {
            field: "node".into(),
            message: "a node credential names its node".into(),
        })?;
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM tokens WHERE node_id = $1").bind(&node).execute(&mut *tx).await?;
        insert_token(&mut tx, t).await?;
        append_event(&mut tx, audit, "ok").await?;
        self.tokens.commit(tx).await?;
        Ok(())
    }

    /// Stores the first admin token unless one was bootstrapped before.
    /// Returns false when the platform already has its first admin token.
    pub async fn bootstrap_admin_token(&self, t: &StoredToken) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let res = sqlx::query("INSERT INTO bootstrap (key, value) VALUES ('admin_token', $1)")
            .bind(&t.token.id)
            .execute(&mut *tx)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => return Ok(false),
            r => r?,
        };
        insert_token(&mut tx, t).await?;
        append_event(&mut tx, &Audit::new("system", "token.bootstrap", &t.token.id), "ok").await?;
        tx.commit().await?;
        Ok(true)
    }

    /// [`Store::get_token`], answered from memory for a token read within the
    /// last [`TOKEN_CACHE_TTL`], so that a client calling many times a second
    /// costs a read of its token a second, not one per call. A token deleted
    /// through this store (revoked, a node's credential replaced, its node
    /// rejected or deleted) is never answered from memory again; one deleted through
    /// another operator's store is read again within [`TOKEN_CACHE_TTL`].
    /// Unknown tokens are always read.
    pub async fn get_token_recent(&self, id: &str) -> Result<StoredToken> {
        if let Some(t) = self.tokens.get(id) {
            return Ok(t);
        }
        let (generation, since) = (self.tokens.generation(), std::time::Instant::now());
        let t = self.get_token(id).await?;
        self.tokens.put(id, &t, generation, since);
        Ok(t)
    }

    pub async fn get_token(&self, id: &str) -> Result<StoredToken> {
        let row = sqlx::query("SELECT * FROM tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("token {id:?} does not exist")))?;
        token_from(&row)
    }

    pub async fn list_tokens(&self, org: Option<&str>, page: &Page) -> Result<Listing<Token>> {
        let mut q = Sql::new("SELECT * FROM tokens WHERE 1 = 1");
        if let Some(org) = org {
            q.and("scope_org = ?", Arg::Text(org.to_owned()));
        }
        self.keyset_page(q, "id", page, |r| token_from(r).map(|t| t.token), |t| t.id.clone()).await
    }

    pub async fn delete_token(&self, id: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM tokens WHERE id = $1").bind(id).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("token {id:?} does not exist")));
        }
        append_event(&mut tx, audit, "ok").await?;
        self.tokens.commit(tx).await?;
        Ok(())
    }
}

async fn insert_token(conn: &mut AnyConnection, t: &StoredToken) -> Result<()> {
    let (kind, org, role) = scope_columns(&t.token.scope);
    sqlx::query(
        "INSERT INTO tokens (id, name, secret_hash, scope_kind, scope_org, scope_role, read_only, created_by, created_at, \
         expires_at, node_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&t.token.id)
    .bind(&t.token.name)
    .bind(&t.secret_hash)
    .bind(kind)
    .bind(org)
    .bind(role)
    .bind(i64::from(t.token.read_only))
    .bind(t.token.created_by.clone())
    .bind(t.token.created_at.timestamp_millis())
    .bind(t.token.expires_at.map(|e| e.timestamp_millis()))
    .bind(t.token.node.clone())
    .execute(conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict("token id collision; retry".into())
        } else {
            e.into()
        }
    })?;
    Ok(())
}

async fn ensure_other_owner(conn: &mut AnyConnection, org_id: &str, user: &str) -> Result<()> {
    let owners: i64 =
        sqlx::query("SELECT COUNT(*) AS c FROM members WHERE org_id = $1 AND role = 'owner' AND user_name <> $2")
            .bind(org_id)
            .bind(user)
            .fetch_one(conn)
            .await?
            .int("c")?;
    if owners == 0 {
        return Err(StoreError::Conflict(format!("{user:?} is the last owner; make someone else owner first")));
    }
    Ok(())
}

impl Store {
    /// A platform-wide setting written once (first admin token, key check).
    pub async fn get_bootstrap(&self, key: &str) -> Result<Option<String>> {
        let row =
            sqlx::query("SELECT value FROM bootstrap WHERE key = $1").bind(key).fetch_optional(&self.reader).await?;
        row.map(|r| r.text("value")).transpose()
    }

    /// Writes `key` unless present; returns whether this call wrote it.
    pub async fn put_bootstrap_if_absent(&self, key: &str, value: &str) -> Result<bool> {
        let res = sqlx::query("INSERT INTO bootstrap (key, value) VALUES ($1, $2)")
            .bind(key)
            .bind(value)
            .execute(&self.writer)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => Ok(false),
            r => r.map(|_| true).map_err(Into::into),
        }
    }
}
