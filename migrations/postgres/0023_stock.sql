-- Stock (商品库存) per cabinet and product, as the hub believes it: replaced by the cabinet's own
-- count after every restock (or stock-taking) session, less what every purchase's recognition
-- took. `low_at`: at or below it the product is low in that cabinet (an event, once per descent).
-- Whether a cabinet was ever counted in: a purchase at one that never was has no stock to take
-- from, and (read with the cached cabinet) costs no statement.
ALTER TABLE cabinets ADD COLUMN keeps_stock BIGINT NOT NULL DEFAULT 0;
CREATE TABLE cabinet_stock (
    cabinet_id TEXT NOT NULL REFERENCES cabinets (id),
    sku TEXT NOT NULL,
    qty BIGINT NOT NULL,
    low_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (cabinet_id, sku)
);
-- 库存不一致: what a restock's count found against what was expected (the stock before it,
-- plus what the restocker planned to bring or take away), per product; open until a person
-- resolves it.
CREATE TABLE stock_discrepancies (
    id TEXT PRIMARY KEY,
    cabinet_id TEXT NOT NULL,
    merchant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    sku TEXT NOT NULL,
    expected BIGINT NOT NULL,
    counted BIGINT NOT NULL,
    state TEXT NOT NULL,
    note TEXT,
    resolved_by TEXT,
    resolved_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX stock_discrepancies_by_merchant ON stock_discrepancies (merchant_id, state, created_at);
-- A restock session's plan (JSON `[{"sku", "qty"}]`, negative to take away): what its count is
-- checked against. No plan: a stock-taking (盘点), expected to find what was there.
ALTER TABLE sessions ADD COLUMN planned TEXT;
-- When its count was applied to the stock: once, whatever redelivers the recognition.
ALTER TABLE sessions ADD COLUMN counted_at BIGINT;
-- When an order's basket was taken off its cabinet's stock: once, however its basket came to be
-- settled (recognised, then resolved again by a person).
ALTER TABLE orders ADD COLUMN stock_taken_at BIGINT;
-- The restock history (补货记录) reads a merchant's restocks newest first.
CREATE INDEX sessions_restocks ON sessions (merchant_id, created_at) WHERE mode = 'restock';
-- Product templates: one sellable list (products and prices) applied to many cabinets.
CREATE TABLE product_templates (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL REFERENCES merchants (id),
    name TEXT NOT NULL,
    items TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX product_templates_by_merchant ON product_templates (merchant_id, created_at);
