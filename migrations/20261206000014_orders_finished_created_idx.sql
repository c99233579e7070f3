-- no-transaction
-- The admin search by status for finished orders (`COMPLETED`, `CANCELLED`), newest first: without it the search
-- walks `orders_created_idx` past every unfinished order at the newest end (a backlog of tens of thousands) and
-- every order of the other status. Partial, so an order enters it once, when it finishes; the unfinished statuses
-- have their own partial indexes. Built concurrently, so creates and the worker go on while it builds.
create index concurrently orders_finished_created_idx
    on orders (status, created_at desc, id desc) where status in ('COMPLETED', 'CANCELLED');
