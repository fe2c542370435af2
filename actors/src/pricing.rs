//! Pricing a recognised basket: list prices, then promotions (营销活动). A pure function of the
//! basket, the cabinet's sellable list, the promotions in force and the time.
//!
//! Precedence and stacking (also in the README):
//! 1. Each line starts at the cabinet's list price (fen) × quantity. A product not on the
//!    sellable list cannot be priced: the order goes to a person (`UnknownSku`).
//! 2. Per-product promotions — time-limited discounts (限时折扣) and time-slot discounts
//!    (分时段折扣) — do **not** stack with each other: for each product the one giving the lowest
//!    unit price applies; on a tie the earlier-created promotion (lower id) wins. A fixed price
//!    above the list price, or a percentage of 0, never raises a price.
//! 3. Spend-X-save-Y (满减) applies once per order, after step 2, on the discounted subtotal:
//!    of all such promotions in force, the single tier giving the largest saving applies.
//! 4. Every applied promotion becomes one discount line (amount in fen, summed over the products
//!    it touched); discounts never take the total below zero.
//!
//! Bounds ([`Limits`], the hub's `[limits]` section): at most `max_basket_lines` lines, each
//! of at most `max_line_qty`, at most `max_basket_qty` items in all, and list prices of at most
//! `max_price_fen`; a basket or price outside them is an error, never a wrapped or saturated
//! amount. Every amount is computed with checked arithmetic besides.
//!
//! Windows are half-open: a time-limited window `[starts_at, ends_at)` in Unix ms; a daily slot
//! `[from, to)` in minutes after local midnight (the merchant's UTC offset), and a slot whose `to`
//! is not after `from` runs over midnight (22:00–02:00).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a per-product promotion changes the unit price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum PriceRule {
    /// Pay this many basis points of the list price (8000 = 80% = 八折); rounded half up to
    /// the fen.
    PercentBps(u32),
    /// Pay this unit price (fen).
    FixedFen(i64),
}

impl PriceRule {
    /// The discounted unit price: never negative, never above `list` (itself not negative).
    fn unit_price(self, list: i64) -> i64 {
        let p = match self {
            // In i128, which cannot overflow for any i64 × 10_000; the result is at most `list`.
            PriceRule::PercentBps(bps) => {
                let p = (i128::from(list) * i128::from(bps.min(10_000)) + 5_000) / 10_000;
                i64::try_from(p).unwrap_or(list)
            }
            PriceRule::FixedFen(f) => f,
        };
        p.clamp(0, list.max(0))
    }
}

/// When a promotion is in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Window {
    /// 限时折扣: `[starts_at, ends_at)`, Unix ms.
    Between {
        /// Unix ms, inclusive.
        starts_at: i64,
        /// Unix ms, exclusive.
        ends_at: i64,
    },
    /// 分时段折扣: every day `[from_min, to_min)` local time, minutes after midnight, within an
    /// optional overall period.
    Daily {
        /// Minutes after local midnight, inclusive.
        from_min: u32,
        /// Minutes after local midnight, exclusive; ≤ `from_min` runs over midnight.
        to_min: u32,
        /// Unix ms, inclusive.
        #[serde(default)]
        starts_at: Option<i64>,
        /// Unix ms, exclusive.
        #[serde(default)]
        ends_at: Option<i64>,
    },
    /// Always (满减 campaigns without an end).
    Always,
}

impl Window {
    /// Whether `now_ms` falls in the window, with local time at `utc_offset_min`.
    pub fn contains(&self, now_ms: i64, utc_offset_min: i32) -> bool {
        match *self {
            Window::Between { starts_at, ends_at } => starts_at <= now_ms && now_ms < ends_at,
            Window::Daily {
                from_min,
                to_min,
                starts_at,
                ends_at,
            } => {
                if starts_at.is_some_and(|s| now_ms < s) || ends_at.is_some_and(|e| now_ms >= e) {
                    return false;
                }
                let local_ms = now_ms + i64::from(utc_offset_min) * 60_000;
                let minute = (local_ms.rem_euclid(86_400_000) / 60_000) as u32;
                if from_min < to_min {
                    from_min <= minute && minute < to_min
                } else {
                    minute >= from_min || minute < to_min
                }
            }
            Window::Always => true,
        }
    }
}

/// One 满减 tier: spend at least `threshold_fen`, save `off_fen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    /// Subtotal needed (fen).
    pub threshold_fen: i64,
    /// Saving (fen).
    pub off_fen: i64,
}

/// What a promotion does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Offer {
    /// Per-product price change (限时折扣 / 分时段折扣 by its window).
    ProductPrice {
        /// sku → rule.
        rules: BTreeMap<String, PriceRule>,
    },
    /// 满减, tiered.
    SpendSave {
        /// The tiers.
        tiers: Vec<Tier>,
    },
}

/// A published promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// Id; lower wins ties.
    pub id: String,
    /// Shown on the order and as the WeChat `post_discounts` name.
    pub name: String,
    /// When.
    pub window: Window,
    /// What.
    pub offer: Offer,
}

/// A recognised line: sku and quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasketItem {
    /// Product code.
    pub sku: String,
    /// How many.
    pub qty: u32,
}

/// A priced line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricedLine {
    /// Product code.
    pub sku: String,
    /// Product name.
    pub name: String,
    /// How many.
    pub qty: u32,
    /// List unit price (fen).
    pub unit_fen: i64,
    /// List price × quantity (fen) — the WeChat `post_payments` amount.
    pub amount_fen: i64,
}

/// An applied promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscountLine {
    /// Promotion id.
    pub promotion_id: String,
    /// Promotion name.
    pub name: String,
    /// Saving (fen), positive.
    pub amount_fen: i64,
}

/// The priced order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricedOrder {
    /// Lines at list price.
    pub lines: Vec<PricedLine>,
    /// Applied promotions.
    pub discounts: Vec<DiscountLine>,
    /// Σ lines.
    pub gross_fen: i64,
    /// Σ lines − Σ discounts, never below zero.
    pub total_fen: i64,
}

/// A product on the cabinet's sellable list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPrice {
    /// Product name.
    pub name: String,
    /// Unit price (fen).
    pub price_fen: i64,
}

/// Bounds on a basket and on list prices (the hub's `[limits]` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest quantity of one line.
    pub max_line_qty: u32,
    /// Most lines in one basket (before repeated products are merged).
    pub max_basket_lines: usize,
    /// Most items in one basket, all lines together.
    pub max_basket_qty: u32,
    /// Largest list (unit) price, fen.
    pub max_price_fen: i64,
}

impl Limits {
    /// The defaults, also the hard caps the MQTT edge applies to recognitions.
    pub const DEFAULT: Limits = Limits {
        max_line_qty: 99,
        max_basket_lines: 64,
        max_basket_qty: 200,
        max_price_fen: 10_000_000,
    };

    /// Checks a basket's shape (not its products): line count, line quantities, total quantity.
    pub fn check_basket(&self, basket: &[BasketItem]) -> Result<(), PricingError> {
        if basket.len() > self.max_basket_lines {
            return Err(PricingError::BasketOutOfRange {
                line: None,
                detail: format!("{} lines, at most {}", basket.len(), self.max_basket_lines),
            });
        }
        let mut total: u64 = 0;
        for (i, item) in basket.iter().enumerate() {
            if item.qty > self.max_line_qty {
                return Err(PricingError::BasketOutOfRange {
                    line: Some(i),
                    detail: format!(
                        "items[{i}] ({}): qty {} is above {}",
                        item.sku, item.qty, self.max_line_qty
                    ),
                });
            }
            total += u64::from(item.qty);
            if total > u64::from(self.max_basket_qty) {
                return Err(PricingError::BasketOutOfRange {
                    line: Some(i),
                    detail: format!(
                        "items[{i}] ({}): the basket reaches {total} items, at most {}",
                        item.sku, self.max_basket_qty
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a basket could not be priced automatically.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// A recognised product is not on the cabinet's sellable list.
    #[error("product {0} is not on the cabinet's sellable list")]
    UnknownSku(String),
    /// Too many lines, a line's quantity or the basket's total quantity above the limits, or an
    /// amount that does not fit.
    #[error("basket out of range: {detail}")]
    BasketOutOfRange {
        /// The offending line (index in the basket as given), when one is to blame.
        line: Option<usize>,
        /// What exactly.
        detail: String,
    },
    /// A product's list price is negative or above the maximum.
    #[error("the price of {sku} ({price_fen} fen) is out of range (0 to {max_fen} fen)")]
    PriceOutOfRange {
        /// The product.
        sku: String,
        /// Its list price.
        price_fen: i64,
        /// The maximum.
        max_fen: i64,
    },
}

fn overflow(what: &str) -> PricingError {
    PricingError::BasketOutOfRange {
        line: None,
        detail: format!("{what} does not fit in an amount"),
    }
}

fn sum(mut amounts: impl Iterator<Item = i64>, what: &str) -> Result<i64, PricingError> {
    amounts.try_fold(0i64, |acc, a| {
        acc.checked_add(a).ok_or_else(|| overflow(what))
    })
}

/// Prices a basket. See the module docs for the rules.
pub fn price_basket(
    basket: &[BasketItem],
    list: &BTreeMap<String, ListPrice>,
    promotions: &[Promotion],
    now_ms: i64,
    utc_offset_min: i32,
    limits: &Limits,
) -> Result<PricedOrder, PricingError> {
    limits.check_basket(basket)?;
    // Merge repeated skus so a product is one line.
    let mut qty: BTreeMap<&str, u32> = BTreeMap::new();
    for item in basket.iter().filter(|i| i.qty > 0) {
        let q = qty.entry(item.sku.as_str()).or_default();
        *q = q
            .checked_add(item.qty)
            .ok_or_else(|| overflow("a product's quantity"))?;
    }
    let mut lines = Vec::with_capacity(qty.len());
    for (sku, &q) in &qty {
        let p = list
            .get(*sku)
            .ok_or_else(|| PricingError::UnknownSku((*sku).to_owned()))?;
        if !(0..=limits.max_price_fen).contains(&p.price_fen) {
            return Err(PricingError::PriceOutOfRange {
                sku: (*sku).to_owned(),
                price_fen: p.price_fen,
                max_fen: limits.max_price_fen,
            });
        }
        lines.push(PricedLine {
            sku: (*sku).to_owned(),
            name: p.name.clone(),
            qty: q,
            unit_fen: p.price_fen,
            amount_fen: p
                .price_fen
                .checked_mul(i64::from(q))
                .ok_or_else(|| overflow(&format!("{sku}: price × quantity")))?,
        });
    }
    let gross = sum(lines.iter().map(|l| l.amount_fen), "the gross amount")?;

    let mut in_force: Vec<&Promotion> = promotions
        .iter()
        .filter(|p| p.window.contains(now_ms, utc_offset_min))
        .collect();
    in_force.sort_by(|a, b| a.id.cmp(&b.id));
    // Discounts are keyed by promotion id: two promotions under one id (storage keeps ids
    // unique, a caller might not) would each claim the other's saving. The first one counts.
    in_force.dedup_by(|a, b| a.id == b.id);

    // Step 2: the best per-product rule for each line.
    let mut saved: BTreeMap<&str, (String, i64)> = BTreeMap::new();
    for line in &lines {
        let best = in_force
            .iter()
            .filter_map(|p| match &p.offer {
                Offer::ProductPrice { rules } => rules
                    .get(&line.sku)
                    .map(|r| (p, r.unit_price(line.unit_fen))),
                Offer::SpendSave { .. } => None,
            })
            .filter(|(_, unit)| *unit < line.unit_fen)
            // min_by_key keeps the first minimum: ids are sorted, so the lower id wins a tie.
            .min_by_key(|(_, unit)| *unit);
        if let Some((p, unit)) = best {
            let e = saved
                .entry(p.id.as_str())
                .or_insert_with(|| (p.name.clone(), 0));
            // 0 ≤ unit < unit_fen, so the saving is positive and at most the line's amount.
            let off = (line.unit_fen - unit)
                .checked_mul(i64::from(line.qty))
                .and_then(|o| o.checked_add(e.1))
                .ok_or_else(|| overflow("a discount"))?;
            e.1 = off;
        }
    }
    let mut discounts: Vec<DiscountLine> = in_force
        .iter()
        .filter_map(|p| {
            saved.get(p.id.as_str()).map(|(name, amt)| DiscountLine {
                promotion_id: p.id.clone(),
                name: name.clone(),
                amount_fen: *amt,
            })
        })
        .collect();
    let after_products = gross
        .checked_sub(sum(
            discounts.iter().map(|d| d.amount_fen),
            "the discounts",
        )?)
        .ok_or_else(|| overflow("the discounted subtotal"))?;

    // Step 3: the single best 满减 tier.
    let best_spend = in_force
        .iter()
        .filter_map(|p| match &p.offer {
            Offer::SpendSave { tiers } => tiers
                .iter()
                .filter(|t| t.threshold_fen <= after_products && t.off_fen > 0)
                .map(|t| t.off_fen.min(after_products))
                // A tier that saves nothing (an empty basket under a threshold ≤ 0) is no
                // discount line: providers refuse zero-amount discounts.
                .filter(|off| *off > 0)
                .max()
                .map(|off| (p, off)),
            Offer::ProductPrice { .. } => None,
        })
        .fold(None::<(&&Promotion, i64)>, |best, cur| match best {
            Some(b) if b.1 >= cur.1 => Some(b),
            _ => Some(cur),
        });
    if let Some((p, off)) = best_spend {
        discounts.push(DiscountLine {
            promotion_id: p.id.clone(),
            name: p.name.clone(),
            amount_fen: off,
        });
    }
    let total = gross
        .checked_sub(sum(
            discounts.iter().map(|d| d.amount_fen),
            "the discounts",
        )?)
        .ok_or_else(|| overflow("the total"))?
        .max(0);
    Ok(PricedOrder {
        lines,
        discounts,
        gross_fen: gross,
        total_fen: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CN: i32 = 480; // UTC+8
                         // 2025-11-21 00:00 +08:00 = 2025-11-20 16:00 UTC
    const MIDNIGHT_CN: i64 = 1_763_654_400_000;
    const MIN: i64 = 60_000;

    fn list() -> BTreeMap<String, ListPrice> {
        [
            ("cola", "Cola", 300),
            ("chips", "Chips", 650),
            ("water", "Water", 200),
        ]
        .into_iter()
        .map(|(s, n, p)| {
            (
                s.to_owned(),
                ListPrice {
                    name: n.into(),
                    price_fen: p,
                },
            )
        })
        .collect()
    }

    fn basket(items: &[(&str, u32)]) -> Vec<BasketItem> {
        items
            .iter()
            .map(|(s, q)| BasketItem {
                sku: (*s).into(),
                qty: *q,
            })
            .collect()
    }

    fn product(id: &str, window: Window, rules: &[(&str, PriceRule)]) -> Promotion {
        Promotion {
            id: id.into(),
            name: format!("promo {id}"),
            window,
            offer: Offer::ProductPrice {
                rules: rules.iter().map(|(s, r)| ((*s).to_owned(), *r)).collect(),
            },
        }
    }

    fn spend(id: &str, tiers: &[(i64, i64)]) -> Promotion {
        Promotion {
            id: id.into(),
            name: format!("spend {id}"),
            window: Window::Always,
            offer: Offer::SpendSave {
                tiers: tiers
                    .iter()
                    .map(|&(t, o)| Tier {
                        threshold_fen: t,
                        off_fen: o,
                    })
                    .collect(),
            },
        }
    }

    fn price(items: &[(&str, u32)], promos: &[Promotion], now: i64) -> PricedOrder {
        price_basket(&basket(items), &list(), promos, now, CN, &Limits::DEFAULT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn list_prices_only() {
        let o = price(&[("cola", 2), ("chips", 1), ("cola", 1)], &[], MIDNIGHT_CN);
        assert_eq!(o.lines.len(), 2, "repeated skus merge");
        assert_eq!(o.gross_fen, 3 * 300 + 650);
        assert_eq!(o.total_fen, o.gross_fen);
        assert!(o.discounts.is_empty());
    }

    /// Found by the property test: two promotions under one id each claimed the other's
    /// saving, so the discounts exceeded the basket.
    #[test]
    fn promotions_sharing_an_id_discount_once() {
        let free = product("b", Window::Always, &[("chips", PriceRule::FixedFen(0))]);
        let empty = product("b", Window::Always, &[]);
        let o = price(&[("chips", 1)], &[empty, free], MIDNIGHT_CN);
        let off: i64 = o.discounts.iter().map(|d| d.amount_fen).sum();
        assert!(off <= o.gross_fen, "{o:?}");
        assert_eq!(o.total_fen, o.gross_fen - off);
    }

    #[test]
    fn unknown_sku_goes_to_a_person() {
        let r = price_basket(
            &basket(&[("caviar", 1)]),
            &list(),
            &[],
            0,
            CN,
            &Limits::DEFAULT,
        );
        assert_eq!(r, Err(PricingError::UnknownSku("caviar".into())));
    }

    #[test]
    fn time_limited_discount_window_edges() {
        let w = Window::Between {
            starts_at: MIDNIGHT_CN,
            ends_at: MIDNIGHT_CN + 60 * MIN,
        };
        let p = product("p1", w, &[("cola", PriceRule::PercentBps(8_000))]);
        assert_eq!(
            price(&[("cola", 1)], std::slice::from_ref(&p), MIDNIGHT_CN - 1).total_fen,
            300,
            "before the start"
        );
        assert_eq!(
            price(&[("cola", 1)], std::slice::from_ref(&p), MIDNIGHT_CN).total_fen,
            240,
            "at the start"
        );
        assert_eq!(
            price(
                &[("cola", 1)],
                std::slice::from_ref(&p),
                MIDNIGHT_CN + 60 * MIN - 1
            )
            .total_fen,
            240,
            "last ms"
        );
        assert_eq!(
            price(&[("cola", 1)], &[p], MIDNIGHT_CN + 60 * MIN).total_fen,
            300,
            "at the end: over"
        );
    }

    #[test]
    fn time_slot_discount_is_local_time_and_daily() {
        // Every evening 20:00–23:00 Beijing time.
        let w = Window::Daily {
            from_min: 20 * 60,
            to_min: 23 * 60,
            starts_at: None,
            ends_at: None,
        };
        let p = product("p1", w, &[("chips", PriceRule::FixedFen(500))]);
        let at = |h: i64, m: i64, day: i64| MIDNIGHT_CN + day * 1440 * MIN + (h * 60 + m) * MIN;
        assert_eq!(
            price(&[("chips", 1)], std::slice::from_ref(&p), at(19, 59, 0)).total_fen,
            650
        );
        assert_eq!(
            price(&[("chips", 1)], std::slice::from_ref(&p), at(20, 0, 0)).total_fen,
            500
        );
        assert_eq!(
            price(&[("chips", 1)], std::slice::from_ref(&p), at(22, 59, 3)).total_fen,
            500,
            "any day"
        );
        assert_eq!(price(&[("chips", 1)], &[p], at(23, 0, 0)).total_fen, 650);
    }

    #[test]
    fn time_slot_over_midnight() {
        let w = Window::Daily {
            from_min: 22 * 60,
            to_min: 2 * 60,
            starts_at: None,
            ends_at: None,
        };
        assert!(w.contains(MIDNIGHT_CN - 30 * MIN, CN));
        assert!(w.contains(MIDNIGHT_CN + 119 * MIN, CN));
        assert!(!w.contains(MIDNIGHT_CN + 120 * MIN, CN));
        assert!(!w.contains(MIDNIGHT_CN - 121 * MIN, CN));
    }

    #[test]
    fn per_product_promotions_do_not_stack_best_wins_lower_id_on_tie() {
        let a = product(
            "a",
            Window::Always,
            &[("cola", PriceRule::PercentBps(9_000))],
        ); // 270
        let b = product(
            "b",
            Window::Always,
            &[
                ("cola", PriceRule::FixedFen(250)),
                ("water", PriceRule::FixedFen(150)),
            ],
        );
        let o = price(&[("cola", 2), ("water", 1)], &[a.clone(), b], 0);
        assert_eq!(o.total_fen, 2 * 250 + 150);
        assert_eq!(
            o.discounts,
            vec![DiscountLine {
                promotion_id: "b".into(),
                name: "promo b".into(),
                amount_fen: 2 * 50 + 50
            }]
        );
        let c = product("c", Window::Always, &[("cola", PriceRule::FixedFen(270))]);
        let o = price(&[("cola", 1)], &[c, a], 0);
        assert_eq!(o.discounts[0].promotion_id, "a", "tie: the lower id");
    }

    #[test]
    fn a_promotion_never_raises_a_price() {
        let p = product(
            "p",
            Window::Always,
            &[
                ("cola", PriceRule::FixedFen(999)),
                ("water", PriceRule::PercentBps(12_000)),
            ],
        );
        let o = price(&[("cola", 1), ("water", 1)], &[p], 0);
        assert_eq!(o.total_fen, 500);
        assert!(o.discounts.is_empty());
    }

    #[test]
    fn spend_save_tiers_on_the_discounted_subtotal() {
        let s = spend("s", &[(1000, 100), (2000, 300)]);
        assert_eq!(
            price(&[("cola", 3)], std::slice::from_ref(&s), 0).total_fen,
            900,
            "below the first tier"
        );
        assert_eq!(
            price(&[("chips", 1), ("water", 2)], std::slice::from_ref(&s), 0).total_fen,
            1050 - 100,
            "exactly 10.50 ≥ 10.00"
        );
        assert_eq!(
            price(&[("chips", 2), ("water", 2)], std::slice::from_ref(&s), 0).total_fen,
            1700 - 100
        );
        assert_eq!(
            price(&[("chips", 3), ("cola", 1)], std::slice::from_ref(&s), 0).total_fen,
            2250 - 300,
            "the highest tier met"
        );
        // With a product discount first, the subtotal may fall below a tier.
        let p = product(
            "p",
            Window::Always,
            &[("chips", PriceRule::PercentBps(5_000))],
        );
        let o = price(&[("chips", 3), ("cola", 1)], &[p, s], 0);
        assert_eq!(o.gross_fen, 2250);
        assert_eq!(
            o.discounts.iter().map(|d| d.amount_fen).collect::<Vec<_>>(),
            vec![975, 100]
        );
        assert_eq!(o.total_fen, 2250 - 975 - 100);
    }

    #[test]
    fn only_the_best_spend_save_applies() {
        let o = price(
            &[("chips", 2)],
            &[spend("s1", &[(1000, 100)]), spend("s2", &[(1200, 150)])],
            0,
        );
        assert_eq!(o.discounts.len(), 1);
        assert_eq!(o.discounts[0].promotion_id, "s2");
        assert_eq!(o.total_fen, 1300 - 150);
    }

    #[test]
    fn discounts_never_go_below_zero() {
        let o = price(&[("water", 1)], &[spend("s", &[(100, 5000)])], 0);
        assert_eq!(o.total_fen, 0);
        assert_eq!(o.discounts[0].amount_fen, 200);
    }

    #[test]
    fn percent_rounds_half_up_to_the_fen() {
        assert_eq!(PriceRule::PercentBps(8_850).unit_price(333), 295); // 294.705 → 295
        assert_eq!(PriceRule::PercentBps(5_000).unit_price(1), 1); // 0.5 → 1
        assert_eq!(PriceRule::PercentBps(0).unit_price(300), 0);
    }

    #[test]
    fn totals_add_up_for_wechat() {
        // total = Σ post_payments − Σ post_discounts, the check WeChat enforces.
        let p = product(
            "p",
            Window::Always,
            &[("cola", PriceRule::PercentBps(7_500))],
        );
        let o = price(
            &[("cola", 3), ("chips", 2)],
            &[p, spend("s", &[(1500, 200)])],
            0,
        );
        let pay: i64 = o.lines.iter().map(|l| l.amount_fen).sum();
        let off: i64 = o.discounts.iter().map(|d| d.amount_fen).sum();
        assert_eq!(o.total_fen, pay - off);
    }

    #[test]
    fn a_wrapping_basket_is_refused_not_priced_at_zero() {
        // u32::MAX + 1 wrapped to 0 before: a 200 with qty 0, total 0.
        let r = price_basket(
            &basket(&[("cola", u32::MAX), ("cola", 1)]),
            &list(),
            &[],
            0,
            CN,
            &Limits::DEFAULT,
        );
        assert!(
            matches!(r, Err(PricingError::BasketOutOfRange { line: Some(0), .. })),
            "{r:?}"
        );
        // Even with limits that allow it, the merged quantity is checked, not wrapped.
        let open = Limits {
            max_line_qty: u32::MAX,
            max_basket_lines: 10,
            max_basket_qty: u32::MAX,
            max_price_fen: i64::MAX,
        };
        let r = price_basket(
            &basket(&[("cola", u32::MAX), ("cola", 1)]),
            &list(),
            &[],
            0,
            CN,
            &open,
        );
        assert!(
            matches!(r, Err(PricingError::BasketOutOfRange { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn limits_name_the_line() {
        let l = Limits::DEFAULT;
        let err =
            |items: &[(&str, u32)]| price_basket(&basket(items), &list(), &[], 0, CN, &l).err();
        assert!(matches!(
            err(&[("cola", 1), ("chips", 100)]),
            Some(PricingError::BasketOutOfRange { line: Some(1), .. })
        ));
        assert_eq!(err(&[("cola", 99), ("chips", 99)]), None, "at the limits");
        assert!(
            matches!(
                err(&[("cola", 99), ("chips", 99), ("water", 3)]),
                Some(PricingError::BasketOutOfRange { line: Some(2), .. })
            ),
            "over 200 in all at the third line"
        );
        let many: Vec<(&str, u32)> = vec![("cola", 1); 65];
        assert!(matches!(
            err(&many),
            Some(PricingError::BasketOutOfRange { line: None, .. })
        ));
        assert_eq!(err(&many[..64]), None, "64 lines of one are fine");
    }

    #[test]
    fn a_price_above_the_maximum_is_refused() {
        let mut l = list();
        if let Some(p) = l.get_mut("chips") {
            p.price_fen = 10_000_001;
        }
        let r = price_basket(&basket(&[("chips", 1)]), &l, &[], 0, CN, &Limits::DEFAULT);
        assert_eq!(
            r,
            Err(PricingError::PriceOutOfRange {
                sku: "chips".into(),
                price_fen: 10_000_001,
                max_fen: 10_000_000
            })
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const SKUS: [&str; 5] = ["cola", "chips", "water", "gum", "caviar"];

        fn qty() -> impl Strategy<Value = u32> {
            prop_oneof![
                0u32..5,
                95u32..105,
                Just(u32::MAX),
                Just(u32::MAX - 1),
                Just(1u32 << 31),
                any::<u32>(),
            ]
        }

        fn amount() -> impl Strategy<Value = i64> {
            prop_oneof![
                0i64..2_000,
                9_999_990i64..10_000_010,
                Just(i64::MAX),
                Just(i64::MIN),
                any::<i64>(),
            ]
        }

        fn basket_s() -> impl Strategy<Value = Vec<BasketItem>> {
            proptest::collection::vec(
                (0usize..SKUS.len(), qty()).prop_map(|(s, qty)| BasketItem {
                    sku: SKUS[s].to_owned(),
                    qty,
                }),
                0..80,
            )
        }

        fn list_s() -> impl Strategy<Value = BTreeMap<String, ListPrice>> {
            // "caviar" is never listed.
            proptest::collection::vec(amount(), 4).prop_map(|prices| {
                SKUS[..4]
                    .iter()
                    .zip(prices)
                    .map(|(s, price_fen)| {
                        (
                            (*s).to_owned(),
                            ListPrice {
                                name: (*s).to_owned(),
                                price_fen,
                            },
                        )
                    })
                    .collect()
            })
        }

        fn rule() -> impl Strategy<Value = PriceRule> {
            prop_oneof![
                any::<u32>().prop_map(PriceRule::PercentBps),
                (0u32..10_000).prop_map(PriceRule::PercentBps),
                amount().prop_map(PriceRule::FixedFen),
            ]
        }

        fn promotion() -> impl Strategy<Value = Promotion> {
            let offer = prop_oneof![
                proptest::collection::btree_map(
                    (0usize..SKUS.len()).prop_map(|s| SKUS[s].to_owned()),
                    rule(),
                    0..5
                )
                .prop_map(|rules| Offer::ProductPrice { rules }),
                proptest::collection::vec(
                    (amount(), amount()).prop_map(|(threshold_fen, off_fen)| Tier {
                        threshold_fen,
                        off_fen
                    }),
                    0..5
                )
                .prop_map(|tiers| Offer::SpendSave { tiers }),
            ];
            ("[a-c]", offer).prop_map(|(id, offer)| Promotion {
                name: format!("p{id}"),
                id,
                window: Window::Always,
                offer,
            })
        }

        fn limits() -> impl Strategy<Value = Limits> {
            prop_oneof![
                Just(Limits::DEFAULT),
                (any::<u32>(), 0usize..100, any::<u32>(), amount()).prop_map(
                    |(max_line_qty, max_basket_lines, max_basket_qty, max_price_fen)| Limits {
                        max_line_qty,
                        max_basket_lines,
                        max_basket_qty,
                        max_price_fen,
                    }
                ),
                Just(Limits {
                    max_line_qty: u32::MAX,
                    max_basket_lines: usize::MAX,
                    max_basket_qty: u32::MAX,
                    max_price_fen: i64::MAX,
                }),
            ]
        }

        proptest! {
            /// Adversarial baskets, prices, promotions and limits: pricing never panics and
            /// never wraps; a priced order adds up exactly (checked in i128), within the limits.
            #[test]
            fn pricing_adds_up_or_refuses(
                basket in basket_s(),
                list in list_s(),
                promos in proptest::collection::vec(promotion(), 0..4),
                limits in limits(),
            ) {
                let r = price_basket(&basket, &list, &promos, 0, CN, &limits);
                let Ok(o) = r else { return Ok(()); };
                prop_assert!(basket.len() <= limits.max_basket_lines);
                prop_assert!(basket.iter().all(|i| i.qty <= limits.max_line_qty));
                let items: u128 = basket.iter().map(|i| u128::from(i.qty)).sum();
                prop_assert!(items <= u128::from(limits.max_basket_qty));
                let mut gross: i128 = 0;
                for line in &o.lines {
                    let q: u128 = basket.iter().filter(|i| i.sku == line.sku).map(|i| u128::from(i.qty)).sum();
                    prop_assert_eq!(u128::from(line.qty), q, "merged quantity of {}", &line.sku);
                    prop_assert!(line.qty > 0);
                    prop_assert!((0..=limits.max_price_fen).contains(&line.unit_fen));
                    prop_assert_eq!(i128::from(line.amount_fen), i128::from(line.unit_fen) * i128::from(line.qty));
                    gross += i128::from(line.amount_fen);
                }
                prop_assert_eq!(i128::from(o.gross_fen), gross);
                let off: i128 = o.discounts.iter().map(|d| i128::from(d.amount_fen)).sum();
                prop_assert!(o.discounts.iter().all(|d| d.amount_fen > 0));
                prop_assert_eq!(i128::from(o.total_fen), gross - off, "total = lines − discounts");
                prop_assert!(o.total_fen >= 0 && o.total_fen <= o.gross_fen);
            }

            /// With the default limits the arithmetic has room to spare: every basket within
            /// them over listed, in-range products is priced.
            #[test]
            fn within_the_default_limits_every_basket_is_priced(
                lines in proptest::collection::vec((0usize..4, 0u32..=99), 0..=64),
                prices in proptest::collection::vec(0i64..=10_000_000, 4),
                promos in proptest::collection::vec(promotion(), 0..4),
            ) {
                let mut budget = 200u32;
                let basket: Vec<BasketItem> = lines.into_iter().map(|(s, q)| {
                    let qty = q.min(budget);
                    budget -= qty;
                    BasketItem { sku: SKUS[s].to_owned(), qty }
                }).collect();
                let list: BTreeMap<String, ListPrice> = SKUS[..4].iter().zip(prices).map(|(s, price_fen)| ((*s).to_owned(), ListPrice { name: (*s).to_owned(), price_fen })).collect();
                let r = price_basket(&basket, &list, &promos, 0, CN, &Limits::DEFAULT);
                prop_assert!(r.is_ok(), "{:?}", r);
            }
        }
    }
}
