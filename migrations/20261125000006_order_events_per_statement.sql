-- Live order status, announced per statement instead of per row. The worker claims and completes orders in
-- batches (one statement for up to a few hundred changes), and a row-level trigger ran a query and a pg_notify for
-- each of them: PostgreSQL serializes the commits of notifying transactions, and every notification is a message
-- the listening api reads and parses. Now one statement's changes go out together, as JSON arrays of the same
-- objects as before (see 20261125000005), each array under about 7,000 bytes: PostgreSQL refuses a payload of
-- 8,000 bytes or more, and one change is at most about 1,500 bytes (a 200-character product name, escaped).
--
-- Rolling out: an api from before this migration does not read arrays and logs "unreadable order event" for them;
-- its streams miss those changes until it is replaced, and their clients get them on reconnecting (Last-Event-ID
-- reads the history). A single change is still sent as an array.

drop trigger order_status_history_announce on order_status_history;
drop function announce_order_status_change();

create function announce_order_status_changes() returns trigger
    language plpgsql as $$
declare
    payload text;
begin
    for payload in
        select '[' || string_agg(event, ',' order by id) || ']'
        from (
            select id, event, (sum(octet_length(event)) over (order by id) - 1) / 6000 as chunk
            from (
                select n.id, json_build_object(
                    'id', n.id,
                    'order_id', o.id,
                    'user_id', o.user_id,
                    'product_name', o.product_name,
                    'amount', o.amount::text,
                    'status', n.status,
                    'created_at_us', (extract(epoch from o.created_at) * 1000000)::bigint,
                    'changed_at_us', (extract(epoch from n.changed_at) * 1000000)::bigint
                )::text as event
                from changed n join orders o on o.id = n.order_id
            ) events
        ) sized
        group by chunk
        order by chunk
    loop
        perform pg_notify('order_events', payload);
    end loop;
    return null;
end;
$$;

create trigger order_status_history_announce
    after insert on order_status_history
    referencing new table as changed
    for each statement execute function announce_order_status_changes();
