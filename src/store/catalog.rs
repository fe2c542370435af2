//! Products, per-cabinet sellable lists and promotions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use cabinet_actors::pricing::{ListPrice, Offer, Promotion, Window};

use super::{conflict_or, Result, Store, StoreError};

/// What a promotion does and when, stored as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionRule {
    /// When.
    pub window: Window,
    /// What.
    pub offer: Offer,
}

/// A stored promotion.
#[derive(Debug, Clone, Serialize)]
pub struct PromotionRow {
    /// Id.
    pub id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Name.
    pub name: String,
    /// Rule.
    pub rule: PromotionRule,
    /// Only these cabinets; all of the merchant's when `None`.
    pub cabinet_ids: Option<Vec<String>>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; ended promotions never apply.
    pub ended_at: Option<i64>,
}

impl PromotionRow {
    /// As the pricing function takes it.
    pub fn promotion(&self) -> Promotion {
        Promotion {
            id: self.id.clone(),
            name: self.name.clone(),
            window: self.rule.window.clone(),
            offer: self.rule.offer.clone(),
        }
    }

    fn applies_to(&self, cabinet_id: &str) -> bool {
        self.cabinet_ids
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|c| c == cabinet_id))
    }
}

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl Store {
    /// Creates or renames a product.
    pub async fn upsert_product(
        &self,
        merchant_id: &str,
        sku: &str,
        name: &str,
        now: i64,
    ) -> Result<()> {
        // Product names are part of every cabinet's cached list.
        let _fresh = self.caches.prices.clearing();
        sqlx::query(
            "INSERT INTO products (merchant_id, sku, name, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (merchant_id, sku) DO UPDATE SET name = excluded.name, updated_at = excluded.updated_at",
        )
        .bind(merchant_id)
        .bind(sku)
        .bind(name)
        .bind(now)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(())
    }

    /// A merchant's products: sku → name.
    pub async fn products(&self, merchant_id: &str) -> Result<BTreeMap<String, String>> {
        let rows =
            sqlx::query("SELECT sku, name FROM products WHERE merchant_id = $1 ORDER BY sku")
                .bind(merchant_id)
                .fetch_all(&mut *self.read().await?)
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("sku")?, r.try_get("name")?)))
            .collect()
    }

    /// Replaces a cabinet's sellable list, atomically.
    pub async fn set_prices(
        &self,
        cabinet_id: &str,
        items: &[(String, i64)],
        now: i64,
    ) -> Result<()> {
        let _fresh = self.caches.prices.clearing();
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        sqlx::query("DELETE FROM cabinet_prices WHERE cabinet_id = $1")
            .bind(cabinet_id)
            .execute(&mut *tx)
            .await?;
        for (sku, price) in items {
            sqlx::query("INSERT INTO cabinet_prices (cabinet_id, sku, price_fen, updated_at) VALUES ($1, $2, $3, $4)")
                .bind(cabinet_id)
                .bind(sku)
                .bind(*price)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(conflict_or)?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A cabinet's sellable list with product names.
    pub async fn prices(
        &self,
        cabinet_id: &str,
        merchant_id: &str,
    ) -> Result<BTreeMap<String, ListPrice>> {
        let key = (cabinet_id.to_owned(), merchant_id.to_owned());
        self.caches
            .prices
            .get_or_load(&key, || self.prices_stored(cabinet_id, merchant_id))
            .await
    }

    async fn prices_stored(
        &self,
        cabinet_id: &str,
        merchant_id: &str,
    ) -> Result<BTreeMap<String, ListPrice>> {
        let rows = sqlx::query(
            "SELECT p.sku AS sku, p.price_fen AS price_fen, COALESCE(pr.name, p.sku) AS name \
             FROM cabinet_prices p LEFT JOIN products pr ON pr.sku = p.sku AND pr.merchant_id = $2 \
             WHERE p.cabinet_id = $1 ORDER BY p.sku",
        )
        .bind(cabinet_id)
        .bind(merchant_id)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("sku")?,
                    ListPrice {
                        name: r.try_get("name")?,
                        price_fen: r.try_get("price_fen")?,
                    },
                ))
            })
            .collect()
    }

    /// Publishes a promotion.
    pub async fn create_promotion(&self, p: &PromotionRow) -> Result<()> {
        let _fresh = self.caches.promotions.invalidating(p.merchant_id.clone());
        let rule = serde_json::to_string(&p.rule).map_err(corrupt)?;
        let cabinets = p
            .cabinet_ids
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt)?;
        sqlx::query("INSERT INTO promotions (id, merchant_id, name, rule, cabinet_ids, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&p.id)
            .bind(&p.merchant_id)
            .bind(&p.name)
            .bind(rule)
            .bind(cabinets)
            .bind(p.created_at)
            .execute(&mut *self.write().await?)
            .await
            .map_err(conflict_or)?;
        Ok(())
    }

    /// Ends a promotion now; returns false when it had already ended.
    pub async fn end_promotion(&self, id: &str, now: i64) -> Result<bool> {
        let _fresh = self.caches.promotions.clearing();
        let r =
            sqlx::query("UPDATE promotions SET ended_at = $2 WHERE id = $1 AND ended_at IS NULL")
                .bind(id)
                .bind(now)
                .execute(&mut *self.write().await?)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Promotions, optionally of one merchant, newest first.
    pub async fn promotions(&self, merchant_id: Option<&str>) -> Result<Vec<PromotionRow>> {
        let rows =
            match merchant_id {
                Some(m) => sqlx::query(
                    "SELECT * FROM promotions WHERE merchant_id = $1 ORDER BY created_at DESC, id",
                )
                .bind(m)
                .fetch_all(&mut *self.read().await?)
                .await?,
                None => {
                    sqlx::query("SELECT * FROM promotions ORDER BY created_at DESC, id")
                        .fetch_all(&mut *self.read().await?)
                        .await?
                }
            };
        rows.iter()
            .map(|r| {
                let rule: String = r.try_get("rule")?;
                let cabinets: Option<String> = r.try_get("cabinet_ids")?;
                Ok(PromotionRow {
                    id: r.try_get("id")?,
                    merchant_id: r.try_get("merchant_id")?,
                    name: r.try_get("name")?,
                    rule: serde_json::from_str(&rule).map_err(corrupt)?,
                    cabinet_ids: cabinets
                        .map(|c| serde_json::from_str(&c))
                        .transpose()
                        .map_err(corrupt)?,
                    created_at: r.try_get("created_at")?,
                    ended_at: r.try_get("ended_at")?,
                })
            })
            .collect()
    }

    /// The merchant's promotions that are published, not ended, and apply to this cabinet.
    /// A promotion published or ended on this node applies from the next basket on.
    pub async fn promotions_for(
        &self,
        merchant_id: &str,
        cabinet_id: &str,
    ) -> Result<Vec<Promotion>> {
        let live = self
            .caches
            .promotions
            .get_or_load(&merchant_id.to_owned(), || async {
                Ok::<_, StoreError>(
                    self.promotions(Some(merchant_id))
                        .await?
                        .into_iter()
                        .filter(|p| p.ended_at.is_none())
                        .collect::<Vec<_>>(),
                )
            })
            .await?;
        Ok(live
            .iter()
            .filter(|p| p.applies_to(cabinet_id))
            .map(PromotionRow::promotion)
            .collect())
    }
}
