-- Refunds followed to the end: a refund is `processing` until the provider says `succeeded`,
-- `failed` or `closed`. An order's `refunded_fen` counts only succeeded refunds; what is in
-- flight is reserved in `refund_reserved_fen` (released when a refund fails or closes).
-- `paid_at` dates the provider's refund window.
ALTER TABLE orders ADD COLUMN refund_reserved_fen BIGINT NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN paid_at BIGINT;
UPDATE orders SET paid_at = updated_at WHERE status IN ('paid', 'refunded');
UPDATE orders SET refund_reserved_fen = (
    SELECT COALESCE(SUM(amount_fen), 0) FROM refunds WHERE refunds.order_id = orders.id AND refunds.status = 'requested'
);
UPDATE orders SET refunded_fen = refunded_fen - refund_reserved_fen;
UPDATE orders SET status = 'paid' WHERE status = 'refunded' AND refunded_fen < paid_fen;
UPDATE refunds SET status = 'processing' WHERE status = 'requested';
CREATE INDEX refunds_processing ON refunds (status, updated_at);
