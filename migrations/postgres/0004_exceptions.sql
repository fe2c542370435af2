ALTER TABLE orders ADD COLUMN refunded_fen BIGINT NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN collect_attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN next_collect_at BIGINT;
CREATE INDEX orders_user_status ON orders (merchant_id, user_id, status);

CREATE TABLE refunds (
    id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL REFERENCES orders(id),
    idempotency_key TEXT,
    amount_fen BIGINT NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    provider_refund_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX refunds_idempotency ON refunds (order_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE blacklist (
    merchant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    automatic BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (merchant_id, user_id)
);
