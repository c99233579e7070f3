-- no-transaction
-- Completed orders by completion time (`updated_at`, which never changes after COMPLETED), with their creation
-- time: the console's overview reads the last hour's throughput and create-to-complete latency from this index
-- alone, however many orders the table holds. Built concurrently, so creates and the worker go on while it builds.
create index concurrently orders_completed_idx
    on orders (updated_at) include (created_at) where status = 'COMPLETED';
