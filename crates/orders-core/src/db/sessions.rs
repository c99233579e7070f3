//! Refresh tokens and the sessions (families) they belong to. Only SHA-256 hashes of tokens are stored.
//!
//! Rotation is one conditional update: the presented token is marked used only if it is still unused and
//! unrevoked, so of several concurrent refreshes with one token exactly one wins. A token that is known but
//! already used is a reuse (a stolen copy or a replay): the caller revokes its whole family.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::domain::UserId;

/// A refresh token about to be stored.
#[derive(Debug, Clone)]
pub struct NewRefreshToken<'a> {
    /// The token's `jti`.
    pub id: Uuid,
    /// The session it belongs to.
    pub family_id: Uuid,
    /// Its owner.
    pub user_id: UserId,
    /// SHA-256 of the token.
    pub token_hash: &'a [u8],
    /// When it stops being accepted (never after its session ends).
    pub expires_at: DateTime<Utc>,
    /// When its session ends, whatever happens: `SESSION_MAX_DAYS` after the login.
    pub session_expires_at: DateTime<Utc>,
}

/// Stores a newly issued refresh token.
pub async fn insert_refresh_token(
    executor: impl PgExecutor<'_>,
    token: &NewRefreshToken<'_>,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"
        insert into refresh_tokens (id, family_id, user_id, token_hash, expires_at, session_expires_at)
        values ($1, $2, $3, $4, $5, $6)
        "#,
        token.id,
        token.family_id,
        token.user_id as UserId,
        token.token_hash,
        token.expires_at,
        token.session_expires_at,
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// What presenting a refresh token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redeemed {
    /// The token was live and is now used up; issue the next one in this family.
    Live {
        /// The session.
        family_id: Uuid,
        /// Its owner.
        user_id: UserId,
        /// When the session ends: the next token expires no later.
        session_expires_at: DateTime<Utc>,
    },
    /// The token was already used: someone replays it. Revoke the family.
    Reused {
        /// The session to revoke.
        family_id: Uuid,
    },
    /// Unknown, expired (its own expiry or its session's) or revoked.
    Dead,
}

/// Marks a token used if it is live, and tells what it was. Run it in the transaction that stores the next
/// token, so that a failure in between leaves the session as it was.
pub async fn redeem_refresh_token(
    conn: &mut PgConnection,
    token_hash: &[u8],
) -> sqlx::Result<Redeemed> {
    let live = sqlx::query!(
        r#"
        update refresh_tokens set used_at = now()
        where token_hash = $1 and used_at is null and revoked_at is null and expires_at > now()
        returning family_id, user_id as "user_id: UserId", session_expires_at
        "#,
        token_hash,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = live {
        return Ok(Redeemed::Live {
            family_id: row.family_id,
            user_id: row.user_id,
            session_expires_at: row.session_expires_at,
        });
    }
    let known = sqlx::query!(
        r#"select family_id, used_at is not null as "used!" from refresh_tokens where token_hash = $1"#,
        token_hash,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match known {
        Some(row) if row.used => Redeemed::Reused {
            family_id: row.family_id,
        },
        _ => Redeemed::Dead,
    })
}

/// Revokes every token of a session.
pub async fn revoke_family(executor: impl PgExecutor<'_>, family_id: Uuid) -> sqlx::Result<()> {
    sqlx::query!(
        "update refresh_tokens set revoked_at = now() where family_id = $1 and revoked_at is null",
        family_id,
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Of `sessions`, those that have ended: no token of theirs can be redeemed any more (logged out, revoked on a
/// reuse, or expired; a purged session has no token left at all). Sorted.
pub async fn ended_sessions(
    executor: impl PgExecutor<'_>,
    sessions: &[Uuid],
) -> sqlx::Result<Vec<Uuid>> {
    let mut ended = sqlx::query_scalar!(
        r#"
        select s as "session!" from unnest($1::uuid[]) as s
        where not exists (
            select 1 from refresh_tokens t
            where t.family_id = s and t.revoked_at is null and t.used_at is null and t.expires_at > now()
        )
        "#,
        sessions,
    )
    .fetch_all(executor)
    .await?;
    ended.sort_unstable();
    Ok(ended)
}

/// Revokes the session a token of `user_id` belongs to (logout). Returns false if no such token exists.
pub async fn revoke_session_of(
    executor: impl PgExecutor<'_>,
    token_hash: &[u8],
    user_id: UserId,
) -> sqlx::Result<bool> {
    let found = sqlx::query_scalar!(
        r#"
        with session as (
            select family_id from refresh_tokens where token_hash = $1 and user_id = $2
        ), revoked as (
            update refresh_tokens set revoked_at = now()
            where family_id = (select family_id from session) and revoked_at is null
        )
        select exists (select 1 from session) as "found!"
        "#,
        token_hash,
        user_id as UserId,
    )
    .fetch_one(executor)
    .await?;
    Ok(found)
}

/// Deletes up to `batch` expired tokens and up to `batch` revoked ones, and returns how many went. Neither kind
/// can ever be accepted again, and a revoked or expired token presented later is refused the same way whether its
/// row exists or not. Concurrent purges (one per api process) skip each other's rows.
pub async fn purge_dead_tokens(executor: impl PgExecutor<'_>, batch: i64) -> sqlx::Result<u64> {
    let deleted = sqlx::query!(
        r#"
        with expired as (
            select id from refresh_tokens where expires_at < now()
            order by expires_at limit $1 for update skip locked
        ), revoked as (
            select id from refresh_tokens where revoked_at is not null
            order by revoked_at limit $1 for update skip locked
        )
        delete from refresh_tokens
        where id in (select id from expired union select id from revoked)
        "#,
        batch,
    )
    .execute(executor)
    .await?;
    Ok(deleted.rows_affected())
}
