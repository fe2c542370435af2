-- Service-time reminders (设备使用时长): the smallest reminder (30, 7, 1 days before expiry;
-- 0 once expired) already given for the cabinet's current expiry; cleared when the service is
-- extended, so the next expiry is reminded of afresh.
ALTER TABLE cabinets ADD COLUMN service_reminded_days BIGINT;
