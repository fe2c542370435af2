//! Settlement (分账) of paid orders: the platform's commission (`commission_bps` of the
//! merchant) split to the platform, then the rest released to the merchant, whose money stays
//! frozen until then — WeChat through 平台收付通 profit sharing (split, query, finish, returns),
//! Alipay for sub-merchants (直付通) through `alipay.trade.order.settle`, its query and
//! `alipay.trade.settle.confirm` (a refund returns the split in the refund itself).
//!
//! A settlement is opened (one row, `pending`) when the order is completed with
//! `profit_sharing` on; that flag is set only when the row could be written, so no order is
//! frozen without a settlement to follow it. The supervisor then takes each paid order's
//! settlement a step at a time: ask for the split (`splitting`), ask how it went (`split`),
//! release the rest (`finished`). Every step is idempotent at the provider (the split's and
//! the finish's out_order_no), stored as a conditional move from the state it was read in,
//! retried with a doubling wait, and surfaced to operators (`failed`, a payment exception)
//! after `settlement.surface_after` failures in a row, or at once when the provider refuses on
//! the merits (a receiver not bound). A refund of a split order first returns the platform's
//! part of it (回退), then refunds.
//!
//! `settle_due` is one pass over what is due: it holds no state between passes, so it can run
//! under a leader lease on exactly one node (issue 21).

use cabinet_actors::session::Channel;

use super::Sessions;
use crate::payments::alipay::{AlipayClient, AlipayError, AlipayMerchant};
use crate::payments::wechat::{SplitReceiver, WechatClient, WechatError};
use crate::secrets::token;
use crate::store::{
    OrderRow, PaymentExceptionRow, RefundRow, SettlementMove, SettlementReturnRow, SettlementRow,
};

/// How many steps of one pass are carried out at once: each is a provider round trip, and one
/// at a time a pass managed ~100 steps a second.
const SETTLE_CONCURRENCY: usize = 16;

/// What one pass over a settlement found out.
enum Outcome {
    /// Move on to this state and step, due after this many ms.
    Next {
        state: &'static str,
        step: &'static str,
        after_ms: u64,
        shares: Option<(i64, i64)>,
        provider_order_id: Option<String>,
    },
    /// The step failed; `merits`: the provider refused it as asked (retrying alone will not
    /// help), `new_split`: the split closed and the next one needs a new number.
    Failed {
        step: &'static str,
        error: String,
        merits: bool,
        new_split: bool,
    },
}

/// A refund's wait for the platform's part of a split to come back first.
pub(super) enum ReturnFirst {
    /// Nothing to return (no split, or already returned): refund now.
    Clear,
    /// The return (or the split it returns from) is still in flight: asked again later.
    Wait,
    /// The return was refused: the refund cannot be paid from the merchant's account.
    Refused(String),
}

impl Sessions {
    /// Opens the settlement of an order about to be completed, when one will follow it
    /// (settlement on, a WeChat order, an amount to split): answers whether the completion
    /// asks for profit sharing.
    pub(super) async fn open_settlement(&self, o: &OrderRow, total_fen: i64) -> bool {
        let cfg = &self.settings.settlement;
        if !cfg.enabled || total_fen <= 0 {
            return false;
        }
        let follows = if o.channel == Channel::Wechat.as_str() {
            true
        } else if o.channel == Channel::Alipay.as_str() {
            // Only a sub-merchant's trade (直付通) is held for settlement, and only a platform
            // with its Alipay user id can take a commission.
            self.providers.alipay.as_ref().is_some_and(|a| a.splits())
                && self.order_terms(&o.merchant_id).await.alipay.is_some()
        } else {
            false
        };
        if !follows {
            return false;
        }
        let now = self.now();
        let due = now + cfg.first_after_ms as i64;
        match self
            .store
            .open_settlement(&o.id, &o.merchant_id, &o.channel, due, now)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                // Completed without profit sharing: the merchant gets all of it, unfrozen,
                // rather than a frozen payment no settlement follows.
                tracing::error!(order_id = %o.id, error = %e, "settlement not opened; completing without profit sharing");
                false
            }
        }
    }

    /// One pass of the settlement supervisor: the settlements due, at most `limit`, are taken
    /// one step on, [`SETTLE_CONCURRENCY`] at a time. Answers how many it took.
    pub async fn settle_due(&self, limit: usize) -> usize {
        use futures_util::StreamExt;
        let due = match self
            .store
            .due_settlements(self.now(), limit.max(1) as i64)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "due settlements not read");
                return 0;
            }
        };
        let n = due.len();
        futures_util::stream::iter(due)
            .for_each_concurrent(SETTLE_CONCURRENCY, |st| self.settle_one(st))
            .await;
        n
    }

    async fn settle_one(&self, st: SettlementRow) {
        let o = match self.store.order(&st.order_id).await {
            Ok(Some(o)) => o,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(order_id = %st.order_id, error = %e, "settlement's order not read");
                return;
            }
        };
        let outcome = match (o.transaction_id.as_deref(), st.channel.as_str()) {
            (None, _) => Outcome::Failed {
                step: "split",
                error: "the payment has no transaction id to split".into(),
                merits: true,
                new_split: false,
            },
            (Some(trade_no), "alipay") => self.alipay_step(&st, &o, trade_no).await,
            (Some(txn), _) => {
                let Some(w) = self.providers.wechat.clone() else {
                    return;
                };
                let sub = self.sub_mchid(&o.merchant_id).await;
                match st.step.as_str() {
                    "follow" => self.follow_split(&w, &st, &sub, txn).await,
                    "finish" => self.finish_split(&w, &st, &o, &sub, txn).await,
                    _ => self.ask_split(&w, &st, &o, &sub, txn).await,
                }
            }
        };
        self.record_outcome(&st, &o, outcome).await;
    }

    /// Asks for the split of the platform's commission on what is left of the payment (refunds
    /// already taken or in flight do not count).
    async fn ask_split(
        &self,
        w: &WechatClient,
        st: &SettlementRow,
        o: &OrderRow,
        sub: &str,
        txn: &str,
    ) -> Outcome {
        let (platform, shares) = match shares(st, o) {
            Ok(s) => s,
            Err(release) => return release,
        };
        let receivers = [SplitReceiver {
            kind: "MERCHANT_ID".into(),
            receiver_account: w.config().mchid.clone(),
            amount: platform,
            description: "平台佣金".into(),
        }];
        let r = w.split(sub, txn, &st.split_no(), &receivers, false).await;
        match self.counted("wechat", "split", r) {
            Ok(answer) => {
                let done = split_outcome(&answer.receivers);
                match done {
                    Some(Err(reason)) => Outcome::Failed {
                        step: "split",
                        error: reason,
                        merits: true,
                        new_split: true,
                    },
                    Some(Ok(())) => Outcome::Next {
                        state: "split",
                        step: "finish",
                        after_ms: 0,
                        shares,
                        provider_order_id: answer.order_id,
                    },
                    None => Outcome::Next {
                        state: "splitting",
                        step: "follow",
                        after_ms: self.settings.settlement.follow_ms,
                        shares,
                        provider_order_id: answer.order_id,
                    },
                }
            }
            Err(e) => failed("split", &e),
        }
    }

    /// Asks how a split went.
    async fn follow_split(
        &self,
        w: &WechatClient,
        st: &SettlementRow,
        sub: &str,
        txn: &str,
    ) -> Outcome {
        let r = w.query_split(sub, txn, &st.split_no()).await;
        match self.counted("wechat", "split_query", r) {
            Ok(answer) => match split_outcome(&answer.receivers) {
                Some(Ok(())) => Outcome::Next {
                    state: "split",
                    step: "finish",
                    after_ms: 0,
                    shares: None,
                    provider_order_id: answer.order_id,
                },
                Some(Err(reason)) => Outcome::Failed {
                    step: "split",
                    error: reason,
                    merits: true,
                    new_split: true,
                },
                None => Outcome::Next {
                    state: "splitting",
                    step: "follow",
                    after_ms: self.settings.settlement.follow_ms,
                    shares: None,
                    provider_order_id: None,
                },
            },
            // The request never reached WeChat: ask again under the same number.
            Err(WechatError::Api { status: 404, .. }) => Outcome::Next {
                state: "pending",
                step: "split",
                after_ms: 0,
                shares: None,
                provider_order_id: None,
            },
            Err(e) => failed("follow", &e),
        }
    }

    /// Releases the rest to the merchant.
    async fn finish_split(
        &self,
        w: &WechatClient,
        st: &SettlementRow,
        o: &OrderRow,
        sub: &str,
        txn: &str,
    ) -> Outcome {
        let r = w
            .finish_split(sub, txn, &st.finish_no(), "分账完成，解冻剩余资金")
            .await;
        match self.counted("wechat", "split_finish", r) {
            Ok(()) => {
                tracing::info!(order_id = %o.id, platform_fen = st.platform_fen, merchant_fen = st.merchant_fen, "order settled");
                Outcome::Next {
                    state: "finished",
                    step: "finish",
                    after_ms: 0,
                    shares: None,
                    provider_order_id: None,
                }
            }
            Err(e) => failed("finish", &e),
        }
    }

    /// Stores what a step found out; a failure waits `retry_ms` doubled per failure in a row,
    /// and is surfaced once (`failed`, a payment exception) when it is on the merits or has
    /// repeated `surface_after` times.
    async fn record_outcome(&self, st: &SettlementRow, o: &OrderRow, outcome: Outcome) {
        let cfg = &self.settings.settlement;
        let now = self.now();
        let m = match outcome {
            Outcome::Next {
                state,
                step,
                after_ms,
                shares,
                provider_order_id,
            } => {
                // Under way (asked, not answered) is not success: a failed settlement stays
                // `failed`, with its count and words, until its split or finish succeeds, so
                // a retry that fails again is not surfaced twice.
                let under_way = matches!(state, "pending" | "splitting");
                let (state, failures, last_error) = match (under_way, st.state.as_str()) {
                    (true, "failed") => ("failed", st.failures, st.last_error.clone()),
                    (true, _) => (state, st.failures, st.last_error.clone()),
                    (false, _) => (state, 0, None),
                };
                SettlementMove {
                    state: state.into(),
                    step: step.into(),
                    shares,
                    attempt: None,
                    provider_order_id,
                    failures,
                    last_error,
                    due_at: now + after_ms as i64,
                }
            }
            Outcome::Failed {
                step,
                error,
                merits,
                new_split,
            } => {
                let failures = st.failures + 1;
                let surfaced = merits || failures >= i64::from(cfg.surface_after);
                let wait = cfg
                    .retry_ms
                    .saturating_mul(1u64 << (failures - 1).clamp(0, 30))
                    .min(cfg.retry_max_ms);
                tracing::warn!(order_id = %o.id, step, error, failures, "settlement step failed");
                self.metrics
                    .settlement_failures
                    .with_label_values(&[step])
                    .inc();
                if surfaced && st.state != "failed" {
                    self.surface(o, &st.split_no(), "settlement_failed", &error)
                        .await;
                }
                SettlementMove {
                    state: if surfaced {
                        "failed".into()
                    } else {
                        retry_state(step).into()
                    },
                    step: step.into(),
                    shares: None,
                    attempt: new_split.then_some(st.attempt + 1),
                    provider_order_id: None,
                    failures,
                    last_error: Some(error),
                    due_at: now + wait as i64,
                }
            }
        };
        match self
            .store
            .move_settlement(&st.order_id, &st.state, &m, now)
            .await
        {
            Ok(Some(moved)) if moved.state != st.state => {
                self.metrics
                    .settlements
                    .with_label_values(&[moved.state.as_str()])
                    .inc();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(order_id = %st.order_id, error = %e, "settlement move not stored; taken again when due")
            }
        }
    }

    /// Tells operators: a payment exception on the order, on the feed and in the API.
    async fn surface(&self, o: &OrderRow, reference: &str, reason: &str, detail: &str) {
        let id = match token(20) {
            Ok(t) => format!("pe{t}"),
            Err(e) => {
                tracing::error!(order_id = %o.id, error = %e, "payment exception not recorded");
                return;
            }
        };
        let e = PaymentExceptionRow {
            id,
            merchant_id: Some(o.merchant_id.clone()),
            order_id: Some(o.id.clone()),
            provider: o.channel.clone(),
            notification_id: reference.to_owned(),
            reason: reason.to_owned(),
            detail: detail.to_owned(),
            created_at: self.now(),
        };
        if let Err(err) = self.store.record_payment_exception(&e).await {
            tracing::error!(order_id = %o.id, reason, error = %err, "payment exception not recorded");
        }
    }

    /// The platform's part of a refund of a split order, to return first: its share in
    /// proportion to the refund, and all of what is left of it once the order is refunded in
    /// full. One return per refund, numbered after it (`RT{refund}`), stored `processing`
    /// before the provider hears of it, so asking again is the same return. `Ok(None)`: nothing
    /// to return (no split, nothing of it left).
    async fn return_due(
        &self,
        o: &OrderRow,
        r: &RefundRow,
    ) -> Result<Option<(SettlementRow, SettlementReturnRow)>, ReturnFirst> {
        let st = match self.store.settlement(&o.id).await {
            Ok(Some(st)) => st,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::error!(order_id = %o.id, error = %e, "settlement not read before a refund");
                return Err(ReturnFirst::Wait);
            }
        };
        let split_done = match (st.state.as_str(), st.step.as_str()) {
            ("split" | "finished" | "returned", _) | ("failed", "finish") => true,
            // Asked for, outcome unknown: the refund waits for it.
            ("splitting", _) | ("failed", "follow") => return Err(ReturnFirst::Wait),
            // Not split (yet): the split, when it comes, leaves refunds out.
            _ => false,
        };
        if !split_done || st.platform_fen == 0 {
            return Ok(None);
        }
        // The order as it is now, this refund's reservation included: whether the order is
        // being refunded in full decides whether the platform returns all of what is left.
        let o = match self.store.order(&o.id).await {
            Ok(Some(now)) => now,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::error!(order_id = %o.id, error = %e, "order not read before a refund");
                return Err(ReturnFirst::Wait);
            }
        };
        let returns = match self.store.settlement_returns(&o.id).await {
            Ok(rs) => rs,
            Err(e) => {
                tracing::error!(order_id = %o.id, error = %e, "returns not read before a refund");
                return Err(ReturnFirst::Wait);
            }
        };
        let id = format!("RT{}", r.id);
        let amount = match returns.iter().find(|x| x.id == id) {
            Some(x) => x.amount_fen,
            None => {
                let others: i64 = returns
                    .iter()
                    .filter(|x| x.state != "failed")
                    .map(|x| x.amount_fen)
                    .sum();
                let left = st.platform_fen - others;
                let base = st.platform_fen + st.merchant_fen;
                if o.refunded_fen + o.refund_reserved_fen >= o.paid_fen {
                    left
                } else {
                    (r.amount_fen * st.platform_fen / base.max(1)).min(left)
                }
            }
        };
        if amount <= 0 {
            return Ok(None);
        }
        let now = self.now();
        match self
            .store
            .open_return(&SettlementReturnRow {
                id,
                order_id: o.id.clone(),
                refund_id: r.id.clone(),
                amount_fen: amount,
                state: "processing".into(),
                fail_reason: None,
                created_at: now,
                updated_at: now,
            })
            .await
        {
            Ok(row) => Ok(Some((st, row))),
            Err(e) => {
                tracing::error!(order_id = %o.id, error = %e, "return not stored before a refund");
                Err(ReturnFirst::Wait)
            }
        }
    }

    /// Records a return's outcome; a refused one is surfaced to operators.
    async fn returned(
        &self,
        o: &OrderRow,
        r: &RefundRow,
        ret: &SettlementReturnRow,
        refused: Option<String>,
    ) -> ReturnFirst {
        let state = if refused.is_some() {
            "failed"
        } else {
            "succeeded"
        };
        if let Err(e) = self
            .store
            .settle_return(&ret.id, state, refused.as_deref(), self.now())
            .await
        {
            tracing::error!(order_id = %o.id, return_id = %ret.id, error = %e, "return outcome not stored");
            return ReturnFirst::Wait;
        }
        match refused {
            None => ReturnFirst::Clear,
            Some(reason) => {
                let detail = format!(
                    "the platform could not return {} fen of its commission ahead of refund {}: {reason}",
                    ret.amount_fen, r.id
                );
                self.surface(o, &ret.id, "settlement_return_failed", &detail)
                    .await;
                ReturnFirst::Refused(reason)
            }
        }
    }

    /// Before a WeChat refund of a split order: the platform returns its part of the refund
    /// (回退, `returnorders`), so that the merchant's account can pay it.
    pub(super) async fn return_split_first(
        &self,
        w: &WechatClient,
        o: &OrderRow,
        r: &RefundRow,
        sub: &str,
    ) -> ReturnFirst {
        let (st, ret) = match self.return_due(o, r).await {
            Ok(Some(due)) => due,
            Ok(None) => return ReturnFirst::Clear,
            Err(wait) => return wait,
        };
        match ret.state.as_str() {
            "succeeded" => return ReturnFirst::Clear,
            "failed" => {
                return ReturnFirst::Refused(ret.fail_reason.unwrap_or_else(|| "FAILED".into()))
            }
            _ => {}
        }
        let answer = w
            .return_split(
                sub,
                &st.split_no(),
                &ret.id,
                ret.amount_fen,
                "退款前回退平台佣金",
            )
            .await;
        let refused = match self.counted("wechat", "split_return", answer) {
            Ok(a) if a.result == "SUCCESS" => None,
            Ok(a) if a.result == "FAILED" => Some(a.fail_reason.unwrap_or_else(|| "FAILED".into())),
            Ok(_) => return ReturnFirst::Wait,
            Err(e) if !e.retryable() && matches!(e, WechatError::Api { .. }) => Some(e.to_string()),
            Err(e) => {
                tracing::warn!(order_id = %o.id, return_id = %ret.id, error = %e, "return not answered; asked again with the refund");
                return ReturnFirst::Wait;
            }
        };
        self.returned(o, r, &ret, refused).await
    }

    /// An Alipay refund of a split order: the platform's part comes back in the refund itself
    /// (`refund_royalty_parameters`). Answers the refund's result; the return is recorded with
    /// it (both happen or neither).
    pub(super) async fn alipay_refund_returning(
        &self,
        a: &AlipayClient,
        o: &OrderRow,
        r: &RefundRow,
        m: Option<&AlipayMerchant>,
    ) -> Result<Result<serde_json::Value, AlipayError>, ReturnFirst> {
        let due = self.return_due(o, r).await?;
        let back = due
            .as_ref()
            .filter(|(_, ret)| ret.state == "processing")
            .map_or(0, |(_, ret)| ret.amount_fen);
        let result = a
            .refund_returning(&o.session_id, r.amount_fen, &r.id, &r.reason, back, m)
            .await;
        if let Some((_, ret)) = due.as_ref().filter(|(_, ret)| ret.state == "processing") {
            match &result {
                Ok(_) => {
                    self.returned(o, r, ret, None).await;
                }
                Err(AlipayError::Api {
                    sub_code, sub_msg, ..
                }) if alipay_refusal(sub_code) => {
                    self.returned(o, r, ret, Some(format!("{sub_code}: {sub_msg}")))
                        .await;
                }
                Err(_) => {}
            }
        }
        Ok(result)
    }

    /// Alipay: the split (分账 to the platform), its query, and the settlement of the rest to
    /// the sub-merchant (确认结算).
    async fn alipay_step(&self, st: &SettlementRow, o: &OrderRow, trade_no: &str) -> Outcome {
        let Some(a) = self.providers.alipay.clone() else {
            return Outcome::Failed {
                step: "split",
                error: "Alipay is not configured".into(),
                merits: true,
                new_split: false,
            };
        };
        let m = self.order_terms(&o.merchant_id).await.alipay;
        let m = m.as_ref();
        match st.step.as_str() {
            "follow" => {
                let r = a.order_settle_query(trade_no, &st.split_no(), m).await;
                match self.counted("alipay", "split_query", r) {
                    Ok(v) => {
                        let details = v["royalty_detail_list"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default();
                        if let Some(f) = details.iter().find(|d| d["state"] == "FAIL") {
                            return Outcome::Failed {
                                step: "split",
                                error: format!(
                                    "the split failed: {} {}",
                                    f["error_code"].as_str().unwrap_or("?"),
                                    f["error_desc"].as_str().unwrap_or("")
                                ),
                                merits: true,
                                new_split: true,
                            };
                        }
                        if !details.is_empty() && details.iter().all(|d| d["state"] == "SUCCESS") {
                            return next("split", "finish", 0);
                        }
                        Outcome::Next {
                            state: "splitting",
                            step: "follow",
                            after_ms: self.settings.settlement.follow_ms,
                            shares: None,
                            provider_order_id: None,
                        }
                    }
                    Err(AlipayError::Api { sub_code, .. })
                        if sub_code == "ACQ.TRADE_SETTLE_NOT_EXIST" =>
                    {
                        next("pending", "split", 0)
                    }
                    Err(e) => alipay_failed("follow", &e),
                }
            }
            "finish" => {
                let rest = o.paid_fen
                    - o.refunded_fen
                    - o.refund_reserved_fen
                    - (st.platform_fen - st.returned_fen);
                if rest > 0 {
                    let r = a.settle_confirm(trade_no, &st.finish_no(), rest, m).await;
                    if let Err(e) = self.counted("alipay", "settle_confirm", r) {
                        return alipay_failed("finish", &e);
                    }
                }
                tracing::info!(order_id = %o.id, platform_fen = st.platform_fen, merchant_fen = rest, "order settled");
                next("finished", "finish", 0)
            }
            _ => {
                let (platform, shares) = match shares(st, o) {
                    Ok(s) => s,
                    Err(release) => return release,
                };
                let r = a.order_settle(trade_no, &st.split_no(), platform, m).await;
                match self.counted("alipay", "split", r) {
                    Ok(v) => Outcome::Next {
                        state: "splitting",
                        step: "follow",
                        after_ms: 0,
                        shares,
                        provider_order_id: v["settle_no"].as_str().map(str::to_owned),
                    },
                    Err(e) => alipay_failed("split", &e),
                }
            }
        }
    }
}

/// The platform's share of what is left of the payment (refunds taken or in flight do not
/// count), rounded down, and both shares; `Err` with the move on when the platform gets nothing
/// (release the rest, or, refunded in full, nothing).
fn shares(st: &SettlementRow, o: &OrderRow) -> Result<(i64, Option<(i64, i64)>), Outcome> {
    let net = (o.paid_fen - o.refunded_fen - o.refund_reserved_fen).max(0);
    let platform = net * st.commission_bps / 10_000;
    let shares = Some((platform, net - platform));
    if platform == 0 {
        return Err(Outcome::Next {
            state: if net == 0 { "finished" } else { "split" },
            step: "finish",
            after_ms: 0,
            shares,
            provider_order_id: None,
        });
    }
    Ok((platform, shares))
}

/// A move on, with no amounts and no provider id.
fn next(state: &'static str, step: &'static str, after_ms: u64) -> Outcome {
    Outcome::Next {
        state,
        step,
        after_ms,
        shares: None,
        provider_order_id: None,
    }
}

/// Alipay's answers that are refusals on the merits (the request will not succeed as asked);
/// its system errors are not.
fn alipay_refusal(sub_code: &str) -> bool {
    !sub_code.is_empty() && sub_code != "ACQ.SYSTEM_ERROR" && !sub_code.starts_with("aop.")
}

fn alipay_failed(step: &'static str, e: &AlipayError) -> Outcome {
    Outcome::Failed {
        step,
        error: e.to_string(),
        merits: matches!(e, AlipayError::Api { sub_code, .. } if alipay_refusal(sub_code)),
        new_split: false,
    }
}

/// What a failed step becomes when it is not (yet) surfaced: the state it is retried from.
fn retry_state(step: &str) -> &'static str {
    match step {
        "follow" => "splitting",
        "finish" => "split",
        _ => "pending",
    }
}

/// A provider error as a failed step: on the merits when WeChat refused the request as asked.
fn failed(step: &'static str, e: &WechatError) -> Outcome {
    Outcome::Failed {
        step,
        error: e.to_string(),
        merits: matches!(e, WechatError::Api { status, .. } if (400..500).contains(status))
            && !e.retryable(),
        new_split: false,
    }
}

/// Whether a split's receivers are done: all SUCCESS, or one CLOSED (with why), or not yet.
fn split_outcome(
    receivers: &[crate::payments::wechat::SplitReceiverResult],
) -> Option<Result<(), String>> {
    if let Some(closed) = receivers
        .iter()
        .find(|r| r.result.as_deref() == Some("CLOSED"))
    {
        return Some(Err(format!(
            "the split's receiver {} was closed: {}",
            closed.receiver_account.as_deref().unwrap_or("?"),
            closed.fail_reason.as_deref().unwrap_or("no reason given")
        )));
    }
    (!receivers.is_empty()
        && receivers
            .iter()
            .all(|r| r.result.as_deref() == Some("SUCCESS")))
    .then_some(Ok(()))
}
