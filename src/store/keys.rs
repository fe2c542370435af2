//! API keys beyond authentication: listing, revocation, rotation and the last-use time.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{conflict_or, Result, Store};

/// An API key as listed (never its hash).
#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    /// Public id.
    pub id: String,
    /// Scope; `None` for admin.
    pub merchant_id: Option<String>,
    /// Role name.
    pub role: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms, as last written (at most once a minute per key).
    pub last_used_at: Option<i64>,
    /// Unix ms.
    pub revoked_at: Option<i64>,
    /// The key that replaced this one by rotation.
    pub replaced_by: Option<String>,
}

/// What a revocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Revoked now.
    Revoked,
    /// It was revoked before.
    AlreadyRevoked,
    /// It is the last active admin key: kept.
    LastAdmin,
    /// No such key.
    NotFound,
}

const COLUMNS: &str = "id, merchant_id, role, created_at, last_used_at, revoked_at, replaced_by";

fn record(r: &AnyRow) -> Result<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: r.try_get("id")?,
        merchant_id: r.try_get("merchant_id")?,
        role: r.try_get("role")?,
        created_at: r.try_get("created_at")?,
        last_used_at: r.try_get("last_used_at")?,
        revoked_at: r.try_get("revoked_at")?,
        replaced_by: r.try_get("replaced_by")?,
    })
}

impl Store {
    /// A key by id, revoked or not.
    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_keys WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&mut *self.read().await?)
        .await?;
        row.as_ref().map(record).transpose()
    }

    /// A key by the hash of its secret, revoked or not.
    pub async fn api_key_any_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_keys WHERE key_hash = $1"
        )))
        .bind(key_hash)
        .fetch_optional(&mut *self.read().await?)
        .await?;
        row.as_ref().map(record).transpose()
    }

    /// Keys, optionally of one merchant, oldest first.
    pub async fn api_keys(&self, merchant_id: Option<&str>) -> Result<Vec<ApiKeyRecord>> {
        let rows = match merchant_id {
            Some(m) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM api_keys WHERE merchant_id = $1 ORDER BY created_at, id"
                )))
                .bind(m)
                .fetch_all(&mut *self.read().await?)
                .await?
            }
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id"
                )))
                .fetch_all(&mut *self.read().await?)
                .await?
            }
        };
        rows.iter().map(record).collect()
    }

    /// Records a use of the key at `at` unless a later one is stored. Callers write at most
    /// once a minute per key; this is not a per-request write.
    pub async fn touch_api_key(&self, id: &str, at: i64) -> Result<()> {
        sqlx::query(
            "UPDATE api_keys SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)",
        )
        .bind(id)
        .bind(at)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(())
    }

    /// Revokes a key, never the last active admin key.
    pub async fn revoke_api_key(&self, id: &str, now: i64) -> Result<Revocation> {
        let _fresh = self.caches.keys.clearing();
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        self.lock_admin_keys(&mut tx).await?;
        let row = sqlx::query("SELECT role, revoked_at FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(Revocation::NotFound);
        };
        if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Ok(Revocation::AlreadyRevoked);
        }
        if row.try_get::<String, _>("role")? == "admin" && active_admins(&mut tx).await? <= 1 {
            return Ok(Revocation::LastAdmin);
        }
        sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Revocation::Revoked)
    }

    /// Replaces an active key by a new one of the same role and scope, atomically: the new
    /// key is stored and the old one revoked. `None` when the old key is unknown or revoked.
    pub async fn rotate_api_key(
        &self,
        old_id: &str,
        new_id: &str,
        new_hash: &str,
        now: i64,
    ) -> Result<Option<ApiKeyRecord>> {
        let _fresh = self.caches.keys.clearing();
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_keys WHERE id = $1 AND revoked_at IS NULL"
        )))
        .bind(old_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(old) = row.as_ref().map(record).transpose()? else {
            return Ok(None);
        };
        sqlx::query("INSERT INTO api_keys (id, key_hash, merchant_id, role, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(new_id)
            .bind(new_hash)
            .bind(old.merchant_id.as_deref())
            .bind(&old.role)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(conflict_or)?;
        let r = sqlx::query("UPDATE api_keys SET revoked_at = $2, replaced_by = $3 WHERE id = $1 AND revoked_at IS NULL")
            .bind(old_id)
            .bind(now)
            .bind(new_id)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() != 1 {
            // Revoked by someone else since the read (PostgreSQL): the new key is not kept.
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(ApiKeyRecord {
            id: new_id.to_owned(),
            created_at: now,
            last_used_at: None,
            revoked_at: None,
            replaced_by: None,
            ..old
        }))
    }

    /// On PostgreSQL, locks the active admin keys for the transaction, so that two
    /// revocations of the last two admin keys cannot both see the other one still active.
    /// SQLite needs nothing: its writes are serialised on one connection.
    async fn lock_admin_keys(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<()> {
        if self.is_postgres() {
            sqlx::query(
                "SELECT id FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL FOR UPDATE",
            )
            .fetch_all(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

async fn active_admins(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<i64> {
    Ok(sqlx::query(
        "SELECT COUNT(*) AS n FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL",
    )
    .fetch_one(&mut **tx)
    .await?
    .try_get("n")?)
}
