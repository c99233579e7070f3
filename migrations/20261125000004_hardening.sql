-- Hardening: sessions that end, a login throttle per account, and orders that stop being retried.
-- Every change is additive, so code of the previous release runs against this schema during a rollout.

-- A session (a family of refresh tokens) ends SESSION_MAX_DAYS after its login, however often it is refreshed.
-- Each token carries its session's end, so a refresh reads it from the token it redeems. Tokens issued before
-- this migration keep their own expiry as their session's end.
alter table refresh_tokens add column session_expires_at timestamptz;
update refresh_tokens set session_expires_at = expires_at;
alter table refresh_tokens alter column session_expires_at set not null;
alter table refresh_tokens add constraint refresh_tokens_within_session check (expires_at <= session_expires_at);

-- The purge deletes expired and revoked tokens in bounded batches; these keep each batch a short index scan.
create index refresh_tokens_expires_at_idx on refresh_tokens (expires_at);
create index refresh_tokens_revoked_at_idx on refresh_tokens (revoked_at) where revoked_at is not null;

-- Login attempts per account (the lower-cased email as sent, whether or not an account has it), in a fixed
-- window. A successful login deletes the row. Shared by every api process.
create table login_attempts (
    email        text        primary key,
    attempts     integer     not null,
    window_start timestamptz not null
);

-- Attempts at processing an order: each delivery a worker handles counts one. Past ORDER_MAX_ATTEMPTS the order
-- is parked (`parked_at` set): the reconciler leaves it alone until `worker requeue` re-drives it.
alter table orders add column attempts integer not null default 0;
alter table orders add column parked_at timestamptz;
alter table orders add column last_error text;
-- Parked orders, for `worker requeue --stuck` and the gauge.
create index orders_parked_idx on orders (parked_at) where parked_at is not null;
