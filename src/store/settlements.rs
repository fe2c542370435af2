//! Settlements (分账) of paid orders and the returns (回退) of their splits.

use sqlx::FromRow;

use super::{Change, PaymentExceptionRow, Result, Store};

/// One order's settlement: what the platform and the merchant get, and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct SettlementRow {
    /// The order.
    pub order_id: String,
    /// Whose order.
    pub merchant_id: String,
    /// `wechat`.
    pub channel: String,
    /// `pending` (paid, not split yet), `splitting` (asked, the provider is splitting),
    /// `split` (the commission reached the platform), `finished` (the rest released to the
    /// merchant), `failed` (retried; an operator has been told), `returned` (refunded in full:
    /// the platform's share went back).
    pub state: String,
    /// What comes next: `split` (ask for it), `follow` (ask how it went), `finish` (release
    /// the rest); what a `failed` settlement retries.
    pub step: String,
    /// The merchant's commission when the order was completed (basis points).
    pub commission_bps: i64,
    /// The platform's share (fen), fixed when the split is asked for.
    pub platform_fen: i64,
    /// The merchant's share (fen).
    pub merchant_fen: i64,
    /// Of the platform's share, what went back to the merchant for refunds (fen).
    pub returned_fen: i64,
    /// The split request's number (its out_order_no carries it).
    pub attempt: i64,
    /// The provider's id of the split.
    pub provider_order_id: Option<String>,
    /// Failures in a row.
    pub failures: i64,
    /// The last failure, as the provider said it.
    pub last_error: Option<String>,
    /// When the supervisor takes it next (Unix ms).
    pub due_at: i64,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

impl SettlementRow {
    /// The split's out_order_no: the order and the attempt (a closed split is not reopened).
    pub fn split_no(&self) -> String {
        format!("S{}-{}", self.order_id, self.attempt)
    }

    /// The finish (unfreeze) request's out_order_no.
    pub fn finish_no(&self) -> String {
        format!("F{}", self.order_id)
    }
}

/// One return of a split's platform share, ahead of a refund.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct SettlementReturnRow {
    /// Its out_return_no.
    pub id: String,
    /// The order.
    pub order_id: String,
    /// The refund it goes ahead of.
    pub refund_id: String,
    /// Fen.
    pub amount_fen: i64,
    /// `processing`, `succeeded`, `failed`.
    pub state: String,
    /// Why it failed, as the provider said.
    pub fail_reason: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// A settlement's move, applied only from the state it was read in.
#[derive(Debug, Clone, Default)]
pub struct SettlementMove {
    /// The new state.
    pub state: String,
    /// What comes next.
    pub step: String,
    /// Shares, when fixed by this move.
    pub shares: Option<(i64, i64)>,
    /// The split's number, when a new split is to be asked for.
    pub attempt: Option<i64>,
    /// The provider's id, when it gave one.
    pub provider_order_id: Option<String>,
    /// Failures in a row after this move.
    pub failures: i64,
    /// The failure, if this move is one.
    pub last_error: Option<String>,
    /// When to take it next.
    pub due_at: i64,
}

impl Store {
    /// Opens the settlement of an order about to be completed with profit sharing, at the
    /// merchant's commission of now (one statement: the purchase path pays for it); an order
    /// that has one keeps it.
    pub async fn open_settlement(
        &self,
        order_id: &str,
        merchant_id: &str,
        channel: &str,
        due_at: i64,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO settlements (order_id, merchant_id, channel, state, commission_bps, due_at, created_at, updated_at) \
             SELECT $1, id, $3, 'pending', commission_bps, $4, $5, $5 FROM merchants WHERE id = $2 \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(order_id)
        .bind(merchant_id)
        .bind(channel)
        .bind(due_at)
        .bind(now)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(())
    }

    /// The settlement of an order.
    pub async fn settlement(&self, order_id: &str) -> Result<Option<SettlementRow>> {
        let row = sqlx::query("SELECT * FROM settlements WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        Ok(row.map(|r| SettlementRow::from_row(&r)).transpose()?)
    }

    /// Settlements whose time has come, of paid (or partly refunded) orders, oldest due first.
    pub async fn due_settlements(&self, now: i64, limit: i64) -> Result<Vec<SettlementRow>> {
        let rows = sqlx::query(
            "SELECT s.* FROM settlements s JOIN orders o ON o.id = s.order_id \
             WHERE s.state IN ('pending', 'splitting', 'split', 'failed') AND s.due_at <= $1 \
             AND o.status IN ('paid', 'refunded') ORDER BY s.due_at LIMIT CAST($2 AS BIGINT)",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| Ok(SettlementRow::from_row(r)?))
            .collect()
    }

    /// Settlements of one merchant (or all), most recently changed first.
    pub async fn settlements(
        &self,
        merchant_id: Option<&str>,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SettlementRow>> {
        let rows = sqlx::query(
            "SELECT * FROM settlements WHERE ($1 IS NULL OR merchant_id = $1) AND ($2 IS NULL OR state = $2) \
             ORDER BY updated_at DESC, order_id LIMIT CAST($3 AS BIGINT)",
        )
        .bind(merchant_id)
        .bind(state)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| Ok(SettlementRow::from_row(r)?))
            .collect()
    }

    /// Moves a settlement on from `from`; `None` when another pass moved it first.
    pub async fn move_settlement(
        &self,
        order_id: &str,
        from: &str,
        m: &SettlementMove,
        now: i64,
    ) -> Result<Option<SettlementRow>> {
        let (platform, merchant) = m.shares.unzip();
        let row = sqlx::query(
            "UPDATE settlements SET state = $3, step = $12, platform_fen = COALESCE($4, platform_fen), \
             merchant_fen = COALESCE($5, merchant_fen), attempt = COALESCE($6, attempt), \
             provider_order_id = CASE WHEN $6 IS NULL THEN COALESCE($7, provider_order_id) ELSE $7 END, \
             failures = $8, last_error = $9, due_at = $10, updated_at = $11 \
             WHERE order_id = $1 AND state = $2 RETURNING *",
        )
        .bind(order_id)
        .bind(from)
        .bind(&m.state)
        .bind(platform)
        .bind(merchant)
        .bind(m.attempt)
        .bind(m.provider_order_id.as_deref())
        .bind(m.failures)
        .bind(m.last_error.as_deref())
        .bind(m.due_at)
        .bind(now)
        .bind(&m.step)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        let moved = row.map(|r| SettlementRow::from_row(&r)).transpose()?;
        if let Some(s) = &moved {
            self.changed(Change::Settlement(s.clone()));
        }
        Ok(moved)
    }

    /// Makes a settlement still under way due now (an operator's retry); `None` when it has
    /// none under way.
    pub async fn retry_settlement(
        &self,
        order_id: &str,
        now: i64,
    ) -> Result<Option<SettlementRow>> {
        let row = sqlx::query(
            "UPDATE settlements SET due_at = $2, updated_at = $2 \
             WHERE order_id = $1 AND state IN ('pending', 'splitting', 'split', 'failed') RETURNING *",
        )
        .bind(order_id)
        .bind(now)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        let row = row.map(|r| SettlementRow::from_row(&r)).transpose()?;
        if let Some(s) = &row {
            self.changed(Change::Settlement(s.clone()));
        }
        Ok(row)
    }

    /// Opens the return ahead of a refund, or answers the one opened before (same id).
    pub async fn open_return(&self, r: &SettlementReturnRow) -> Result<SettlementReturnRow> {
        let mut conn = self.write().await?;
        sqlx::query(
            "INSERT INTO settlement_returns (id, order_id, refund_id, amount_fen, state, fail_reason, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&r.id)
        .bind(&r.order_id)
        .bind(&r.refund_id)
        .bind(r.amount_fen)
        .bind(&r.state)
        .bind(r.fail_reason.as_deref())
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&mut *conn)
        .await?;
        let row = sqlx::query("SELECT * FROM settlement_returns WHERE id = $1")
            .bind(&r.id)
            .fetch_one(&mut *conn)
            .await?;
        Ok(SettlementReturnRow::from_row(&row)?)
    }

    /// Settles a return in flight: `succeeded` adds its amount to the settlement's returned
    /// share (and makes it `returned` once all of it went back), in one transaction.
    pub async fn settle_return(
        &self,
        id: &str,
        state: &str,
        fail_reason: Option<&str>,
        now: i64,
    ) -> Result<Option<SettlementReturnRow>> {
        let mut conn = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let row = sqlx::query(
            "UPDATE settlement_returns SET state = $2, fail_reason = $3, updated_at = $4 \
             WHERE id = $1 AND state = 'processing' RETURNING *",
        )
        .bind(id)
        .bind(state)
        .bind(fail_reason)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row.map(|r| SettlementReturnRow::from_row(&r)).transpose()? else {
            tx.commit().await?;
            return Ok(None);
        };
        let mut moved = None;
        if state == "succeeded" {
            let s = sqlx::query(
                "UPDATE settlements SET returned_fen = returned_fen + $2, \
                 state = CASE WHEN returned_fen + $2 >= platform_fen THEN 'returned' ELSE state END, \
                 updated_at = $3 WHERE order_id = $1 RETURNING *",
            )
            .bind(&row.order_id)
            .bind(row.amount_fen)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            moved = s.map(|r| SettlementRow::from_row(&r)).transpose()?;
        }
        tx.commit().await?;
        if let Some(s) = moved {
            self.changed(Change::Settlement(s));
        }
        Ok(Some(row))
    }

    /// Records a payment exception that no notice brought (a settlement step that failed).
    pub async fn record_payment_exception(&self, e: &PaymentExceptionRow) -> Result<()> {
        super::sessions::insert_payment_exception(&mut *self.write().await?, e).await?;
        self.changed(Change::PaymentException(e.clone()));
        Ok(())
    }

    /// The returns of an order's split, oldest first.
    pub async fn settlement_returns(&self, order_id: &str) -> Result<Vec<SettlementReturnRow>> {
        let rows = sqlx::query(
            "SELECT * FROM settlement_returns WHERE order_id = $1 ORDER BY created_at, id",
        )
        .bind(order_id)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| Ok(SettlementReturnRow::from_row(r)?))
            .collect()
    }
}
