-- The prices and promotions in force when the shopper shopped, captured with an order that
-- goes abnormal (JSON {at, list, promotions}): resolved later, it is priced with them, not
-- with whatever is in force by then.
ALTER TABLE orders ADD COLUMN price_terms TEXT;
