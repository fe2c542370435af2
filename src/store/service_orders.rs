//! Service-time orders (设备使用时长): a merchant's purchase of whole years for its cabinets.

use sqlx::FromRow;

use super::{Notice, Result, Store};

/// A year, as service time counts it (a cabinet bought for two years serves 730 days).
pub const YEAR_MS: i64 = 365 * 86_400_000;

/// One service-time order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ServiceOrderRow {
    /// Id; the provider's `out_trade_no`.
    pub id: String,
    /// Whose cabinets.
    pub merchant_id: String,
    /// The cabinets, as a JSON array of ids.
    #[serde(skip)]
    pub cabinet_ids: String,
    /// How many cabinets.
    pub cabinets: i64,
    /// Whole years for each cabinet.
    pub years: i64,
    /// The price of one cabinet's year when the order was made (fen).
    pub unit_fen: i64,
    /// What is owed: `unit_fen × years × cabinets` (fen).
    pub amount_fen: i64,
    /// `wechat` (WeChat Pay, scanned from `code_url`) or `offline` (recorded by the platform).
    pub channel: String,
    /// `unpaid`, `paid` (the service was extended), `cancelled` (closed unpaid).
    pub status: String,
    /// What the payer scans (WeChat Pay Native `code_url`).
    pub code_url: Option<String>,
    /// The provider's transaction id.
    pub transaction_id: Option<String>,
    /// An offline payment's voucher reference.
    pub voucher: Option<String>,
    /// The key that made it.
    pub created_by: String,
    /// Unix ms.
    pub created_at: i64,
    /// When an unpaid order is closed and cancelled (Unix ms).
    pub due_at: i64,
    /// Unix ms.
    pub paid_at: Option<i64>,
    /// Unix ms.
    pub cancelled_at: Option<i64>,
    /// Unix ms.
    pub updated_at: i64,
}

impl ServiceOrderRow {
    /// The cabinets it buys for.
    pub fn cabinet_list(&self) -> Vec<String> {
        serde_json::from_str(&self.cabinet_ids).unwrap_or_default()
    }
}

/// What paying a service order came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServicePaid {
    /// The provider's notice was seen before: nothing changed.
    Replay,
    /// Paid now, and the service extended.
    Paid(ServiceOrderRow),
    /// It was no longer unpaid (paid already, or cancelled: the order as it is now), or is no
    /// order of ours; a notice given is not recorded.
    Unchanged(Option<ServiceOrderRow>),
}

/// How a service order came to be paid.
#[derive(Debug, Clone, Copy)]
pub struct ServicePayment<'a> {
    /// The provider's transaction id.
    pub transaction_id: Option<&'a str>,
    /// When (Unix ms).
    pub at: i64,
}

impl Store {
    /// Stores a new service order.
    pub async fn insert_service_order(&self, o: &ServiceOrderRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO service_orders (id, merchant_id, cabinet_ids, cabinets, years, unit_fen, amount_fen, channel, status, \
             code_url, transaction_id, voucher, created_by, created_at, due_at, paid_at, cancelled_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        )
        .bind(&o.id)
        .bind(&o.merchant_id)
        .bind(&o.cabinet_ids)
        .bind(o.cabinets)
        .bind(o.years)
        .bind(o.unit_fen)
        .bind(o.amount_fen)
        .bind(&o.channel)
        .bind(&o.status)
        .bind(o.code_url.as_deref())
        .bind(o.transaction_id.as_deref())
        .bind(o.voucher.as_deref())
        .bind(&o.created_by)
        .bind(o.created_at)
        .bind(o.due_at)
        .bind(o.paid_at)
        .bind(o.cancelled_at)
        .bind(o.updated_at)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(())
    }

    /// Records what the payer scans.
    pub async fn set_service_code_url(&self, id: &str, code_url: &str) -> Result<()> {
        sqlx::query("UPDATE service_orders SET code_url = $2 WHERE id = $1")
            .bind(id)
            .bind(code_url)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    /// One service order.
    pub async fn service_order(&self, id: &str) -> Result<Option<ServiceOrderRow>> {
        let row = sqlx::query("SELECT * FROM service_orders WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        Ok(row.map(|r| ServiceOrderRow::from_row(&r)).transpose()?)
    }

    /// One merchant's service orders (or every merchant's), newest first.
    pub async fn service_orders(
        &self,
        merchant_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ServiceOrderRow>> {
        let rows = sqlx::query(
            "SELECT * FROM service_orders WHERE ($1 IS NULL OR merchant_id = $1) \
             ORDER BY created_at DESC, id LIMIT CAST($2 AS BIGINT)",
        )
        .bind(merchant_id)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| Ok(ServiceOrderRow::from_row(r)?))
            .collect()
    }

    /// Unpaid orders whose time to be closed has come, oldest first.
    pub async fn due_service_orders(&self, now: i64, limit: i64) -> Result<Vec<ServiceOrderRow>> {
        let rows = sqlx::query(
            "SELECT * FROM service_orders WHERE status = 'unpaid' AND due_at <= $1 ORDER BY due_at LIMIT CAST($2 AS BIGINT)",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| Ok(ServiceOrderRow::from_row(r)?))
            .collect()
    }

    /// An unpaid order is paid: in one transaction, with the provider's notice when one says
    /// so (a repeat of it changes nothing), it becomes `paid` and each of its cabinets serves
    /// `years` more from the later of now and its current end.
    pub async fn pay_service_order(
        &self,
        id: &str,
        paid: ServicePayment<'_>,
        notice: Option<&Notice<'_>>,
    ) -> Result<ServicePaid> {
        let Some(o) = self.service_order(id).await? else {
            return Ok(ServicePaid::Unchanged(None));
        };
        let cabinets = o.cabinet_list();
        let _fresh: Vec<_> = cabinets
            .iter()
            .map(|c| self.caches.cabinets.invalidating(c.clone()))
            .collect();
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        if let Some(n) = notice {
            let first = sqlx::query("INSERT INTO payment_notifications (id, provider, event_type, received_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                .bind(n.id)
                .bind(n.provider)
                .bind(n.kind)
                .bind(n.now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
            if !first {
                return Ok(ServicePaid::Replay);
            }
        }
        let row = sqlx::query(
            "UPDATE service_orders SET status = 'paid', transaction_id = COALESCE($2, transaction_id), \
             paid_at = $3, updated_at = $3 WHERE id = $1 AND status = 'unpaid' RETURNING *",
        )
        .bind(id)
        .bind(paid.transaction_id)
        .bind(paid.at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            // Not unpaid any more: nothing is recorded here (the caller records the notice, or
            // keeps it as an exception, by what the order is now).
            drop(tx);
            drop(w);
            return Ok(ServicePaid::Unchanged(self.service_order(id).await?));
        };
        let paid_row = ServiceOrderRow::from_row(&row)?;
        for c in &cabinets {
            sqlx::query(
                "UPDATE cabinets SET service_expires_at = CASE WHEN service_expires_at IS NULL OR service_expires_at < $3 \
                 THEN $3 ELSE service_expires_at END + $4, service_reminded_days = NULL WHERE id = $1 AND merchant_id = $2",
            )
            .bind(c)
            .bind(&paid_row.merchant_id)
            .bind(paid.at)
            .bind(paid_row.years * YEAR_MS)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(ServicePaid::Paid(paid_row))
    }

    /// An unpaid order the sweep could not settle is looked at again at `due_at`, behind the
    /// others (a few that never settle must not hold up the rest).
    pub async fn defer_service_order(&self, id: &str, due_at: i64) -> Result<()> {
        sqlx::query("UPDATE service_orders SET due_at = $2 WHERE id = $1 AND status = 'unpaid'")
            .bind(id)
            .bind(due_at)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    /// An unpaid order is cancelled (closed at the provider first); `None` when it was no
    /// longer unpaid.
    pub async fn cancel_service_order(
        &self,
        id: &str,
        now: i64,
    ) -> Result<Option<ServiceOrderRow>> {
        let row = sqlx::query(
            "UPDATE service_orders SET status = 'cancelled', cancelled_at = $2, updated_at = $2 \
             WHERE id = $1 AND status = 'unpaid' RETURNING *",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        Ok(row.map(|r| ServiceOrderRow::from_row(&r)).transpose()?)
    }
}
