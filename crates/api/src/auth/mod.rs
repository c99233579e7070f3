//! Authentication: tokens, passwords and the [`AuthUser`] extractor that guards the order routes.

pub mod jwt;
pub mod password;

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, HeaderValue, header, request::Parts},
};
use orders_core::domain::UserId;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use self::jwt::Grant;
use crate::{error::ApiError, state::AppState};

/// The user whose valid access token came with the request.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser {
    /// Who is calling.
    pub user_id: UserId,
    /// The session the token was issued in, if it names one.
    pub session: Option<Uuid>,
    /// When the token expires (seconds since the epoch).
    pub expires_at: i64,
}

impl From<Grant> for AuthUser {
    fn from(grant: Grant) -> Self {
        Self {
            user_id: grant.user,
            session: grant.session,
            expires_at: grant.expires_at,
        }
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token =
            bearer_token(&parts.headers).ok_or(ApiError::Unauthorized("Not authenticated"))?;
        let grant = state
            .jwt
            .verify_access(token)
            .map_err(|_| ApiError::Unauthorized("Invalid or expired token"))?;
        Ok(grant.into())
    }
}

/// The caller of an event route: an access token as `Authorization: Bearer`, or, for a browser's `EventSource`
/// (which cannot send that header), the event-stream token of the `order_events` cookie. No other route reads
/// that cookie: it grants reading one's own order events and nothing else.
#[derive(Debug, Clone, Copy)]
pub struct StreamUser(pub AuthUser);

impl FromRequestParts<AppState> for StreamUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if bearer_token(&parts.headers).is_some() {
            return AuthUser::from_request_parts(parts, state).await.map(Self);
        }
        let token = cookie(&parts.headers, EVENTS_COOKIE)
            .ok_or(ApiError::Unauthorized("Not authenticated"))?;
        let grant = state
            .jwt
            .verify_events(token)
            .map_err(|_| ApiError::Unauthorized("Invalid or expired token"))?;
        Ok(Self(grant.into()))
    }
}

/// The event-stream token cookie's name.
pub const EVENTS_COOKIE: &str = "order_events";

/// `Set-Cookie` for an event-stream token: HttpOnly (no script reads it), SameSite=Strict (no other site's page
/// sends it), Secure (browsers treat `localhost` as secure, so it works there over plain HTTP too), sent only to
/// `/orders` paths, where only the event routes read it.
pub fn events_cookie(token: &str, max_age_secs: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{EVENTS_COOKIE}={token}; HttpOnly; Secure; SameSite=Strict; Path=/orders; Max-Age={max_age_secs}"
    ))
    .unwrap_or_else(|_| clear_events_cookie())
}

/// `Set-Cookie` that removes the event-stream token cookie.
pub fn clear_events_cookie() -> HeaderValue {
    HeaderValue::from_static(
        "order_events=; HttpOnly; Secure; SameSite=Strict; Path=/orders; Max-Age=0",
    )
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// What is stored of a refresh token: its SHA-256. The token has 256 bits of signature entropy, so a fast
/// hash is enough (no salt or key stretching needed).
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The refresh token cookie's name.
pub const REFRESH_COOKIE: &str = "refresh_token";

/// `Set-Cookie` for a refresh token, readable only by the server and only on `/auth` paths.
pub fn refresh_cookie(token: &str, max_age_secs: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{REFRESH_COOKIE}={token}; HttpOnly; Secure; SameSite=Strict; Path=/auth; Max-Age={max_age_secs}"
    ))
    .unwrap_or_else(|_| clear_refresh_cookie())
}

/// `Set-Cookie` that removes the refresh token cookie.
pub fn clear_refresh_cookie() -> HeaderValue {
    HeaderValue::from_static(
        "refresh_token=; HttpOnly; Secure; SameSite=Strict; Path=/auth; Max-Age=0",
    )
}

/// The refresh token cookie sent with the request, if any.
pub fn refresh_token_from_cookie(headers: &HeaderMap) -> Option<String> {
    cookie(headers, REFRESH_COOKIE).map(str::to_owned)
}

/// The value of the cookie `name` sent with the request, if any and not empty.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(cookie, value)| *cookie == name && !value.is_empty())
        .map(|(_, value)| value)
}
