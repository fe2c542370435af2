CREATE TABLE products (
    merchant_id TEXT NOT NULL REFERENCES merchants(id),
    sku TEXT NOT NULL,
    name TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (merchant_id, sku)
);

CREATE TABLE cabinet_prices (
    cabinet_id TEXT NOT NULL REFERENCES cabinets(id),
    sku TEXT NOT NULL,
    price_fen BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (cabinet_id, sku)
);

CREATE TABLE promotions (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL REFERENCES merchants(id),
    name TEXT NOT NULL,
    rule TEXT NOT NULL,
    cabinet_ids TEXT,
    created_at BIGINT NOT NULL,
    ended_at BIGINT
);
CREATE INDEX promotions_merchant ON promotions (merchant_id, ended_at);
