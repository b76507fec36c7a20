//! Regions: where nodes stand and deployments run.

use sqlx::any::AnyRow;
use zeitwork_api_types::{CreateRegion, Region};

use crate::events::append_event;
use crate::{is_unique_violation, nanoid, now_ms, ts, Audit, Listing, Page, Result, RowExt, Sql, Store, StoreError};

fn region_from(row: &AnyRow) -> Result<Region> {
    Ok(Region {
        id: row.text("id")?,
        code: row.text("code")?,
        name: row.text("name")?,
        // Rows inserted by hand may name the country; the API always answers its ISO code.
        country: {
            let c = row.text("country")?;
            zeitwork_api_types::validate::country_code(&c).unwrap_or(c)
        },
        created_at: ts(row.int("created_at")?),
    })
}

impl Store {
    pub async fn create_region(&self, r: &CreateRegion, audit: &Audit) -> Result<Region> {
        let region = Region {
            id: format!("reg_{}", nanoid(12)),
            code: r.code.clone(),
            name: r.name.clone(),
            country: r.country.clone(),
            created_at: ts(now_ms()),
        };
        let mut tx = self.writer.begin().await?;
        let res = sqlx::query("INSERT INTO regions (id, code, name, country, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&region.id)
            .bind(&region.code)
            .bind(&region.name)
            .bind(&region.country)
            .bind(region.created_at.timestamp_millis())
            .execute(&mut *tx)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("region {:?} already exists", r.code)))
            }
            r => r?,
        };
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(region)
    }

    pub async fn list_regions(&self, page: &Page) -> Result<Listing<Region>> {
        self.keyset_page(Sql::new("SELECT * FROM regions WHERE 1 = 1"), "code", page, region_from, |r| r.code.clone())
            .await
    }

    pub async fn get_region(&self, code: &str) -> Result<Region> {
        let row = sqlx::query("SELECT * FROM regions WHERE code = $1")
            .bind(code)
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("region {code:?} does not exist")))?;
        region_from(&row)
    }

    pub async fn delete_region(&self, code: &str, audit: &Audit) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let nodes: i64 = sqlx::query("SELECT COUNT(*) AS c FROM nodes WHERE region = $1")
            .bind(code)
            .fetch_one(&mut *tx)
            .await?
            .int("c")?;
        if nodes > 0 {
            return Err(StoreError::Conflict(format!("region {code:?} still has {nodes} node(s); delete them first")));
        }
        let pattern = format!("%\"{code}\"%");
        let projects: i64 = sqlx::query("SELECT COUNT(*) AS c FROM projects WHERE regions LIKE $1")
            .bind(pattern)
            .fetch_one(&mut *tx)
            .await?
            .int("c")?;
        if projects > 0 {
            return Err(StoreError::Conflict(format!(
                "region {code:?} is used by {projects} project(s); remove it from their regions first"
            )));
        }
        let done = sqlx::query("DELETE FROM regions WHERE code = $1").bind(code).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("region {code:?} does not exist")));
        }
        append_event(&mut tx, audit, "ok").await?;
        tx.commit().await?;
        Ok(())
    }
}
