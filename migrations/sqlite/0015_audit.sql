-- Who did what to money and access, when and why: resolves, refunds, closed sessions,
-- blacklist changes (by hand or by the supervisor), merchant payment settings, API keys.
CREATE TABLE audit (
    id TEXT PRIMARY KEY,
    merchant_id TEXT,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    order_id TEXT,
    reason TEXT,
    detail TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX audit_by_merchant ON audit (merchant_id, at);
CREATE INDEX audit_by_order ON audit (order_id, at);
