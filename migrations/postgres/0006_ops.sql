-- An Idempotency-Key is bound to the request it first came with (a hash of method, path and
-- body), and an unanswered one to the process that took it (its boot id): a repeat with another
-- body is refused, and a key whose process died is reclaimed rather than "in progress" forever.
ALTER TABLE sessions ADD COLUMN request_hash TEXT;
ALTER TABLE sessions ADD COLUMN claimed_by TEXT;
ALTER TABLE refunds ADD COLUMN request_hash TEXT;
-- When the cabinet last came online, NULL once it went offline: after a restart, a cabinet that
-- was online and does not come back is marked offline (with its alert) by the start-up sweep.
ALTER TABLE cabinets ADD COLUMN online_at BIGINT;
