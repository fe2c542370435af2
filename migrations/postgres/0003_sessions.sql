ALTER TABLE merchants ADD COLUMN risk_ceiling_fen BIGINT NOT NULL DEFAULT 20000;
ALTER TABLE merchants ADD COLUMN wechat_sub_mchid TEXT;

CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    cabinet_id TEXT NOT NULL REFERENCES cabinets(id),
    merchant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    mode TEXT NOT NULL,
    state TEXT NOT NULL,
    failure TEXT,
    idempotency_key TEXT,
    response TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    unlocked_at BIGINT
);
CREATE UNIQUE INDEX sessions_idempotency ON sessions (merchant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX sessions_cabinet_state ON sessions (cabinet_id, state);

CREATE TABLE orders (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL UNIQUE REFERENCES sessions(id),
    cabinet_id TEXT NOT NULL,
    merchant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    status TEXT NOT NULL,
    abnormal_reason TEXT,
    items TEXT,
    priced TEXT,
    total_fen BIGINT,
    paid_fen BIGINT NOT NULL DEFAULT 0,
    provider_order_no TEXT,
    transaction_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX orders_merchant_created ON orders (merchant_id, created_at);

CREATE TABLE payment_notifications (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    event_type TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
-- One open session per cabinet, whatever races the requests run into.
CREATE UNIQUE INDEX sessions_one_open ON sessions (cabinet_id) WHERE state IN ('confirming', 'unlocking', 'open');
