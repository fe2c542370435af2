-- The most the shopper authorised for the order (the provider order's risk ceiling when it was
-- created): a basket above it cannot be charged in full (WeChat: total_amount <= risk_fund).
ALTER TABLE orders ADD COLUMN authorised_fen BIGINT;
