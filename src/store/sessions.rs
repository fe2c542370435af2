//! Purchase sessions, their orders, and the provider notifications already applied. Every
//! state change is a conditional update (`WHERE state = expected`), so a redelivered event or a
//! concurrent handler changes nothing twice.

use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

use super::{conflict_or, Change, MerchantPayment, Result, Store};

/// A purchase or restock session.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    sqlx::FromRow,
    utoipa::ToSchema,
)]
pub struct SessionRow {
    /// Id (also the provider's `out_order_no`).
    pub id: String,
    /// Cabinet.
    pub cabinet_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Shopper or restocker.
    pub user_id: String,
    /// `wechat`, `alipay` or `none` (restock).
    pub channel: String,
    /// `purchase` or `restock`.
    pub mode: String,
    /// `confirming`, `unlocking`, `open`, `closed`, `failed`.
    pub state: String,
    /// Why it failed (a refusal code).
    pub failure: Option<String>,
    /// The caller's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// Unix ms.
    pub unlocked_at: Option<i64>,
    /// Who ended it from outside: an operator's key id, or `supervisor`.
    pub closed_by: Option<String>,
    /// Why they did.
    pub close_note: Option<String>,
}

/// A session found by its idempotency key.
#[derive(Debug, Clone)]
pub struct KeyedSession {
    /// The session.
    pub session: SessionRow,
    /// The answer given, once there is one.
    pub response: Option<String>,
    /// The hash of the request that took the key (`None` for rows stored before hashing).
    pub request_hash: Option<String>,
    /// The boot id of the process that took the key.
    pub claimed_by: Option<String>,
}

/// A session's order.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct OrderRow {
    /// Id.
    pub id: String,
    /// Session.
    pub session_id: String,
    /// Cabinet.
    pub cabinet_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Shopper.
    pub user_id: String,
    /// Payment channel.
    pub channel: String,
    /// `open`, `completing`, `pending_payment`, `paid`, `closed`, `abnormal`, `cancelled`.
    pub status: String,
    /// Why abnormal.
    pub abnormal_reason: Option<String>,
    /// Recognised items, JSON.
    pub items: Option<String>,
    /// The priced order, JSON.
    pub priced: Option<String>,
    /// Final amount (fen).
    pub total_fen: Option<i64>,
    /// Paid so far (fen).
    pub paid_fen: i64,
    /// The provider order number.
    pub provider_order_no: Option<String>,
    /// The provider's trade number (refunds need it).
    pub transaction_id: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// Refunded so far (fen): succeeded refunds only.
    pub refunded_fen: i64,
    /// Collection attempts after a failed deduction.
    pub collect_attempts: i64,
    /// Refunds in flight (fen): reserved against the paid amount until the provider answers.
    #[sqlx(default)]
    pub refund_reserved_fen: i64,
    /// When it was paid (Unix ms): the provider's refund window runs from here.
    #[sqlx(default)]
    pub paid_at: Option<i64>,
    /// When the cabinet's recognition was applied to it (Unix ms): a counted recognition.
    #[sqlx(default)]
    pub recognized_at: Option<i64>,
    /// What that recognition costs the merchant on the bill (fen; 0 from a prepaid quota).
    #[sqlx(default)]
    pub recognition_fee_fen: i64,
    /// The prices and promotions in force when the shopper shopped (JSON), kept with an order
    /// that went abnormal.
    #[sqlx(default)]
    pub price_terms: Option<String>,
    /// The most the shopper authorised (the provider order's ceiling), fen.
    #[sqlx(default)]
    pub authorised_fen: Option<i64>,
    /// Whose side a failed deduction was on: `shopper` (or unknown), `merchant`.
    #[sqlx(default)]
    pub deduction_failure: Option<String>,
}

/// A refund of (part of) an order.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RefundRow {
    /// Id (the provider's `out_refund_no`).
    pub id: String,
    /// Order.
    pub order_id: String,
    /// The caller's key.
    pub idempotency_key: Option<String>,
    /// Amount (fen).
    pub amount_fen: i64,
    /// Why (the appeal).
    pub reason: String,
    /// `processing` (sent, or being sent, to the provider), `succeeded`, `failed` (refused, or
    /// the provider's ABNORMAL: its amount is released), `closed`.
    pub status: String,
    /// The provider's id.
    pub provider_refund_id: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// A blacklist entry (黑名单).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct BlacklistRow {
    /// Merchant.
    pub merchant_id: String,
    /// Shopper.
    pub user_id: String,
    /// Why.
    pub reason: String,
    /// Added by the hub for unpaid orders (and removed by it once they are paid).
    pub automatic: bool,
    /// Unix ms.
    pub created_at: i64,
    /// A key id, or `system`.
    pub created_by: String,
}

/// Which orders to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct OrderFilter<'a> {
    /// Only this merchant's.
    pub merchant_id: Option<&'a str>,
    /// Only this cabinet's.
    pub cabinet_id: Option<&'a str>,
    /// Only in this status.
    pub status: Option<&'a str>,
    /// Created at or after (Unix ms).
    pub from: Option<i64>,
    /// Created before (Unix ms).
    pub to: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

/// What an order's change of status also sets; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct OrderUpdate<'a> {
    /// Why it is abnormal or cancelled.
    pub reason: Option<&'a str>,
    /// Recognised items, JSON.
    pub items: Option<&'a str>,
    /// The priced order, JSON.
    pub priced: Option<&'a str>,
    /// The final amount.
    pub total_fen: Option<i64>,
    /// The prices and promotions in force when the shopper shopped, JSON (kept with an order
    /// that goes abnormal, to price it when it is resolved).
    pub price_terms: Option<&'a str>,
    /// The cabinet's recognition is applied by this move (counted: 算法识别次数), at this fee
    /// on the merchant's bill (0 when a prepaid quota pays for it).
    pub recognition_fee: Option<i64>,
}

fn session_row(r: &AnyRow) -> Result<SessionRow> {
    Ok(SessionRow::from_row(r)?)
}

fn order_row(r: &AnyRow) -> Result<OrderRow> {
    Ok(OrderRow::from_row(r)?)
}

impl Store {
    /// A merchant's payment settings; `None` for an unknown merchant.
    pub async fn merchant_payment(&self, merchant_id: &str) -> Result<Option<MerchantPayment>> {
        self.caches
            .terms
            .get_or_load(&merchant_id.to_owned(), || async {
                let row = sqlx::query(
                    "SELECT risk_ceiling_fen, wechat_sub_mchid, service_phone, alipay_smid, \
                     alipay_app_auth_token, recognition_billing, recognition_quota FROM merchants WHERE id = $1",
                )
                .bind(merchant_id)
                .fetch_optional(&mut *self.read().await?)
                .await?;
                row.map(|r| {
                    Ok(MerchantPayment {
                        risk_ceiling_fen: r.try_get("risk_ceiling_fen")?,
                        wechat_sub_mchid: r.try_get("wechat_sub_mchid")?,
                        service_phone: r.try_get("service_phone")?,
                        alipay_smid: r.try_get("alipay_smid")?,
                        alipay_app_auth_token: r.try_get("alipay_app_auth_token")?,
                        recognition_prepaid: r.try_get::<String, _>("recognition_billing")?
                            == "prepaid",
                        recognition_quota: r.try_get("recognition_quota")?,
                    })
                })
                .transpose()
            })
            .await
    }

    /// Sets a merchant's payment settings.
    pub async fn set_merchant_payment(&self, merchant_id: &str, p: &MerchantPayment) -> Result<()> {
        let _fresh = self.caches.terms.invalidating(merchant_id.to_owned());
        sqlx::query(
            "UPDATE merchants SET risk_ceiling_fen = $2, wechat_sub_mchid = $3, service_phone = $4, \
             alipay_smid = $5, alipay_app_auth_token = $6 WHERE id = $1",
        )
        .bind(merchant_id)
        .bind(p.risk_ceiling_fen)
        .bind(p.wechat_sub_mchid.as_deref())
        .bind(p.service_phone.as_deref())
        .bind(p.alipay_smid.as_deref())
        .bind(p.alipay_app_auth_token.as_deref())
        .execute(&mut *self.write().await?)
        .await?;
        Ok(())
    }

    /// Stores a new session and its order together, before anything is acknowledged.
    /// A repeated idempotency key is a `Conflict`.
    /// `claim` is the request's hash and the process's boot id, stored with the key.
    pub async fn create_session(
        &self,
        s: &SessionRow,
        o: &OrderRow,
        claim: Option<(&str, &str)>,
        planned: Option<&str>,
    ) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        sqlx::query(
            "INSERT INTO sessions (id, cabinet_id, merchant_id, user_id, channel, mode, state, idempotency_key, created_at, updated_at, request_hash, claimed_by, planned) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&s.id)
        .bind(&s.cabinet_id)
        .bind(&s.merchant_id)
        .bind(&s.user_id)
        .bind(&s.channel)
        .bind(&s.mode)
        .bind(&s.state)
        .bind(s.idempotency_key.as_deref())
        .bind(s.created_at)
        .bind(s.updated_at)
        .bind(claim.map(|c| c.0))
        .bind(claim.map(|c| c.1))
        .bind(planned)
        .execute(&mut *tx)
        .await
        .map_err(conflict_or)?;
        sqlx::query(
            "INSERT INTO orders (id, session_id, cabinet_id, merchant_id, user_id, channel, status, provider_order_no, created_at, updated_at, authorised_fen) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&o.id)
        .bind(&o.session_id)
        .bind(&o.cabinet_id)
        .bind(&o.merchant_id)
        .bind(&o.user_id)
        .bind(&o.channel)
        .bind(&o.status)
        .bind(o.provider_order_no.as_deref())
        .bind(o.created_at)
        .bind(o.updated_at)
        .bind(o.authorised_fen)
        .execute(&mut *tx)
        .await
        .map_err(conflict_or)?;
        tx.commit().await?;
        self.changed(Change::Session(s.clone()));
        self.changed(Change::Order(o.clone()));
        Ok(())
    }

    /// A session by id.
    pub async fn session(&self, id: &str) -> Result<Option<SessionRow>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        row.map(|r| session_row(&r)).transpose()
    }

    /// A session by the caller's idempotency key, with the answer given the first time and
    /// the request and process the key is bound to.
    pub async fn session_by_key(
        &self,
        merchant_id: &str,
        key: &str,
    ) -> Result<Option<KeyedSession>> {
        let row =
            sqlx::query("SELECT * FROM sessions WHERE merchant_id = $1 AND idempotency_key = $2")
                .bind(merchant_id)
                .bind(key)
                .fetch_optional(&mut *self.read().await?)
                .await?;
        row.map(|r| {
            Ok(KeyedSession {
                session: session_row(&r)?,
                response: r.try_get("response")?,
                request_hash: r.try_get("request_hash")?,
                claimed_by: r.try_get("claimed_by")?,
            })
        })
        .transpose()
    }

    /// Takes an unanswered idempotency key off the session that holds it, so that a new
    /// request may claim it; false when it was answered or reclaimed meanwhile.
    pub async fn release_session_key(&self, id: &str, key: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE sessions SET idempotency_key = NULL WHERE id = $1 AND idempotency_key = $2 AND response IS NULL",
        )
        .bind(id)
        .bind(key)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Moves a session from `from` to `to`, answering the session as committed; `None` when it
    /// was not in `from`.
    pub async fn transition_session(
        &self,
        id: &str,
        from: &str,
        to: &str,
        failure: Option<&str>,
        now: i64,
    ) -> Result<Option<SessionRow>> {
        let r = sqlx::query(
            "UPDATE sessions SET state = $3, failure = COALESCE($4, failure), updated_at = $5, \
             unlocked_at = CASE WHEN $3 = 'open' THEN $5 ELSE unlocked_at END WHERE id = $1 AND state = $2 RETURNING *",
        )
        .bind(id)
        .bind(from)
        .bind(to)
        .bind(failure)
        .bind(now)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        self.announce_session(r)
    }

    /// Moves a session from `unlocking` to `open` and, in the same write, stores the answer a
    /// repeat of its idempotent request gets (`None` leaves it unset); `None` when it was no
    /// longer unlocking. One write instead of two on the unlock path.
    pub async fn open_session(
        &self,
        id: &str,
        now: i64,
        response: Option<&str>,
    ) -> Result<Option<SessionRow>> {
        let r = sqlx::query(
            "UPDATE sessions SET state = 'open', updated_at = $2, unlocked_at = $2, \
             response = COALESCE($3, response) WHERE id = $1 AND state = 'unlocking' RETURNING *",
        )
        .bind(id)
        .bind(now)
        .bind(response)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        self.announce_session(r)
    }

    /// The row a state change returned, announced as committed; `None` when no row matched.
    fn announce_session(&self, row: Option<AnyRow>) -> Result<Option<SessionRow>> {
        let Some(row) = row else { return Ok(None) };
        let s = session_row(&row)?;
        self.changed(Change::Session(s.clone()));
        Ok(Some(s))
    }

    /// Remembers the answer given to an idempotent request.
    pub async fn set_session_response(&self, id: &str, response: &str) -> Result<()> {
        sqlx::query("UPDATE sessions SET response = $2 WHERE id = $1")
            .bind(id)
            .bind(response)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    /// A session's order.
    pub async fn order_of_session(&self, session_id: &str) -> Result<Option<OrderRow>> {
        let row = sqlx::query("SELECT * FROM orders WHERE session_id = $1")
            .bind(session_id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        row.map(|r| order_row(&r)).transpose()
    }

    /// An order by id.
    pub async fn order(&self, id: &str) -> Result<Option<OrderRow>> {
        let row = sqlx::query("SELECT * FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        row.map(|r| order_row(&r)).transpose()
    }

    /// Orders, newest first, optionally of one merchant, cabinet or status.
    pub async fn orders(&self, f: &OrderFilter<'_>) -> Result<Vec<OrderRow>> {
        let mut sql = String::from("SELECT * FROM orders WHERE 1=1");
        let mut binds: Vec<String> = Vec::new();
        for (col, v) in [
            ("merchant_id", f.merchant_id),
            ("cabinet_id", f.cabinet_id),
            ("status", f.status),
        ] {
            if let Some(v) = v {
                binds.push(v.to_owned());
                sql.push_str(&format!(" AND {col} = ${}", binds.len()));
            }
        }
        // Time bounds (Unix ms, `[from, to)`) are numbered after the text binds.
        let mut times: Vec<i64> = Vec::new();
        for (op, v) in [(">=", f.from), ("<", f.to)] {
            if let Some(v) = v {
                times.push(v);
                sql.push_str(&format!(
                    " AND created_at {op} ${}",
                    binds.len() + times.len()
                ));
            }
        }
        sql.push_str(&format!(
            " ORDER BY created_at DESC, id LIMIT CAST(${} AS BIGINT)",
            binds.len() + times.len() + 1
        ));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in binds {
            q = q.bind(b);
        }
        for t in times {
            q = q.bind(t);
        }
        let rows = q.bind(f.limit).fetch_all(&mut *self.read().await?).await?;
        rows.iter().map(order_row).collect()
    }

    /// Moves an order from one of `from` to `to` with the given fields; false when it was in
    /// none of them (already moved by a redelivery or a concurrent handler).
    pub async fn transition_order(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
        set: &OrderUpdate<'_>,
        now: i64,
    ) -> Result<bool> {
        let mut sql = String::from(
            "UPDATE orders SET status = $2, abnormal_reason = COALESCE($3, abnormal_reason), items = COALESCE($4, items), \
             priced = COALESCE($5, priced), total_fen = COALESCE($6, total_fen), updated_at = $7, \
             price_terms = COALESCE($8, price_terms), \
             recognized_at = CASE WHEN $9 IS NOT NULL AND recognized_at IS NULL THEN $7 ELSE recognized_at END, \
             recognition_fee_fen = CASE WHEN $9 IS NOT NULL AND recognized_at IS NULL THEN $9 ELSE recognition_fee_fen END \
             WHERE id = $1 AND status IN (",
        );
        for i in 0..from.len() {
            sql.push_str(&format!("{}${}", if i == 0 { "" } else { ", " }, i + 10));
        }
        sql.push_str(") RETURNING *");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(to)
            .bind(set.reason)
            .bind(set.items)
            .bind(set.priced)
            .bind(set.total_fen)
            .bind(now)
            .bind(set.price_terms)
            .bind(set.recognition_fee);
        for f in from {
            q = q.bind(*f);
        }
        match q.fetch_optional(&mut *self.write().await?).await? {
            Some(row) => {
                self.changed(Change::Order(order_row(&row)?));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Marks an order paid (once).
    pub async fn mark_order_paid(
        &self,
        id: &str,
        paid_fen: i64,
        transaction_id: Option<&str>,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE orders SET status = 'paid', paid_fen = $2, transaction_id = COALESCE($3, transaction_id), updated_at = $4, paid_at = $4 \
             WHERE id = $1 AND status IN ('completing', 'pending_payment') RETURNING *",
        )
        .bind(id)
        .bind(paid_fen)
        .bind(transaction_id)
        .bind(now)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        match r {
            Some(row) => {
                self.changed(Change::Order(order_row(&row)?));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Stores a provider notice with what it does, in one transaction: its id (a repeat is a
    /// replay, and changes nothing), and its effect. Either both are stored or neither, so a
    /// notice that could not be applied is not taken for a replay when the provider delivers
    /// it again.
    pub async fn apply_notification(
        &self,
        notice: &Notice<'_>,
        effect: &NoticeEffect<'_>,
    ) -> Result<NoticeOutcome> {
        if matches!(effect, NoticeEffect::Record) {
            // One statement is a transaction by itself: no begin and commit round trips (a
            // confirmation notice per purchase).
            let first = self
                .record_notification(notice.id, notice.provider, notice.kind, notice.now)
                .await?;
            return Ok(if first {
                NoticeOutcome::Applied { order_moved: false }
            } else {
                NoticeOutcome::Replay
            });
        }
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        let first = sqlx::query("INSERT INTO payment_notifications (id, provider, event_type, received_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
            .bind(notice.id)
            .bind(notice.provider)
            .bind(notice.kind)
            .bind(notice.now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !first {
            return Ok(NoticeOutcome::Replay);
        }
        let mut changed = None;
        match effect {
            NoticeEffect::Record => {}
            NoticeEffect::Paid {
                order_id,
                paid_fen,
                transaction_id,
            } => {
                let row = sqlx::query(
                    "UPDATE orders SET status = 'paid', paid_fen = $2, transaction_id = COALESCE($3, transaction_id), updated_at = $4, paid_at = $4 \
                     WHERE id = $1 AND status IN ('completing', 'pending_payment') RETURNING *",
                )
                .bind(*order_id)
                .bind(*paid_fen)
                .bind(*transaction_id)
                .bind(notice.now)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(row) = row {
                    changed = Some(Change::Order(order_row(&row)?));
                }
            }
            NoticeEffect::Exception(e) => {
                insert_payment_exception(&mut tx, e).await?;
                changed = Some(Change::PaymentException(e.clone()));
            }
            NoticeEffect::Refund {
                refund_id,
                status,
                provider_refund_id,
            } => {
                changed =
                    settle_refund_on(&mut tx, refund_id, status, *provider_refund_id, notice.now)
                        .await?
                        .map(Change::Order);
            }
        }
        tx.commit().await?;
        let moved = matches!(changed, Some(Change::Order(_)));
        if let Some(c) = changed {
            self.changed(c);
        }
        Ok(NoticeOutcome::Applied { order_moved: moved })
    }

    /// Payment exceptions, newest first: of one merchant, or all (`None`, the platform).
    pub async fn payment_exceptions(
        &self,
        merchant_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<PaymentExceptionRow>> {
        let rows = sqlx::query(
            "SELECT * FROM payment_exceptions WHERE ($1 IS NULL OR merchant_id = $1) \
             ORDER BY created_at DESC, id LIMIT CAST($2 AS BIGINT)",
        )
        .bind(merchant_id)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter()
            .map(|r| Ok(PaymentExceptionRow::from_row(r)?))
            .collect()
    }

    /// Records a provider notification id; false when it was seen before (a replay).
    pub async fn record_notification(
        &self,
        id: &str,
        provider: &str,
        event_type: &str,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query("INSERT INTO payment_notifications (id, provider, event_type, received_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
            .bind(id)
            .bind(provider)
            .bind(event_type)
            .bind(now)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Stores a refund request before the provider hears of it, if the order's paid amount
    /// still covers it with what is refunded and in flight, and it has fewer than
    /// `max_refunds` refunds (checked and reserved atomically). The refund is `processing`;
    /// its amount is reserved, not refunded, until the provider says it succeeded.
    /// `Ok(None)`: it would exceed what was paid, or the count. A repeated idempotency key
    /// returns the first refund. The same key with another request (`request_hash`) is
    /// `KeyReused`.
    pub async fn reserve_refund(
        &self,
        r: &RefundRow,
        request_hash: Option<&str>,
        max_refunds: i64,
    ) -> Result<Option<RefundRow>> {
        if let Some(key) = &r.idempotency_key {
            let row =
                sqlx::query("SELECT * FROM refunds WHERE order_id = $1 AND idempotency_key = $2")
                    .bind(&r.order_id)
                    .bind(key)
                    .fetch_optional(&mut *self.read().await?)
                    .await?;
            if let Some(row) = row {
                // A refund stored before requests were hashed matches any.
                let stored: Option<String> = row.try_get("request_hash")?;
                if stored.is_some_and(|h| Some(h.as_str()) != request_hash) {
                    return Err(super::StoreError::KeyReused);
                }
                return Ok(Some(RefundRow::from_row(&row)?));
            }
        }
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        let order = sqlx::query(
            "UPDATE orders SET refund_reserved_fen = refund_reserved_fen + $2, updated_at = $3 \
             WHERE id = $1 AND status IN ('paid', 'refunded') AND refunded_fen + refund_reserved_fen + $2 <= paid_fen \
             AND (SELECT COUNT(*) FROM refunds WHERE order_id = $1) < $4 RETURNING *",
        )
        .bind(&r.order_id)
        .bind(r.amount_fen)
        .bind(r.created_at)
        .bind(max_refunds)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(order) = order else {
            return Ok(None);
        };
        sqlx::query(
            "INSERT INTO refunds (id, order_id, idempotency_key, amount_fen, reason, status, created_at, updated_at, request_hash) \
             VALUES ($1, $2, $3, $4, $5, 'processing', $6, $6, $7)",
        )
        .bind(&r.id)
        .bind(&r.order_id)
        .bind(r.idempotency_key.as_deref())
        .bind(r.amount_fen)
        .bind(&r.reason)
        .bind(r.created_at)
        .bind(request_hash)
        .execute(&mut *tx)
        .await
        .map_err(conflict_or)?;
        let order = order_row(&order)?;
        tx.commit().await?;
        self.changed(Change::Order(order));
        Ok(Some(RefundRow {
            status: "processing".into(),
            ..r.clone()
        }))
    }

    /// Records the provider's final word on a refund still `processing`: `succeeded` moves its
    /// amount from reserved to refunded (the order is `refunded` once all is); `failed` and
    /// `closed` release it. `Ok(None)` when the refund was already settled (a repeat).
    pub async fn settle_refund(
        &self,
        id: &str,
        status: &str,
        provider_refund_id: Option<&str>,
        now: i64,
    ) -> Result<Option<OrderRow>> {
        let mut w = self.write().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        let order = settle_refund_on(&mut tx, id, status, provider_refund_id, now).await?;
        tx.commit().await?;
        if let Some(o) = &order {
            self.changed(Change::Order(o.clone()));
        }
        Ok(order)
    }

    /// Notes the provider's id of a refund still `processing` (its answer said PROCESSING).
    pub async fn note_refund(&self, id: &str, provider_refund_id: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE refunds SET provider_refund_id = $2, updated_at = $3 WHERE id = $1 AND status = 'processing'")
            .bind(id)
            .bind(provider_refund_id)
            .bind(now)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    /// Lowers the total of an order still waiting for its payment, conditionally on the total
    /// read (a concurrent change or payment wins); answers the order as changed.
    pub async fn reduce_unpaid_order(
        &self,
        id: &str,
        from_total: i64,
        to_total: i64,
        priced: &str,
        now: i64,
    ) -> Result<Option<OrderRow>> {
        let row = sqlx::query(
            "UPDATE orders SET total_fen = $3, priced = $4, updated_at = $5 \
             WHERE id = $1 AND status = 'pending_payment' AND total_fen = $2 RETURNING *",
        )
        .bind(id)
        .bind(from_total)
        .bind(to_total)
        .bind(priced)
        .bind(now)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        match row {
            Some(r) => {
                let o = order_row(&r)?;
                self.changed(Change::Order(o.clone()));
                Ok(Some(o))
            }
            None => Ok(None),
        }
    }

    /// Records whose side an order's failed deduction was on.
    pub async fn set_deduction_failure(&self, id: &str, side: &str) -> Result<()> {
        sqlx::query("UPDATE orders SET deduction_failure = $2 WHERE id = $1")
            .bind(id)
            .bind(side)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    /// Marks a refund still in flight as just asked about.
    pub async fn touch_refund(&self, id: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE refunds SET updated_at = $2 WHERE id = $1 AND status = 'processing'")
            .bind(id)
            .bind(now)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    /// A refund by id.
    pub async fn refund(&self, id: &str) -> Result<Option<RefundRow>> {
        let row = sqlx::query("SELECT * FROM refunds WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.read().await?)
            .await?;
        row.map(|r| Ok(RefundRow::from_row(&r)?)).transpose()
    }

    /// Refunds still `processing` whose last change is older than `before` (Unix ms): the
    /// ones to ask the provider about again.
    pub async fn refunds_in_flight(&self, before: i64, limit: i64) -> Result<Vec<RefundRow>> {
        let rows = sqlx::query(
            "SELECT * FROM refunds WHERE status = 'processing' AND updated_at < $1 ORDER BY updated_at LIMIT CAST($2 AS BIGINT)",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(|r| Ok(RefundRow::from_row(r)?)).collect()
    }

    /// An order's refunds, oldest first.
    pub async fn refunds(&self, order_id: &str) -> Result<Vec<RefundRow>> {
        let rows = sqlx::query("SELECT * FROM refunds WHERE order_id = $1 ORDER BY created_at, id")
            .bind(order_id)
            .fetch_all(&mut *self.read().await?)
            .await?;
        rows.iter().map(|r| Ok(RefundRow::from_row(r)?)).collect()
    }

    /// Orders whose deduction failed and whose next collection attempt is due.
    pub async fn due_collections(&self, now: i64, limit: i64) -> Result<Vec<OrderRow>> {
        let rows = sqlx::query(
            "SELECT * FROM orders WHERE status = 'pending_payment' AND (next_collect_at IS NULL OR next_collect_at <= $1) ORDER BY created_at LIMIT CAST($2 AS BIGINT)",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(order_row).collect()
    }

    /// Schedules the next collection attempt.
    pub async fn schedule_collection(
        &self,
        order_id: &str,
        attempts: i64,
        next_at: i64,
    ) -> Result<()> {
        sqlx::query("UPDATE orders SET collect_attempts = $2, next_collect_at = $3 WHERE id = $1")
            .bind(order_id)
            .bind(attempts)
            .bind(next_at)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }

    /// A shopper's standing at a merchant, in one read: the blacklist entry's reason, if any,
    /// and the unpaid orders (how many, the oldest's creation time).
    pub async fn standing(
        &self,
        merchant_id: &str,
        user_id: &str,
    ) -> Result<(Option<String>, i64, Option<i64>)> {
        let row = sqlx::query(
            "SELECT (SELECT reason FROM blacklist WHERE merchant_id = $1 AND user_id = $2) AS reason, \
             COUNT(*) AS n, MIN(created_at) AS oldest FROM orders \
             WHERE merchant_id = $1 AND user_id = $2 AND status = 'pending_payment' \
             AND COALESCE(deduction_failure, 'shopper') = 'shopper'",
        )
        .bind(merchant_id)
        .bind(user_id)
        .fetch_one(&mut *self.read().await?)
        .await?;
        Ok((
            row.try_get("reason")?,
            row.try_get("n")?,
            row.try_get("oldest")?,
        ))
    }

    /// Takes a shopper with nothing left unpaid off the automatic blacklist (an operator's own
    /// entry stays), in one conditional write; true when an entry went.
    pub async fn release_paid_up(&self, merchant_id: &str, user_id: &str) -> Result<bool> {
        let r = sqlx::query(
            "DELETE FROM blacklist WHERE merchant_id = $1 AND user_id = $2 AND automatic = 1 \
             AND NOT EXISTS (SELECT 1 FROM orders WHERE merchant_id = $1 AND user_id = $2 \
             AND status = 'pending_payment' AND COALESCE(deduction_failure, 'shopper') = 'shopper')",
        )
        .bind(merchant_id)
        .bind(user_id)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Adds a shopper to a merchant's blacklist (no-op when already there).
    pub async fn blacklist_add(&self, b: &BlacklistRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO blacklist (merchant_id, user_id, reason, automatic, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&b.merchant_id)
        .bind(&b.user_id)
        .bind(&b.reason)
        .bind(i64::from(b.automatic))
        .bind(b.created_at)
        .bind(&b.created_by)
        .execute(&mut *self.write().await?)
        .await?;
        Ok(())
    }

    /// Removes a shopper; `only_automatic` keeps an operator's own entries.
    pub async fn blacklist_remove(
        &self,
        merchant_id: &str,
        user_id: &str,
        only_automatic: bool,
    ) -> Result<bool> {
        let sql = if only_automatic {
            "DELETE FROM blacklist WHERE merchant_id = $1 AND user_id = $2 AND automatic = 1"
        } else {
            "DELETE FROM blacklist WHERE merchant_id = $1 AND user_id = $2"
        };
        Ok(sqlx::query(sql)
            .bind(merchant_id)
            .bind(user_id)
            .execute(&mut *self.write().await?)
            .await?
            .rows_affected()
            == 1)
    }

    /// A merchant's blacklist (all merchants' for `None`).
    pub async fn blacklist(&self, merchant_id: Option<&str>) -> Result<Vec<BlacklistRow>> {
        let rows = match merchant_id {
            Some(m) => {
                sqlx::query(
                    "SELECT * FROM blacklist WHERE merchant_id = $1 ORDER BY created_at DESC",
                )
                .bind(m)
                .fetch_all(&mut *self.read().await?)
                .await?
            }
            None => {
                sqlx::query("SELECT * FROM blacklist ORDER BY created_at DESC")
                    .fetch_all(&mut *self.read().await?)
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(BlacklistRow {
                    merchant_id: r.try_get("merchant_id")?,
                    user_id: r.try_get("user_id")?,
                    reason: r.try_get("reason")?,
                    automatic: r.try_get::<i64, _>("automatic")? != 0,
                    created_at: r.try_get("created_at")?,
                    created_by: r.try_get("created_by")?,
                })
            })
            .collect()
    }

    /// Records who ended a session from outside and why; the feed hears of it as of any
    /// change to the session.
    pub async fn record_close(&self, id: &str, by: &str, note: &str) -> Result<()> {
        let r = sqlx::query(
            "UPDATE sessions SET closed_by = $2, close_note = $3 WHERE id = $1 RETURNING *",
        )
        .bind(id)
        .bind(by)
        .bind(note)
        .fetch_optional(&mut *self.write().await?)
        .await?;
        self.announce_session(r)?;
        Ok(())
    }

    /// Sessions still under way (confirming, unlocking or open) since before `before` (Unix
    /// ms: the unlock, or the creation when not unlocked), oldest first. Reads through the
    /// partial index of open sessions, which holds at most one row a cabinet.
    pub async fn sessions_under_way_since(
        &self,
        before: i64,
        limit: i64,
    ) -> Result<Vec<SessionRow>> {
        let rows = sqlx::query(
            "SELECT * FROM sessions WHERE state IN ('confirming', 'unlocking', 'open') \
             AND COALESCE(unlocked_at, created_at) < $1 ORDER BY created_at LIMIT CAST($2 AS BIGINT)",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(session_row).collect()
    }

    /// Sessions in a state (for recovery after a restart).
    /// Sessions still under way (confirming, unlocking, open), of one merchant or all, oldest
    /// first: at most one per cabinet (the partial unique index), so the list is bounded by
    /// the fleet.
    pub async fn sessions_under_way(
        &self,
        merchant_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SessionRow>> {
        let rows = sqlx::query(
            "SELECT * FROM sessions WHERE state IN ('confirming', 'unlocking', 'open') \
             AND ($1 IS NULL OR merchant_id = $1) ORDER BY created_at, id LIMIT CAST($2 AS BIGINT)",
        )
        .bind(merchant_id)
        .bind(limit)
        .fetch_all(&mut *self.read().await?)
        .await?;
        rows.iter().map(session_row).collect()
    }

    /// Sessions in `state`, oldest first.
    pub async fn sessions_in_state(&self, state: &str) -> Result<Vec<SessionRow>> {
        let rows = sqlx::query("SELECT * FROM sessions WHERE state = $1 ORDER BY created_at")
            .bind(state)
            .fetch_all(&mut *self.read().await?)
            .await?;
        rows.iter().map(session_row).collect()
    }

    /// Records the provider's own order id (Alipay's credit order id).
    pub async fn set_provider_order(&self, order_id: &str, provider_order_no: &str) -> Result<()> {
        sqlx::query("UPDATE orders SET provider_order_no = $2 WHERE id = $1")
            .bind(order_id)
            .bind(provider_order_no)
            .execute(&mut *self.write().await?)
            .await?;
        Ok(())
    }
}

/// A provider notice, by its id.
pub struct Notice<'a> {
    /// The provider's notice id.
    pub id: &'a str,
    /// `wechat` or `alipay`.
    pub provider: &'a str,
    /// Its event type.
    pub kind: &'a str,
    /// Unix ms.
    pub now: i64,
}

/// What a notice does, stored with it.
pub enum NoticeEffect<'a> {
    /// Nothing beyond being recorded (a confirmation, an event the hub does not act on, a
    /// payment for an order already settled).
    Record,
    /// The order is paid (if it is still completing or pending payment).
    Paid {
        /// The order.
        order_id: &'a str,
        /// As the provider reports it, matching the order.
        paid_fen: i64,
        /// The provider's trade number.
        transaction_id: Option<&'a str>,
    },
    /// It did not match its order: kept for an operator.
    Exception(PaymentExceptionRow),
    /// A refund's final word (`succeeded`, `failed`, `closed`).
    Refund {
        /// Our refund id (the provider's `out_refund_no`).
        refund_id: &'a str,
        /// The settled status.
        status: &'a str,
        /// The provider's refund id.
        provider_refund_id: Option<&'a str>,
    },
}

/// What storing a notice came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeOutcome {
    /// Seen before: nothing changed.
    Replay,
    /// Stored with its effect; whether an order moved.
    Applied {
        /// The order moved to paid.
        order_moved: bool,
    },
}

/// A provider notice that did not match the order it names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PaymentExceptionRow {
    /// Id.
    pub id: String,
    /// The order's merchant (none when the notice names no order of ours).
    pub merchant_id: Option<String>,
    /// The order the notice names, when it exists.
    pub order_id: Option<String>,
    /// `wechat` or `alipay`.
    pub provider: String,
    /// The notice's id.
    pub notification_id: String,
    /// `amount_mismatch`, `app_mismatch`, `merchant_mismatch`, `unknown_order`; from
    /// settlement: `settlement_failed`, `settlement_return_failed`.
    pub reason: String,
    /// What the notice said against what the order says.
    pub detail: String,
    /// Unix ms.
    pub created_at: i64,
}

/// Keeps a payment exception, on the caller's connection (a notice's transaction, or its own).
pub(super) async fn insert_payment_exception(
    conn: &mut sqlx::AnyConnection,
    e: &PaymentExceptionRow,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO payment_exceptions (id, merchant_id, order_id, provider, notification_id, reason, detail, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&e.id)
    .bind(e.merchant_id.as_deref())
    .bind(e.order_id.as_deref())
    .bind(&e.provider)
    .bind(&e.notification_id)
    .bind(&e.reason)
    .bind(&e.detail)
    .bind(e.created_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// [`Store::settle_refund`] on a transaction (a refund notice settles its refund in the
/// notice's own transaction).
async fn settle_refund_on(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    status: &str,
    provider_refund_id: Option<&str>,
    now: i64,
) -> Result<Option<OrderRow>> {
    let refund = sqlx::query(
        "UPDATE refunds SET status = $2, provider_refund_id = COALESCE($3, provider_refund_id), updated_at = $4 \
         WHERE id = $1 AND status = 'processing' RETURNING order_id, amount_fen",
    )
    .bind(id)
    .bind(status)
    .bind(provider_refund_id)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(refund) = refund else {
        return Ok(None);
    };
    let (order_id, amount): (String, i64) =
        (refund.try_get("order_id")?, refund.try_get("amount_fen")?);
    let sql = if status == "succeeded" {
        "UPDATE orders SET refund_reserved_fen = refund_reserved_fen - $2, refunded_fen = refunded_fen + $2, \
         status = CASE WHEN refunded_fen + $2 >= paid_fen THEN 'refunded' ELSE status END, updated_at = $3 \
         WHERE id = $1 RETURNING *"
    } else {
        "UPDATE orders SET refund_reserved_fen = refund_reserved_fen - $2, updated_at = $3 WHERE id = $1 RETURNING *"
    };
    let order = sqlx::query(sql)
        .bind(&order_id)
        .bind(amount)
        .bind(now)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Some(order_row(&order)?))
}
