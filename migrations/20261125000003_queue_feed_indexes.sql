-- The reconciler feeds the Redis queue from PostgreSQL, oldest order first, and re-pushes by age alone. Its two
-- scans each get an index that serves both the filter and the order, so a round reads only the rows it pushes
-- (plus the few already in Redis), however long the backlog.

-- PENDING orders, oldest first: the feed order, and the backlog gauges (count and oldest age).
create index orders_pending_created_idx on orders (created_at, id) where status = 'PENDING';
-- PROCESSING orders by lease: the ones whose worker died come first.
create index orders_processing_lease_idx on orders (lease_until) where status = 'PROCESSING';
-- Replaced by the two above: it could not serve `order by created_at`.
drop index orders_unfinished_idx;
