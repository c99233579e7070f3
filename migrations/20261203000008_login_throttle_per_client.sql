-- The login throttle, per account and client. `login_attempts` counted every attempt per account, so anyone could
-- keep an account's owner out with eleven requests every 15 minutes. Now wrong guesses are counted per account and
-- client (the address the rate limits key clients by), and per account over all clients; the owner, logging in
-- from a client that has not been failing, gets in while guesses from elsewhere are refused. New tables, so the
-- previous release, still counting in `login_attempts`, runs on as before during a rollout; that table is no
-- longer written by this release and goes in a later one.

-- Attempts per account (the lower-cased email as sent, whether or not an account has it) over all clients, in a
-- fixed window. Counted before the password is checked; a successful login takes its own attempt back.
create table login_throttle_accounts (
    email        text        primary key,
    attempts     integer     not null,
    window_start timestamptz not null
);

-- Attempts per account and client, in a fixed window of the pair's own. Counted before the password is checked;
-- a successful login deletes the row.
create table login_throttle_clients (
    email        text        not null,
    -- the client as the rate limits key it: an IPv4 address, or the first address of an IPv6 /64
    client       text        not null,
    attempts     integer     not null,
    window_start timestamptz not null,
    constraint login_throttle_clients_pkey primary key (email, client)
);
