-- Every status change an order goes through, written by the same statement that makes the change. It is the
-- audit trail support staff ask for ("when did my order start processing?") and the evidence the tests use
-- that each transition happens exactly once, whatever the timing.

create table order_status_history (
    id         bigint       generated always as identity primary key,
    order_id   uuid         not null,
    status     order_status not null,
    -- the worker claim that made the change; null for changes made by the owner (cancel)
    changed_by text,
    changed_at timestamptz  not null default now(),
    constraint order_status_history_order_id_fkey foreign key (order_id) references orders (id) on delete cascade
);

create index order_status_history_order_id_idx on order_status_history (order_id, id);
