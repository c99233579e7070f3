-- Live order status: every status change, as its row in order_status_history, is announced on the
-- `order_events` channel. The notification is sent by the trigger inside the transaction that makes the change,
-- so it goes out exactly when that change commits, and never for a change that rolls back. Each api process
-- LISTENs on one connection and hands the events to its open streams (server-sent events); a stream that may have
-- missed some (its listener reconnected) reads them back from order_status_history by id.
--
-- The payload is small and fixed: the history row's id (the event id clients resume from), the order, its owner,
-- the new status and when it changed (microseconds since the Unix epoch).

create function announce_order_status_change() returns trigger
    language plpgsql as $$
begin
    perform pg_notify('order_events', json_build_object(
        'id', new.id,
        'order_id', new.order_id,
        'user_id', (select o.user_id from orders o where o.id = new.order_id),
        'status', new.status,
        'changed_at_us', (extract(epoch from new.changed_at) * 1000000)::bigint
    )::text);
    return null;
end;
$$;

create trigger order_status_history_announce
    after insert on order_status_history
    for each row execute function announce_order_status_change();
