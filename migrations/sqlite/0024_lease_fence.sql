-- The newest cabinet-lease fencing token a node wrote under (issue 21): a node that lost a
-- cabinet's lease and does not know it yet has its writes for the cabinet (alerts, online state)
-- refused once the new owner's token is here.
ALTER TABLE cabinets ADD COLUMN lease_fence BIGINT NOT NULL DEFAULT 0;
