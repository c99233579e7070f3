-- The whole schema of the orders service. PostgreSQL is the source of truth: Redis only carries wake-ups,
-- so every column the worker and the reconciler need to recover from lost jobs lives here.

create type order_status as enum ('PENDING', 'PROCESSING', 'COMPLETED', 'CANCELLED');

create table users (
    id            uuid        primary key,
    name          text        not null,
    -- stored lower-cased, so the unique constraint is case-insensitive
    email         text        not null,
    -- a PHC string (Argon2id); never leaves the database layer
    password_hash text        not null,
    created_at    timestamptz not null default now(),
    constraint users_email_key unique (email),
    constraint users_email_lowercase check (email = lower(email)),
    constraint users_name_not_blank check (length(btrim(name)) between 1 and 100)
);

-- One row per refresh token ever issued. A login starts a family (session); each refresh marks the presented
-- token used and issues the next one in the same family. A used token presented again is a reuse: the whole
-- family is revoked.
create table refresh_tokens (
    -- the token's jti
    id         uuid        primary key,
    family_id  uuid        not null,
    user_id    uuid        not null,
    -- SHA-256 of the token: a database leak does not leak usable tokens
    token_hash bytea       not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    -- set when this token was exchanged for the next one
    used_at    timestamptz,
    -- set when its family was revoked (logout or reuse detection)
    revoked_at timestamptz,
    constraint refresh_tokens_token_hash_key unique (token_hash),
    constraint refresh_tokens_user_id_fkey foreign key (user_id) references users (id) on delete cascade
);

create index refresh_tokens_family_id_idx on refresh_tokens (family_id);

create table orders (
    id              uuid           primary key,
    user_id         uuid           not null,
    product_name    text           not null,
    amount          numeric(12, 2) not null,
    status          order_status   not null default 'PENDING',
    -- the client's Idempotency-Key, unique per user
    idempotency_key text,
    created_at      timestamptz    not null default now(),
    updated_at      timestamptz    not null default now(),
    -- last time a job for this order was pushed to the queue; null = never (the reconciler's work list)
    enqueued_at     timestamptz,
    -- while PROCESSING: the worker holding the order and until when; an expired lease may be taken over
    locked_by       text,
    lease_until     timestamptz,
    constraint orders_user_id_fkey foreign key (user_id) references users (id) on delete cascade,
    constraint orders_amount_range check (amount > 0 and amount <= 1000000000),
    constraint orders_product_name_not_blank check (length(btrim(product_name)) between 1 and 200),
    constraint orders_idempotency_key_length check (length(idempotency_key) between 1 and 255),
    constraint orders_lease_only_while_processing check (status = 'PROCESSING' or lease_until is null)
);

-- "my orders, newest first", keyset-paginated on (created_at, id)
create index orders_user_created_idx on orders (user_id, created_at desc, id desc);
-- the same, filtered by status
create index orders_user_status_created_idx on orders (user_id, status, created_at desc, id desc);
-- a repeated Idempotency-Key from the same user finds the first order instead of creating another
create unique index orders_user_idempotency_key_key on orders (user_id, idempotency_key)
    where idempotency_key is not null;
-- the reconciler's scan: only unfinished orders are indexed
create index orders_unfinished_idx on orders (status, enqueued_at)
    where status in ('PENDING', 'PROCESSING');
