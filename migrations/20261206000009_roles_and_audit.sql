-- The operations console: a role per user, and an audit log of what operators do through the admin API.
-- Additive only: the previous release neither reads `users.role` nor knows `audit_log`, and inserts users without
-- a role (the default applies), so it runs on this schema during a rollout.

-- Who may use the admin API: `customer` (every account, as before: no admin access), `viewer` (reads the admin
-- API) or `operator` (reads it and acts: re-drives and cancels orders). Set with `api users set-role`. The
-- default is a constant, so adding the column rewrites nothing.
alter table users add column role text not null default 'customer';

-- Only the three roles. Added without a scan of `users` here; the next migration validates it, after this one has
-- committed, under a lock that lets reads and writes go on.
alter table users add constraint users_role_known
    check (role in ('customer', 'viewer', 'operator')) not valid;

-- One row per operator action, written in the action's own transaction where the action is one: who did what, to
-- which orders, what they asked for and what became of each order. Never updated or deleted by the service.
create table audit_log (
    -- Newest first is `order by id desc`: the primary key's index serves the console's paging.
    id          bigint      generated always as identity primary key,
    at          timestamptz not null default now(),
    -- No foreign key: the record outlives the account; the email keeps it readable then.
    actor_id    uuid        not null,
    actor_email text        not null,
    -- What was done: `redrive` or `cancel`.
    action      text        not null,
    -- The orders the action touched or was asked to touch (at most 1,000 per action).
    order_ids   uuid[]      not null,
    -- The request as the operator sent it (ids or the search's filters).
    request     jsonb       not null,
    -- What became of each order, as the API answered it.
    result      jsonb       not null,
    constraint audit_log_action_not_blank check (length(action) between 1 and 64)
);
