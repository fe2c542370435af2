-- A flapping alert (raised more than 5 times in 10 minutes) stays one row; this counts its
-- raises. 0 for an alert that never flapped.
ALTER TABLE alerts ADD COLUMN flaps BIGINT NOT NULL DEFAULT 0;
