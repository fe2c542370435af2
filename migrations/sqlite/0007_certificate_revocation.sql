-- A client certificate can be revoked (issue 17): re-issuing revokes the previous one, and the
-- broker refuses a revoked certificate at connect. Certificates issued before this existed: each
-- cabinet keeps only its newest one, as if it had been re-issued under the new rule.
ALTER TABLE certificates ADD COLUMN revoked_at BIGINT;
CREATE INDEX certificates_by_cabinet ON certificates (cabinet_id);
UPDATE certificates SET revoked_at = issued_at
WHERE serial NOT IN (
    SELECT c.serial FROM certificates c
    WHERE c.issued_at = (SELECT MAX(n.issued_at) FROM certificates n WHERE n.cabinet_id = c.cabinet_id)
);
