-- no-transaction
-- The admin search by product-name prefix (`product_name like 'Wid%'`): text_pattern_ops compares byte-wise, so
-- a prefix is a range of this index whatever the database's collation; within one product name the entries are
-- newest first. Built concurrently, so creates and the worker go on while it builds.
create index concurrently orders_product_created_idx
    on orders (product_name text_pattern_ops, created_at desc, id desc);
