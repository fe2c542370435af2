-- Recognition billing (算法识别次数). Every recognition a cabinet reports for a session (a
-- purchase's basket, a restock's count) is marked on its order when it is applied, in the same
-- statement, with what it costs the merchant on the bill (the fee then in force; 0 when it is
-- paid from a prepaid quota), so counting and billing them costs the purchase path nothing: a
-- day's recognitions are the orders recognized in it. A merchant pays after use (`postpaid`) or
-- from a prepaid quota (`prepaid`: one less per recognition; below zero is owed and comes out of
-- the next top-up).
ALTER TABLE orders ADD COLUMN recognized_at BIGINT;
ALTER TABLE orders ADD COLUMN recognition_fee_fen BIGINT NOT NULL DEFAULT 0;
CREATE INDEX orders_by_merchant_recognized ON orders (merchant_id, recognized_at);
ALTER TABLE merchants ADD COLUMN recognition_billing TEXT NOT NULL DEFAULT 'postpaid';
ALTER TABLE merchants ADD COLUMN recognition_quota BIGINT NOT NULL DEFAULT 0;
