-- Who ended a session from outside (an operator's key id, or `supervisor`) and why: the
-- record of `POST /api/v1/sessions/{id}/close` and of the supervisor's timeouts.
ALTER TABLE sessions ADD COLUMN closed_by TEXT;
ALTER TABLE sessions ADD COLUMN close_note TEXT;
