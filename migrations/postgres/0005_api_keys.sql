-- When a key was last used, written at most once a minute per key (the hub keeps the exact
-- moment in memory); which key replaced a rotated one.
ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT;
ALTER TABLE api_keys ADD COLUMN replaced_by TEXT;
CREATE INDEX api_keys_merchant ON api_keys (merchant_id, created_at);
