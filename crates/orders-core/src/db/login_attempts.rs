//! The login throttle per account: attempts per email in a fixed window, shared by every api process through
//! PostgreSQL. The count is taken before the password is checked, in one atomic upsert, so concurrent guesses
//! cannot slip past it; a successful login deletes the row. Unknown emails are counted like known ones, so the
//! throttle tells nothing about which accounts exist.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::domain::Email;

/// What the throttle decided for one login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Go on and check the password.
    Allowed,
    /// Too many attempts in this window: refuse without checking, until `until`.
    Blocked {
        /// When the window ends.
        until: DateTime<Utc>,
    },
}

/// Counts one login attempt for `email` and decides: at most `max_attempts` per `window`, after which every
/// attempt is refused until the window ends. A window starts with the first attempt after the previous one
/// ended.
pub async fn count_attempt(
    executor: impl PgExecutor<'_>,
    email: &Email,
    max_attempts: u32,
    window: Duration,
) -> sqlx::Result<Throttle> {
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let row = sqlx::query!(
        r#"
        insert into login_attempts as a (email, attempts, window_start)
        values ($1, 1, now())
        on conflict (email) do update set
            attempts = case when a.window_start <= now() - make_interval(secs => $2::bigint / 1000.0)
                            then 1 else a.attempts + 1 end,
            window_start = case when a.window_start <= now() - make_interval(secs => $2::bigint / 1000.0)
                                then now() else a.window_start end
        returning attempts as "attempts!",
                  window_start + make_interval(secs => $2::bigint / 1000.0) as "until!"
        "#,
        email.as_str(),
        window_ms,
    )
    .fetch_one(executor)
    .await?;
    Ok(if i64::from(row.attempts) > i64::from(max_attempts) {
        Throttle::Blocked { until: row.until }
    } else {
        Throttle::Allowed
    })
}

/// Forgets the attempts of `email` (after a successful login).
pub async fn reset(executor: impl PgExecutor<'_>, email: &Email) -> sqlx::Result<()> {
    sqlx::query!(
        "delete from login_attempts where email = $1",
        email.as_str()
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Deletes up to `batch` rows whose window ended: they no longer throttle anything.
pub async fn purge_ended(
    executor: impl PgExecutor<'_>,
    window: Duration,
    batch: i64,
) -> sqlx::Result<u64> {
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let deleted = sqlx::query!(
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
    Ok(deleted.rows_affected())
}
