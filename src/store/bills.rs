//! What a merchant's bill of one day is made of, read in one go.

use sqlx::FromRow;

use super::{
    OrderRow, RefundRow, Result, ServiceOrderRow, SettlementReturnRow, SettlementRow, Store,
};

/// A merchant's rows of one day (`[from, to)` in Unix ms).
#[derive(Debug, Clone, Default)]
pub struct DayRows {
    /// Orders paid in the day, in the order they were paid.
    pub paid: Vec<OrderRow>,
    /// The settlements of those orders.
    pub settlements: Vec<SettlementRow>,
    /// Refunds the provider settled as succeeded in the day (of any day's orders).
    pub refunds: Vec<RefundRow>,
    /// Returns of the platform's commission that succeeded in the day.
    pub returns: Vec<SettlementReturnRow>,
    /// Service time the merchant bought and paid in the day.
    pub service: Vec<ServiceOrderRow>,
    /// Recognitions of the day's sessions (算法识别次数) and what they cost after use (fen;
    /// those a prepaid quota paid for cost 0 here).
    pub recognitions: (i64, i64),
}

impl Store {
    /// A merchant's day, for its bill. Read on one connection, each part by the time it
    /// belongs to the day by: payments by `paid_at`, refunds and returns by when they settled.
    pub async fn day_rows(&self, merchant_id: &str, from: i64, to: i64) -> Result<DayRows> {
        let mut conn = self.read().await?;
        let paid = sqlx::query(
            "SELECT * FROM orders WHERE merchant_id = $1 AND paid_at >= $2 AND paid_at < $3 \
             AND status IN ('paid', 'refunded') ORDER BY paid_at, id",
        )
        .bind(merchant_id)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await?;
        let settlements = sqlx::query(
            "SELECT s.* FROM settlements s JOIN orders o ON o.id = s.order_id \
             WHERE o.merchant_id = $1 AND o.paid_at >= $2 AND o.paid_at < $3 \
             AND o.status IN ('paid', 'refunded') ORDER BY s.order_id",
        )
        .bind(merchant_id)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await?;
        let refunds = sqlx::query(
            "SELECT r.* FROM refunds r JOIN orders o ON o.id = r.order_id \
             WHERE r.status = 'succeeded' AND r.updated_at >= $2 AND r.updated_at < $3 \
             AND o.merchant_id = $1 ORDER BY r.updated_at, r.id",
        )
        .bind(merchant_id)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await?;
        let returns = sqlx::query(
            "SELECT x.* FROM settlement_returns x JOIN orders o ON o.id = x.order_id \
             WHERE x.state = 'succeeded' AND x.updated_at >= $2 AND x.updated_at < $3 \
             AND o.merchant_id = $1 ORDER BY x.updated_at, x.id",
        )
        .bind(merchant_id)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await?;
        let service = sqlx::query(
            "SELECT * FROM service_orders WHERE merchant_id = $1 AND status = 'paid' \
             AND paid_at >= $2 AND paid_at < $3 ORDER BY paid_at, id",
        )
        .bind(merchant_id)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await?;
        drop(conn);
        let recognitions = self.recognitions_between(merchant_id, from, to).await?;
        Ok(DayRows {
            paid: paid
                .iter()
                .map(|r| Ok(OrderRow::from_row(r)?))
                .collect::<Result<_>>()?,
            settlements: settlements
                .iter()
                .map(|r| Ok(SettlementRow::from_row(r)?))
                .collect::<Result<_>>()?,
            refunds: refunds
                .iter()
                .map(|r| Ok(RefundRow::from_row(r)?))
                .collect::<Result<_>>()?,
            returns: returns
                .iter()
                .map(|r| Ok(SettlementReturnRow::from_row(r)?))
                .collect::<Result<_>>()?,
            service: service
                .iter()
                .map(|r| Ok(ServiceOrderRow::from_row(r)?))
                .collect::<Result<_>>()?,
            recognitions,
        })
    }
}
