//! Who may use the admin API. [`AdminUser`] lets in viewers and operators, [`Operator`] operators only. The role
//! is read from the database on every admin request, so a promotion or a demotion takes effect at once, whatever
//! the token says.
//!
//! The caller authenticates with a Bearer access token, as everywhere, or with the console's cookie
//! [`CONSOLE_COOKIE`] holding the same kind of access token (set HttpOnly and SameSite=Strict by the console's
//! login). A browser sends that cookie by itself, so a request it authenticates that changes something must also
//! prove it comes from the console's own page: the header [`CSRF_HEADER`] must equal the cookie [`CSRF_COOKIE`]
//! (double submit: another site can make the browser send the cookie, but can neither read it nor set the
//! header). Bearer requests carry no ambient authority and need no such token.

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, Method, request::Parts},
};
use std::time::Duration;

use orders_core::{
    db::admin::{self as db, Member},
    domain::UserId,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    auth::{bearer_token, cookie},
    error::ApiError,
    state::AppState,
};

/// The cookie holding the console's access token.
pub const CONSOLE_COOKIE: &str = "console_token";
/// The cookie holding the console's CSRF token.
pub const CSRF_COOKIE: &str = "console_csrf";
/// The header that must repeat [`CSRF_COOKIE`] on every request authenticated by [`CONSOLE_COOKIE`] that is not a
/// read.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The answer to a customer (or a demoted user) on an admin route.
const NOT_ADMIN: &str = "The admin API needs the viewer or operator role";
/// The answer to a viewer on an action.
const NOT_OPERATOR: &str = "This action needs the operator role";
/// The answer to a cookie-authenticated change without the right CSRF token.
const BAD_CSRF: &str = "Missing or wrong X-CSRF-Token: send the value of the console_csrf cookie";
/// The answer to a valid token whose user no longer exists.
const USER_GONE: &str = "User no longer exists";

/// A viewer or an operator, with their role as the database has it now.
#[derive(Debug, Clone)]
pub struct AdminUser {
    /// Who, and their role.
    pub member: Member,
    /// Their token's expiry (seconds since the epoch): a stream opened with it ends then.
    pub expires_at: i64,
    /// Their token's session, if it names one: a stream opened with it ends with it.
    pub session: Option<Uuid>,
}

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let (token, by_cookie) = match bearer_token(&parts.headers) {
            Some(token) => (token, false),
            None => (
                cookie(&parts.headers, CONSOLE_COOKIE)
                    .ok_or(ApiError::Unauthorized("Not authenticated"))?,
                true,
            ),
        };
        let grant = state
            .jwt
            .verify_access(token)
            .map_err(|_| ApiError::Unauthorized("Invalid or expired token"))?;
        if by_cookie && !is_read(&parts.method) && !csrf_token_matches(&parts.headers) {
            return Err(ApiError::Forbidden(BAD_CSRF));
        }
        let member = db::find_member(&state.db, grant.user)
            .await?
            .ok_or(ApiError::Unauthorized(USER_GONE))?;
        if !member.role.can_read_admin() {
            return Err(ApiError::Forbidden(NOT_ADMIN));
        }
        Ok(Self {
            member,
            expires_at: grant.expires_at,
            session: grant.session,
        })
    }
}

/// Resolves once `reader` no longer has an admin role, checked every `every` (or once the database does not answer:
/// the client reconnects and is checked then): what ends their streams of orders.
pub(crate) async fn role_lost(db: PgPool, reader: UserId, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match db::find_member(&db, reader).await {
            Ok(Some(member)) if member.role.can_read_admin() => {}
            _ => return,
        }
    }
}

/// An operator: an [`AdminUser`] who may act.
#[derive(Debug, Clone)]
pub struct Operator(pub AdminUser);

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let admin = AdminUser::from_request_parts(parts, state).await?;
        if !admin.member.role.can_act() {
            return Err(ApiError::Forbidden(NOT_OPERATOR));
        }
        Ok(Self(admin))
    }
}

/// Methods that change nothing.
fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether the CSRF header equals the CSRF cookie (both present and not empty), compared in constant time.
pub(crate) fn csrf_token_matches(headers: &HeaderMap) -> bool {
    let Some(expected) = cookie(headers, CSRF_COOKIE) else {
        return false;
    };
    let mut sent = headers.get_all(CSRF_HEADER).iter();
    match (sent.next(), sent.next()) {
        (Some(value), None) => same_secret(value.as_bytes(), expected.as_bytes()),
        _ => false,
    }
}

/// Compares two secrets without stopping at the first difference, so that the time taken tells nothing of how
/// much of a guess was right (only whether its length was).
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, header};

    use super::{csrf_token_matches, same_secret};

    fn headers(cookie: Option<&str>, sent: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(cookie) = cookie {
            headers.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        }
        for value in sent {
            headers.append("x-csrf-token", HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn the_csrf_header_must_repeat_the_cookie_exactly_once() {
        assert!(csrf_token_matches(&headers(
            Some("console_csrf=abc123"),
            &["abc123"]
        )));
        assert!(csrf_token_matches(&headers(
            Some("console_token=t; console_csrf=abc123"),
            &["abc123"]
        )));
        assert!(!csrf_token_matches(&headers(
            Some("console_csrf=abc123"),
            &["abc124"]
        )));
        assert!(!csrf_token_matches(&headers(
            Some("console_csrf=abc123"),
            &[]
        )));
        assert!(!csrf_token_matches(&headers(None, &["abc123"])));
        assert!(!csrf_token_matches(&headers(Some("console_csrf="), &[""])));
        assert!(!csrf_token_matches(&headers(
            Some("console_csrf=abc123"),
            &["abc123", "abc123"]
        )));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
