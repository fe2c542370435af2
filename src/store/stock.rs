//! Stock (商品库存) per cabinet, its discrepancies (库存不一致), and product templates.

use std::collections::BTreeMap;

use sqlx::{FromRow, Row};

use super::{Result, Store};

/// One product's stock in one cabinet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StockRow {
    /// Cabinet.
    pub cabinet_id: String,
    /// Product.
    pub sku: String,
    /// How many the hub believes are in the cabinet (below zero: more were taken than were
    /// counted in — a stock-taking will say what is there).
    pub qty: i64,
    /// At or below this, the product is low in this cabinet.
    pub low_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// A difference a restock's count found (库存不一致).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StockDiscrepancyRow {
    /// Id.
    pub id: String,
    /// Cabinet.
    pub cabinet_id: String,
    /// Whose.
    pub merchant_id: String,
    /// The restock (or stock-taking) session that counted.
    pub session_id: String,
    /// Product.
    pub sku: String,
    /// What should have been there: the stock before, plus the restock's plan.
    pub expected: i64,
    /// What the cabinet counted.
    pub counted: i64,
    /// `open` or `resolved`.
    pub state: String,
    /// What the person who resolved it found.
    pub note: Option<String>,
    /// Their key.
    pub resolved_by: Option<String>,
    /// Unix ms.
    pub resolved_at: Option<i64>,
    /// Unix ms.
    pub created_at: i64,
}

/// A product's stock after a purchase took some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// Product.
    pub sku: String,
    /// Before the purchase.
    pub before: i64,
    /// After it.
    pub after: i64,
    /// The product's low mark in the cabinet.
    pub low_at: i64,
}

/// What a restock's recount found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recounted {
    /// Counts that differ from what was expected.
    pub discrepancies: Vec<StockDiscrepancyRow>,
    /// Products whose low state the count changed: their stock now, and whether it is low
    /// now (`true`: fell to its mark; `false`: above it again).
    pub low_changes: Vec<(StockRow, bool)>,
}

/// A product template: one sellable list for many cabinets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct TemplateRow {
    /// Id.
    pub id: String,
    /// Whose.
    pub merchant_id: String,
    /// Its name.
    pub name: String,
    /// `[{"sku", "price_fen"}]` as JSON.
    pub items: String,
    /// Unix ms.
    pub created_at: i64,
}

/// What a restock's recount is given.
pub struct Recount<'a> {
    /// Cabinet.
    pub cabinet_id: &'a str,
    /// Whose.
    pub merchant_id: &'a str,
    /// The counting session.
    pub session_id: &'a str,
    /// What the cabinet counted, per product.
    pub counted: &'a BTreeMap<String, i64>,
    /// The restock's plan, per product (empty: a stock-taking).
    pub planned: &'a BTreeMap<String, i64>,
    /// The low mark of a product new to the cabinet.
    pub low_at: i64,
    /// Unix ms.
    pub now: i64,
}

impl Store {
    /// A cabinet's stock, by product.
    pub async fn stock(&self, cabinet_id: &str) -> Result<Vec<StockRow>> {
        let rows = sqlx::query("SELECT * FROM cabinet_stock WHERE cabinet_id = $1 ORDER BY sku")
            .bind(cabinet_id)
            .fetch_all(&mut *self.read().await?)
            .await?;
        rows.iter().map(|r| Ok(StockRow::from_row(r)?)).collect()
    }

    /// Restock sessions (补货记录) of one merchant (or all), of one cabinet (or all), newest
    /// first, whatever their state.
    pub async fn restocks(
        &self,
        merchant_id: Option<&str>,
        cabinet_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<super::SessionRow>> {
        let rows = sqlx::query(
            "SELECT * FROM sessions WHERE mode = 'restock' AND ($1 IS NULL OR merchant_id = $1) \
             AND ($2 IS NULL OR cabinet_id = $2) ORDER BY created_at DESC, id LIMIT CAST($3 AS BIGINT)",
        )
        .bind(merchant_id)
        .bind(cabinet_id)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| Ok(super::SessionRow::from_row(r)?))
            .collect()
    }

    /// A restock session's plan (JSON), if it has one.
    pub async fn session_plan(&self, session_id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT planned FROM sessions WHERE id = $1")
            .bind(session_id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        Ok(row.map(|r| r.try_get("planned")).transpose()?.flatten())
    }

    /// A restock's count replaces the cabinet's stock, and every product whose count differs
    /// from what was expected (the stock before, plus the plan) is kept as an open
    /// discrepancy, in one transaction; once per session (a second count of it changes
    /// nothing).
    pub async fn recount_stock(&self, r: &Recount<'_>) -> Result<Recounted> {
        let _fresh = self.caches.cabinets.invalidating(r.cabinet_id.to_owned());
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        let first =
            sqlx::query("UPDATE sessions SET counted_at = $2 WHERE id = $1 AND counted_at IS NULL")
                .bind(r.session_id)
                .bind(r.now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
        if !first {
            return Ok(Recounted::default());
        }
        sqlx::query("UPDATE cabinets SET keeps_stock = 1 WHERE id = $1 AND keeps_stock = 0")
            .bind(r.cabinet_id)
            .execute(&mut *tx)
            .await?;
        let marks: BTreeMap<String, (i64, i64)> =
            sqlx::query("SELECT sku, qty, low_at FROM cabinet_stock WHERE cabinet_id = $1")
                .bind(r.cabinet_id)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|row| {
                    Ok((
                        row.try_get("sku")?,
                        (row.try_get("qty")?, row.try_get("low_at")?),
                    ))
                })
                .collect::<Result<_>>()?;
        let before: BTreeMap<&String, i64> = marks.iter().map(|(s, (q, _))| (s, *q)).collect();
        let mut low_changes = Vec::new();
        let mut skus: Vec<&String> = marks
            .keys()
            .chain(r.planned.keys())
            .chain(r.counted.keys())
            .collect();
        skus.sort();
        skus.dedup();
        let mut found = Vec::new();
        for sku in skus {
            let expected = before.get(sku).copied().unwrap_or(0).max(0)
                + r.planned.get(sku).copied().unwrap_or(0);
            let counted = r.counted.get(sku).copied().unwrap_or(0);
            if expected != counted {
                // One count per session (its recognition is applied once), so the session and
                // the product's place in the count name it.
                let d = StockDiscrepancyRow {
                    id: format!("sd{}-{}", r.session_id, found.len() + 1),
                    cabinet_id: r.cabinet_id.to_owned(),
                    merchant_id: r.merchant_id.to_owned(),
                    session_id: r.session_id.to_owned(),
                    sku: sku.clone(),
                    expected,
                    counted,
                    state: "open".into(),
                    note: None,
                    resolved_by: None,
                    resolved_at: None,
                    created_at: r.now,
                };
                sqlx::query(
                    "INSERT INTO stock_discrepancies (id, cabinet_id, merchant_id, session_id, sku, expected, counted, state, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 'open', $8)",
                )
                .bind(&d.id)
                .bind(&d.cabinet_id)
                .bind(&d.merchant_id)
                .bind(&d.session_id)
                .bind(&d.sku)
                .bind(d.expected)
                .bind(d.counted)
                .bind(d.created_at)
                .execute(&mut *tx)
                .await?;
                found.push(d);
            }
            if let Some((was, low_at)) = marks.get(sku) {
                if (*was <= *low_at) != (counted <= *low_at) {
                    low_changes.push((
                        StockRow {
                            cabinet_id: r.cabinet_id.to_owned(),
                            sku: sku.clone(),
                            qty: counted,
                            low_at: *low_at,
                            updated_at: r.now,
                        },
                        counted <= *low_at,
                    ));
                }
            }
            if before.contains_key(sku) || r.counted.contains_key(sku) {
                sqlx::query(
                    "INSERT INTO cabinet_stock (cabinet_id, sku, qty, low_at, updated_at) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (cabinet_id, sku) DO UPDATE SET qty = excluded.qty, updated_at = excluded.updated_at",
                )
                .bind(r.cabinet_id)
                .bind(sku)
                .bind(counted)
                .bind(r.low_at)
                .bind(r.now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(Recounted {
            discrepancies: found,
            low_changes,
        })
    }

    /// A purchase's order took `taken` from a cabinet (one statement for the basket, with the
    /// order's mark that it did, in one transaction: once per order): the stock of each
    /// product the cabinet keeps stock of, before and after. Products it does not keep stock
    /// of (never counted in) are left alone.
    pub async fn take_stock(
        &self,
        cabinet_id: &str,
        order_id: &str,
        taken: &BTreeMap<String, i64>,
        now: i64,
    ) -> Result<Vec<Taken>> {
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let mut case = String::from("CASE sku");
        let mut list = String::new();
        for i in 0..taken.len() {
            let (s, q) = (2 * i + 3, 2 * i + 4);
            case.push_str(&format!(" WHEN ${s} THEN ${q}"));
            list.push_str(&format!("{}${s}", if i == 0 { "" } else { ", " }));
        }
        let sql = format!(
            "UPDATE cabinet_stock SET qty = qty - ({case} ELSE 0 END), updated_at = $2 \
             WHERE cabinet_id = $1 AND sku IN ({list}) RETURNING sku, qty, low_at"
        );
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        let first = sqlx::query(
            "UPDATE orders SET stock_taken_at = $2 WHERE id = $1 AND stock_taken_at IS NULL",
        )
        .bind(order_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !first {
            return Ok(Vec::new());
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(cabinet_id)
            .bind(now);
        for (sku, n) in taken {
            q = q.bind(sku.as_str()).bind(*n);
        }
        let rows = q.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                let sku: String = row.try_get("sku")?;
                let after: i64 = row.try_get("qty")?;
                Ok(Taken {
                    before: after + taken.get(&sku).copied().unwrap_or(0),
                    after,
                    low_at: row.try_get("low_at")?,
                    sku,
                })
            })
            .collect()
    }

    /// Sets a product's low mark in a cabinet; `false` when the cabinet keeps no stock of it.
    pub async fn set_low_at(&self, cabinet_id: &str, sku: &str, low_at: i64) -> Result<bool> {
        let r =
            sqlx::query("UPDATE cabinet_stock SET low_at = $3 WHERE cabinet_id = $1 AND sku = $2")
                .bind(cabinet_id)
                .bind(sku)
                .bind(low_at)
                .execute(&mut *self.write().await?)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Discrepancies of one merchant (or all), newest first.
    pub async fn stock_discrepancies(
        &self,
        merchant_id: Option<&str>,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<StockDiscrepancyRow>> {
        let rows = sqlx::query(
            "SELECT * FROM stock_discrepancies WHERE ($1 IS NULL OR merchant_id = $1) AND ($2 IS NULL OR state = $2) \
             ORDER BY created_at DESC, id LIMIT CAST($3 AS BIGINT)",
        )
        .bind(merchant_id)
        .bind(state)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| Ok(StockDiscrepancyRow::from_row(r)?))
            .collect()
    }

    /// One discrepancy.
    pub async fn stock_discrepancy(&self, id: &str) -> Result<Option<StockDiscrepancyRow>> {
        let row = sqlx::query("SELECT * FROM stock_discrepancies WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        Ok(row.map(|r| StockDiscrepancyRow::from_row(&r)).transpose()?)
    }

    /// Resolves an open discrepancy; `None` when it was not open.
    pub async fn resolve_discrepancy(
        &self,
        id: &str,
        by: &str,
        note: &str,
        now: i64,
    ) -> Result<Option<StockDiscrepancyRow>> {
        let row = sqlx::query(
            "UPDATE stock_discrepancies SET state = 'resolved', note = $3, resolved_by = $2, resolved_at = $4 \
             WHERE id = $1 AND state = 'open' RETURNING *",
        )
        .bind(id)
        .bind(by)
        .bind(note)
        .bind(now)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        Ok(row.map(|r| StockDiscrepancyRow::from_row(&r)).transpose()?)
    }

    /// Stores a product template.
    pub async fn insert_template(&self, t: &TemplateRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO product_templates (id, merchant_id, name, items, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&t.id)
        .bind(&t.merchant_id)
        .bind(&t.name)
        .bind(&t.items)
        .bind(t.created_at)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(())
    }

    /// One merchant's templates (or all), newest first.
    pub async fn templates(&self, merchant_id: Option<&str>) -> Result<Vec<TemplateRow>> {
        let rows = sqlx::query(
            "SELECT * FROM product_templates WHERE ($1 IS NULL OR merchant_id = $1) ORDER BY created_at DESC, id LIMIT 1000",
        )
        .bind(merchant_id)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(|r| Ok(TemplateRow::from_row(r)?)).collect()
    }

    /// One template.
    pub async fn template(&self, id: &str) -> Result<Option<TemplateRow>> {
        let row = sqlx::query("SELECT * FROM product_templates WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        Ok(row.map(|r| TemplateRow::from_row(&r)).transpose()?)
    }
}
