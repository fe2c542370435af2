-- Why an order's deduction failed, by whose side: `shopper` (their funds or their own limits:
-- these count toward the blacklist), `merchant` (the merchant's collection limits, e.g. a
-- 小微 merchant's daily cap: never the shopper's fault). NULL is the shopper's (WeChat does
-- not say why; the only documented cause is the shopper's balance).
ALTER TABLE orders ADD COLUMN deduction_failure TEXT;
