-- A client certificate can be revoked (issue 17): re-issuing revokes the previous one, and the
-- broker refuses a revoked certificate at connect.
ALTER TABLE certificates ADD COLUMN revoked_at BIGINT;
CREATE INDEX certificates_by_cabinet ON certificates (cabinet_id);
