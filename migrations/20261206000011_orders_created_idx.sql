-- no-transaction
-- Every order, newest first: the admin search without a more selective filter, and its time ranges
-- (`created_from`, `created_to`), walk this index in the order they answer, a page at a time. Built concurrently,
-- so creates and the worker go on while it builds.
create index concurrently orders_created_idx on orders (created_at desc, id desc);
