-- Change ids in commit order. An order_status_history id comes from a sequence when the row is inserted, but the
-- transaction that inserts it may commit after one that took a later id: the worker runs several claim and
-- completion statements at once, and cancels come from every api process. A reader that has seen id N then takes
-- every change up to N as known, and a stream of all of a user's orders (which resumes and catches up "after N")
-- missed a change with a smaller id that committed later.
--
-- Each statement that writes history now first takes one transaction-level advisory lock, before its rows take
-- their ids, and holds it until its transaction ends. So when id N is visible, every smaller id is committed (or
-- rolled back) already, and "after N" misses nothing. The lock is the last one such a statement takes (after the
-- row locks on orders), so it adds no deadlock; the transactions it orders are each one statement, and PostgreSQL
-- already serializes their commits, since each of them notifies.
--
-- Rolling out: the previous release's statements take the lock too (it is a trigger), so nothing changes for them.

create function order_status_history_take_turn() returns trigger
    language plpgsql as $$
begin
    -- 'order_status_history' as a bigint key: any constant, used by this lock alone.
    perform pg_advisory_xact_lock(7142318045603927233);
    return null;
end;
$$;

create trigger order_status_history_in_commit_order
    before insert on order_status_history
    for each statement execute function order_status_history_take_turn();
