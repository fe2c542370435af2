-- Provider notices that did not match the order they name (amount, app id, merchant ids, an
-- unknown order): not applied, kept for an operator to look at.
CREATE TABLE payment_exceptions (
    id TEXT PRIMARY KEY,
    merchant_id TEXT,
    order_id TEXT,
    provider TEXT NOT NULL,
    notification_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX payment_exceptions_by_merchant ON payment_exceptions (merchant_id, created_at);
