//! The audit trail: who did what to money and access, when and why.

use sqlx::FromRow;

use super::{Result, Store};

/// One audited action.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditRow {
    /// Id.
    pub id: String,
    /// Whose (none for a platform-wide action).
    pub merchant_id: Option<String>,
    /// The API key id that did it, or `system` / `supervisor` for the hub's own decisions.
    pub actor: String,
    /// The actor's role then (`system` for the hub).
    pub role: String,
    /// `order.resolve`, `order.refund`, `session.close`, `blacklist.add`, `blacklist.remove`,
    /// `merchant.payment`, `api_key.create`, `api_key.revoke`, `api_key.rotate`.
    pub action: String,
    /// What it was done to: an order, session, shopper, merchant or key id.
    pub subject: String,
    /// The order it concerns, if any.
    pub order_id: Option<String>,
    /// Why, as the actor said.
    pub reason: Option<String>,
    /// What was done, JSON text (amounts, items, the new settings without secrets).
    pub detail: String,
    /// Unix ms.
    pub at: i64,
}

impl Store {
    /// Records an audited action.
    pub async fn record_audit(&self, a: &AuditRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit (id, merchant_id, actor, role, action, subject, order_id, reason, detail, at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&a.id)
        .bind(a.merchant_id.as_deref())
        .bind(&a.actor)
        .bind(&a.role)
        .bind(&a.action)
        .bind(&a.subject)
        .bind(a.order_id.as_deref())
        .bind(a.reason.as_deref())
        .bind(&a.detail)
        .bind(a.at)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(())
    }

    /// The trail, newest first: of one merchant (`None`: all, the platform's view), of one
    /// order, of one action.
    pub async fn audit(
        &self,
        merchant_id: Option<&str>,
        order_id: Option<&str>,
        action: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT * FROM audit WHERE ($1 IS NULL OR merchant_id = $1) AND ($2 IS NULL OR order_id = $2) \
             AND ($3 IS NULL OR action = $3) ORDER BY at DESC, id LIMIT CAST($4 AS BIGINT)",
        )
        .bind(merchant_id)
        .bind(order_id)
        .bind(action)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(|r| Ok(AuditRow::from_row(r)?)).collect()
    }
}
