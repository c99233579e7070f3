//! The login throttle, per account and client, shared by every api process through PostgreSQL.
//!
//! Counting attempts per account alone let anyone keep an account's owner out: a few requests every window, from
//! anywhere, and the right password was refused too. So, as large identity providers do (and the OWASP
//! authentication cheat sheet advises), guesses are throttled where they come from:
//!
//! - per account and client (the address the rate limits key clients by, honouring trusted proxies): at most
//!   `per_client` attempts in a window, then that client is refused for that account until its window ends,
//!   right password or not;
//! - per account over all clients: once `per_account` attempts have been counted in the account's window, a
//!   client that has already tried that account in its own window is refused, but a client that has not (the
//!   owner's phone, say) still has its password checked. A guess spread over many addresses therefore gets at
//!   most `per_account` attempts per window, and then one per further address.
//!
//! Attempts are counted before the password is checked, in one transaction that locks the account's row, so
//! concurrent guesses cannot slip past a limit, and a refused attempt costs no hash. A successful login deletes its
//! client's row and takes its attempt back from the account's count (not the whole count: the owner logging in
//! does not give a guesser a fresh budget). Unknown emails are counted like known ones, so the throttle tells
//! nothing about which accounts exist.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::domain::Email;

/// The throttle's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Attempts per account and client in a window.
    pub per_client: u32,
    /// Attempts per account over all clients in a window, past which only clients that have not tried the account
    /// in their own window get their password checked.
    pub per_account: u32,
    /// How long a window lasts; each account, and each pair of account and client, has its own.
    pub window: Duration,
}

/// What the throttle decided for one login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Counted: go on and check the password.
    Allowed,
    /// Refused without checking, and not counted, until `until`.
    Blocked {
        /// When the first window that holds the refusal ends.
        until: DateTime<Utc>,
    },
}

fn millis(window: Duration) -> i64 {
    i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
}

/// Decides on one login attempt for `email` from `client` (see the module's note), and counts it if it is allowed.
/// A window starts with the first attempt after the previous one ended.
pub async fn count_attempt(
    db: &PgPool,
    email: &Email,
    client: &str,
    limits: Limits,
) -> sqlx::Result<Throttle> {
    let window_ms = millis(limits.window);
    let mut tx = db.begin().await?;
    // The account's row first, locked until the end: the decision and the count are one step for all its clients.
    let account = sqlx::query!(
        r#"
        insert into login_throttle_accounts as a (email, attempts, window_start)
        values ($1, 0, now())
        on conflict (email) do update set
            attempts = case when a.window_start <= now() - make_interval(secs => $2::bigint / 1000.0)
                            then 0 else a.attempts end,
            window_start = case when a.window_start <= now() - make_interval(secs => $2::bigint / 1000.0)
                                then now() else a.window_start end
        returning attempts as "attempts!",
                  window_start + make_interval(secs => $2::bigint / 1000.0) as "until!"
        "#,
        email.as_str(),
        window_ms,
    )
    .fetch_one(&mut *tx)
    .await?;
    let pair = sqlx::query!(
        r#"
        insert into login_throttle_clients as c (email, client, attempts, window_start)
        values ($1, $2, 0, now())
        on conflict (email, client) do update set
            attempts = case when c.window_start <= now() - make_interval(secs => $3::bigint / 1000.0)
                            then 0 else c.attempts end,
            window_start = case when c.window_start <= now() - make_interval(secs => $3::bigint / 1000.0)
                                then now() else c.window_start end
        returning attempts as "attempts!",
                  window_start + make_interval(secs => $3::bigint / 1000.0) as "until!"
        "#,
        email.as_str(),
        client,
        window_ms,
    )
    .fetch_one(&mut *tx)
    .await?;
    let attempts = |n: i32| u32::try_from(n).unwrap_or(0);
    let throttle = if attempts(pair.attempts) >= limits.per_client {
        Throttle::Blocked { until: pair.until }
    } else if attempts(account.attempts) >= limits.per_account && pair.attempts > 0 {
        // Either window's end lifts it: the client's (it is then new to the account) or the account's.
        Throttle::Blocked {
            until: pair.until.min(account.until),
        }
    } else {
        sqlx::query!(
            "update login_throttle_accounts set attempts = attempts + 1 where email = $1",
            email.as_str(),
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "update login_throttle_clients set attempts = attempts + 1 where email = $1 and client = $2",
            email.as_str(),
            client,
        )
        .execute(&mut *tx)
        .await?;
        Throttle::Allowed
    };
    tx.commit().await?;
    Ok(throttle)
}

/// After a successful login of `email` from `client`: forgets that client's attempts, and takes the successful
/// attempt back from the account's count. Two statements of one row each, so neither waits for a lock while holding
/// another.
pub async fn succeeded(db: &PgPool, email: &Email, client: &str) -> sqlx::Result<()> {
    sqlx::query!(
        "delete from login_throttle_clients where email = $1 and client = $2",
        email.as_str(),
        client,
    )
    .execute(db)
    .await?;
    sqlx::query!(
        "update login_throttle_accounts set attempts = greatest(attempts - 1, 0) where email = $1",
        email.as_str(),
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Deletes up to `batch` rows whose window ended from each of the throttle's tables (and from `login_attempts`,
/// which the previous release counted in): they no longer throttle anything. Returns how many went.
pub async fn purge_ended(
    executor: impl PgExecutor<'_> + Copy,
    window: Duration,
    batch: i64,
) -> sqlx::Result<u64> {
    let window_ms = millis(window);
    let accounts = sqlx::query!(
        r#"
        delete from login_throttle_accounts where email in (
            select email from login_throttle_accounts
            where window_start <= now() - make_interval(secs => $1::bigint / 1000.0)
            limit $2 for update skip locked
        )
        "#,
        window_ms,
        batch,
    )
    .execute(executor)
    .await?;
    let clients = sqlx::query!(
        r#"
        delete from login_throttle_clients where (email, client) in (
            select email, client from login_throttle_clients
            where window_start <= now() - make_interval(secs => $1::bigint / 1000.0)
            limit $2 for update skip locked
        )
        "#,
        window_ms,
        batch,
    )
    .execute(executor)
    .await?;
    let previous = sqlx::query!(
        r#"
        delete from login_attempts where email in (
            select email from login_attempts
            where window_start <= now() - make_interval(secs => $1::bigint / 1000.0)
            limit $2 for update skip locked
        )
        "#,
        window_ms,
        batch,
    )
    .execute(executor)
    .await?;
    Ok(accounts.rows_affected() + clients.rows_affected() + previous.rows_affected())
}
