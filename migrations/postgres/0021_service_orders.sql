-- Service-time orders (设备使用时长): a merchant buys whole years for some of its cabinets at
-- the configured yearly price. `unpaid` until the provider says it is paid (then `paid`, and
-- the cabinets' service is extended in the same transaction) or until it is closed at the
-- provider after `service.unpaid_cancel_ms` (`cancelled`). An offline payment is recorded by a
-- platform admin with its voucher and is `paid` from the start.
CREATE TABLE service_orders (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL REFERENCES merchants (id),
    cabinet_ids TEXT NOT NULL,
    cabinets BIGINT NOT NULL,
    years BIGINT NOT NULL,
    unit_fen BIGINT NOT NULL,
    amount_fen BIGINT NOT NULL,
    channel TEXT NOT NULL,
    status TEXT NOT NULL,
    code_url TEXT,
    transaction_id TEXT,
    voucher TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    due_at BIGINT NOT NULL,
    paid_at BIGINT,
    cancelled_at BIGINT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX service_orders_by_merchant ON service_orders (merchant_id, created_at);
-- The sweep walks only what is still unpaid, in due order.
CREATE INDEX service_orders_unpaid ON service_orders (due_at) WHERE status = 'unpaid';
