-- Live order status: every status change, as its row in order_status_history, is announced on the
-- `order_events` channel. The notification is sent by the trigger inside the transaction that makes the change,
-- so it goes out exactly when that change commits, and never for a change that rolls back. Each api process
-- LISTENs on one connection and hands the events to its open streams (server-sent events); a stream that may have
-- missed some (its listener reconnected) reads them back from order_status_history by id.
--
-- The payload is the order as of the change: the history row's id (the event id clients resume from), the order's
-- fields with the new status, and the times in microseconds since the Unix epoch (the amount as text, exactly).
-- Streams send it as it comes, without reading the order again.

create function announce_order_status_change() returns trigger
    language plpgsql as $$
begin
    perform pg_notify('order_events', (
        select json_build_object(
            'id', new.id,
            'order_id', o.id,
            'user_id', o.user_id,
            'product_name', o.product_name,
            'amount', o.amount::text,
            'status', new.status,
            'created_at_us', (extract(epoch from o.created_at) * 1000000)::bigint,
            'changed_at_us', (extract(epoch from new.changed_at) * 1000000)::bigint
        )::text
        from orders o where o.id = new.order_id
    ));
    return null;
end;
$$;

create trigger order_status_history_announce
    after insert on order_status_history
    for each row execute function announce_order_status_change();
