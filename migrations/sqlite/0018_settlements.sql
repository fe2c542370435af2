-- Settlement (分账) of paid orders: the merchant's commission to the platform, the rest released
-- to the merchant. A row exists exactly for the orders completed with profit sharing on, from
-- the moment they were completed: an order whose payment never comes keeps a `pending` row the
-- supervisor never takes (it takes only paid orders). `attempt` numbers the split requests
-- (the split's out_order_no carries it: a closed split is retried under a new number); `step`
-- is what comes next (`split`, `follow`, `finish`), which a `failed` one retries.
CREATE TABLE settlements (
    order_id TEXT PRIMARY KEY REFERENCES orders (id),
    merchant_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    state TEXT NOT NULL,
    step TEXT NOT NULL DEFAULT 'split',
    commission_bps BIGINT NOT NULL,
    platform_fen BIGINT NOT NULL DEFAULT 0,
    merchant_fen BIGINT NOT NULL DEFAULT 0,
    returned_fen BIGINT NOT NULL DEFAULT 0,
    attempt BIGINT NOT NULL DEFAULT 1,
    provider_order_id TEXT,
    failures BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    due_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- The supervisor's query walks this in due order and stops at its batch, however large the
-- backlog a rush leaves (a (state, due_at) index made it sort every row due, five times a
-- second).
CREATE INDEX settlements_due ON settlements (due_at)
    WHERE state IN ('pending', 'splitting', 'split', 'failed');
CREATE INDEX settlements_by_merchant ON settlements (merchant_id, updated_at);
-- Returns (回退) of a split, one per refund that needed the platform's share back first.
CREATE TABLE settlement_returns (
    id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL REFERENCES orders (id),
    refund_id TEXT NOT NULL,
    amount_fen BIGINT NOT NULL,
    state TEXT NOT NULL,
    fail_reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX settlement_returns_by_order ON settlement_returns (order_id);
