//! Stock follows the sessions: a restock's count replaces it (differences from what was
//! expected are kept for a person), a purchase's recognised or resolved basket takes from it,
//! and a product that falls to its low mark in a cabinet is told once.

use std::collections::BTreeMap;

use super::Sessions;
use crate::store::{Change, Recount, SessionRow, StockRow};

impl Sessions {
    /// A restock session's count: the cabinet's stock now. Against the stock before plus the
    /// session's plan, each difference is an open discrepancy.
    pub(super) async fn restocked(&self, s: &SessionRow, counted: &[(String, i64)]) {
        let planned: BTreeMap<String, i64> = match self.store.session_plan(&s.id).await {
            Ok(p) => p
                .and_then(|p| serde_json::from_str::<Vec<super::start::PlannedItem>>(&p).ok())
                .unwrap_or_default()
                .into_iter()
                .map(|i| (i.sku, i.qty))
                .collect(),
            Err(e) => {
                tracing::error!(session_id = %s.id, error = %e, "restock plan not read; the count is checked as a stock-taking");
                BTreeMap::new()
            }
        };
        let mut by_sku = BTreeMap::new();
        for (sku, qty) in counted {
            *by_sku.entry(sku.clone()).or_insert(0) += qty.max(&0);
        }
        let recount = Recount {
            cabinet_id: &s.cabinet_id,
            merchant_id: &s.merchant_id,
            session_id: &s.id,
            counted: &by_sku,
            planned: &planned,
            low_at: self.settings.stock.low_at,
            now: self.now(),
        };
        match self.store.recount_stock(&recount).await {
            Ok(found) => {
                for (s_row, low) in found.low_changes {
                    tracing::info!(cabinet_id = %s_row.cabinet_id, sku = %s_row.sku, qty = s_row.qty, low, "stock low state changed by a count");
                    if low {
                        self.metrics.stock_low.inc();
                    }
                    self.store
                        .changed(Change::StockLow(s.merchant_id.clone(), s_row, low));
                }
                for d in found.discrepancies {
                    tracing::warn!(cabinet_id = %d.cabinet_id, sku = %d.sku, expected = d.expected,
                        counted = d.counted, "stock discrepancy");
                    self.metrics.stock_discrepancies.inc();
                    self.store.changed(Change::StockDiscrepancy(d));
                }
            }
            Err(e) => {
                tracing::error!(session_id = %s.id, error = %e, "restock count not stored; the next count replaces the stock");
            }
        }
    }

    /// A purchase's basket (`items`: `[{"sku", "qty"}]`) left the cabinet: taken off its stock
    /// once per order (a basket settled again by a person is not taken twice). A restock's
    /// items are its count, never a purchase.
    pub(super) async fn took(&self, s: &SessionRow, order_id: &str, items: &str) {
        if s.mode != "purchase" {
            return;
        }
        let mut taken = BTreeMap::new();
        for it in serde_json::from_str::<Vec<serde_json::Value>>(items).unwrap_or_default() {
            if let (Some(sku), Some(q)) = (it["sku"].as_str(), it["qty"].as_i64()) {
                *taken.entry(sku.to_owned()).or_insert(0) += q.max(0);
            }
        }
        taken.retain(|_, q| *q > 0);
        // A cabinet never counted in has nothing to take from: no statement (read from the
        // cached cabinet row).
        if let Ok(Some(c)) = self.store.cabinet(&s.cabinet_id).await {
            if !c.keeps_stock {
                return;
            }
        }
        let now = self.now();
        match self
            .store
            .take_stock(&s.cabinet_id, order_id, &taken, now)
            .await
        {
            Ok(after) => {
                for t in after {
                    if t.after <= t.low_at && t.before > t.low_at {
                        tracing::info!(cabinet_id = %s.cabinet_id, sku = %t.sku, qty = t.after, "stock low");
                        self.metrics.stock_low.inc();
                        self.store.changed(Change::StockLow(
                            s.merchant_id.clone(),
                            StockRow {
                                cabinet_id: s.cabinet_id.clone(),
                                sku: t.sku,
                                qty: t.after,
                                low_at: t.low_at,
                                updated_at: now,
                            },
                            true,
                        ));
                    }
                }
            }
            Err(e) => {
                tracing::error!(session_id = %s.id, error = %e, "stock not taken; the next count corrects it");
            }
        }
    }
}
