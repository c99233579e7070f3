//! Refresh tokens and the sessions (families) they belong to. Only SHA-256 hashes of tokens are stored.
//!
//! Rotation is one conditional update: the presented token is marked used only if it is still unused and
//! unrevoked, so of several concurrent refreshes with one token exactly one wins. A token that is known but
//! already used is a reuse (a stolen copy or a replay): the caller revokes its whole family.
//!
//! A refresh and a revocation of the same session (logout, reuse) take one lock first: a transaction-level advisory
//! lock named after the session. Without it a revocation, one statement, could start before a refresh inserts the
//! next token, wait for the row the refresh holds, then revoke every token it saw and miss the new one, which went
//! on refreshing: a logout answered 204 and the session lived on. Under the lock, a revocation's update starts after
//! the refresh has committed (it sees the new token), or the refresh's update starts after the revocation has
//! committed (it finds its token revoked). An advisory lock and not a row: sessions have no row of their own, and a
//! token row can be purged while another transaction waits for it; no table, no migration.

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

/// The class of the advisory locks on sessions (`pg_advisory_xact_lock(class, key)`). The two-key form has a key
/// space of its own, apart from the single `bigint` keys other locks of this database use.
const SESSION_LOCK_CLASS: i32 = 0x5e55_1011;

/// Locks the session `family_id` until the transaction ends: see the module's note. Two sessions may share a lock
/// (its key is 32 bits of the id); that only makes one wait for the other.
async fn lock_session(conn: &mut PgConnection, family_id: Uuid) -> sqlx::Result<()> {
    let bytes = family_id.as_bytes();
    // The last bytes of both UUID versions in use (v4, v7) are random.
    let key = i32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    sqlx::query!(
        r#"select true as "locked!" from pg_advisory_xact_lock($1, $2)"#,
        SESSION_LOCK_CLASS,
        key,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(())
}

/// Marks a token used if it is live, and tells what it was. Run it in the transaction that stores the next
/// token, so that a failure in between leaves the session as it was; it locks the token's session until that
/// transaction ends, so a revocation waits for the next token and revokes it too.
pub async fn redeem_refresh_token(
    conn: &mut PgConnection,
    token_hash: &[u8],
) -> sqlx::Result<Redeemed> {
    let family_id = sqlx::query_scalar!(
        "select family_id from refresh_tokens where token_hash = $1",
        token_hash,
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(family_id) = family_id else {
        return Ok(Redeemed::Dead);
    };
    lock_session(conn, family_id).await?;
    // A statement after the lock: it sees whatever a revocation that held the lock before committed.
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

/// Revokes every token of a session, its next one included if a refresh is issuing it right now (it locks the
/// session first). Run it in a transaction: the lock lasts until that transaction ends.
pub async fn revoke_family(conn: &mut PgConnection, family_id: Uuid) -> sqlx::Result<()> {
    lock_session(conn, family_id).await?;
    sqlx::query!(
        "update refresh_tokens set revoked_at = now() where family_id = $1 and revoked_at is null",
        family_id,
    )
    .execute(&mut *conn)
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

/// What a logout found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoggedOut {
    /// The token's session is revoked now (or was already).
    Revoked,
    /// No token has this hash: its row was purged (its session was revoked, or it expired), or it was never
    /// stored.
    Unknown,
    /// The token belongs to another user: nothing was revoked.
    NotTheirs,
}

/// Revokes the session a token of `user_id` belongs to (logout), as [`revoke_family`] does. Run it in a
/// transaction: the session's lock lasts until that transaction ends.
pub async fn revoke_session_of(
    conn: &mut PgConnection,
    token_hash: &[u8],
    user_id: UserId,
) -> sqlx::Result<LoggedOut> {
    let token = sqlx::query!(
        r#"select family_id, user_id as "user_id: UserId" from refresh_tokens where token_hash = $1"#,
        token_hash,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match token {
        None => LoggedOut::Unknown,
        Some(token) if token.user_id != user_id => LoggedOut::NotTheirs,
        Some(token) => {
            revoke_family(conn, token.family_id).await?;
            LoggedOut::Revoked
        }
    })
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
