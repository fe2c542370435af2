-- Bills (交易账单) read a merchant's day: orders by when they were paid, refunds and returns by
-- when they were settled.
CREATE INDEX orders_by_merchant_paid ON orders (merchant_id, paid_at);
CREATE INDEX refunds_by_status_updated ON refunds (status, updated_at);
CREATE INDEX settlement_returns_by_state ON settlement_returns (state, updated_at);
