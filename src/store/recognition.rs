//! Recognition billing (算法识别次数): merchants' prepaid quotas, and the recognitions their
//! orders record.

use sqlx::Row;

use super::{Result, Store};

impl Store {
    /// One recognition comes out of a prepaid merchant's quota; what is left, or `None` for a
    /// merchant that pays after use.
    pub async fn use_recognition(&self, merchant_id: &str) -> Result<Option<i64>> {
        let _fresh = self.caches.terms.invalidating(merchant_id.to_owned());
        let row = sqlx::query(
            "UPDATE merchants SET recognition_quota = recognition_quota - 1 \
             WHERE id = $1 AND recognition_billing = 'prepaid' RETURNING recognition_quota",
        )
        .bind(merchant_id)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        row.map(|r| Ok(r.try_get("recognition_quota")?)).transpose()
    }

    /// Sets how a merchant pays for recognitions (`billing`, when given) and adds `add` to its
    /// quota; the billing and quota after, or `None` for an unknown merchant.
    pub async fn set_recognition(
        &self,
        merchant_id: &str,
        billing: Option<&str>,
        add: i64,
    ) -> Result<Option<(String, i64)>> {
        let _fresh = self.caches.terms.invalidating(merchant_id.to_owned());
        let row = sqlx::query(
            "UPDATE merchants SET recognition_billing = COALESCE($2, recognition_billing), \
             recognition_quota = recognition_quota + $3 WHERE id = $1 \
             RETURNING recognition_billing, recognition_quota",
        )
        .bind(merchant_id)
        .bind(billing)
        .bind(add)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        row.map(|r| {
            Ok((
                r.try_get("recognition_billing")?,
                r.try_get("recognition_quota")?,
            ))
        })
        .transpose()
    }

    /// A merchant's recognitions in `[from, to)` (Unix ms) and what they cost on its bills
    /// (PostgreSQL sums BIGINTs as NUMERIC: cast back).
    pub async fn recognitions_between(
        &self,
        merchant_id: &str,
        from: i64,
        to: i64,
    ) -> Result<(i64, i64)> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(recognition_fee_fen), 0) AS BIGINT) AS fee FROM orders \
             WHERE merchant_id = $1 AND recognized_at >= $2 AND recognized_at < $3",
        )
        .bind(merchant_id)
        .bind(from)
        .bind(to)
        .fetch_one(&mut *self.read().await?)
        .await?;
        Ok((row.try_get("n")?, row.try_get("fee")?))
    }
}
