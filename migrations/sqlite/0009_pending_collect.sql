-- The collector's query (pending orders by age) read the whole orders table every minute: a
-- full scan and a sort, filling a reader's page cache with the table (issue 18's soak found it
-- as resident memory that grew with the table). Pending orders are few; index only them.
CREATE INDEX orders_pending_collect ON orders (created_at) WHERE status = 'pending_payment';
