CREATE TABLE merchants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    commission_bps BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    merchant_id TEXT REFERENCES merchants(id),
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE cabinets (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL REFERENCES merchants(id),
    model TEXT NOT NULL,
    point TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    active BIGINT NOT NULL DEFAULT 0,
    service_expires_at BIGINT,
    created_at BIGINT NOT NULL,
    activated_at BIGINT
);
CREATE INDEX cabinets_merchant ON cabinets (merchant_id);

CREATE TABLE cabinet_configs (
    cabinet_id TEXT NOT NULL REFERENCES cabinets(id),
    version BIGINT NOT NULL,
    config TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (cabinet_id, version)
);

CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    cabinet_id TEXT NOT NULL REFERENCES cabinets(id),
    merchant_id TEXT NOT NULL,
    type TEXT NOT NULL,
    severity TEXT NOT NULL,
    detail TEXT,
    raised_at BIGINT NOT NULL,
    acked_at BIGINT,
    acked_by TEXT,
    cleared_at BIGINT,
    cleared_by TEXT
);
-- One active alert per (cabinet, type), whatever races the writers run into.
CREATE UNIQUE INDEX alerts_one_active ON alerts (cabinet_id, type) WHERE cleared_at IS NULL;
CREATE INDEX alerts_merchant_raised ON alerts (merchant_id, raised_at);

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    cabinet_id TEXT NOT NULL REFERENCES cabinets(id),
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
