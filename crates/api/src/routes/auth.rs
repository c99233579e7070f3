//! Accounts and sessions: register, login, refresh (rotation with reuse detection), logout, me.

use axum::{
    Json as JsonResponse,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use orders_core::{
    db::{
        login_attempts::{self, Limits, Throttle},
        sessions::{self, LoggedOut, NewRefreshToken, Redeemed},
        users::{self, InsertUserError},
    },
    domain::{Email, Invalid, User, UserId, UserName},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    auth::{
        AuthUser, clear_refresh_cookie,
        jwt::{JwtKeys, TokenKind},
        refresh_cookie, refresh_token_from_cookie, token_hash,
    },
    config::RateLimits,
    error::{ApiError, ApiResult, ErrorBody, ValidationErrorBody},
    extract::{Fields, FromFields, Json, OptionalJson},
    rate_limit::{ClientKey, RouteLimits},
    state::AppState,
};

/// Routes of this module, each with its own rate limit, in the order people use them: the OpenAPI document and
/// Swagger UI list them so.
pub fn router(limits: &RateLimits, per_route: &RouteLimits) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(per_route.apply(
            OpenApiRouter::new().routes(routes!(register)),
            "register",
            limits.rate_limit_register_per_minute,
        ))
        .merge(per_route.apply(
            OpenApiRouter::new().routes(routes!(login)).layer(
                axum::middleware::from_fn_with_state(per_route.key, identify_client),
            ),
            "login",
            limits.rate_limit_login_per_minute,
        ))
        .routes(routes!(me))
        .merge(per_route.apply(
            OpenApiRouter::new().routes(routes!(refresh)),
            "refresh",
            limits.rate_limit_refresh_per_minute,
        ))
        .routes(routes!(logout))
}

/// A new account.
#[derive(Debug, ToSchema)]
pub struct RegisterRequest {
    /// 1–100 characters after trimming the whitespace around it; no control characters (U+0000–U+001F,
    /// U+007F–U+009F) inside.
    // The pattern is exactly what `UserName::parse` accepts: whitespace as `str::trim` sees it (Unicode
    // White_Space), then 1–100 characters, none a control character, the first and the last not whitespace, then
    // whitespace. No maxLength: the whitespace around the name does not count.
    #[schema(
        example = "Grace Hopper",
        min_length = 1,
        pattern = r"^[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000](?:[^\u0000-\u001F\u007F-\u009F]{0,98}[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000])?[\t\n\u000B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$"
    )]
    #[schema(value_type = String)]
    name: UserName,
    /// A valid address, at most 254 characters; compared case-insensitively.
    #[schema(value_type = String, example = "grace@example.com", format = Email, max_length = 254)]
    email: Email,
    /// 8–128 characters.
    #[schema(value_type = String, format = Password, example = "correct horse battery staple", min_length = 8, max_length = 128)]
    password: SecretString,
}

impl FromFields for RegisterRequest {
    fn from_fields(fields: &mut Fields) -> Option<Self> {
        let name = fields
            .take::<String>("name")
            .and_then(|name| fields.check("name", UserName::parse(&name)));
        let email = fields
            .take::<String>("email")
            .and_then(|email| fields.check("email", Email::parse(&email)));
        let password = fields
            .take::<SecretString>("password")
            .and_then(|password| {
                let checked = check_password(&password).map(|()| password);
                fields.check("password", checked)
            });
        Some(Self {
            name: name?,
            email: email?,
            password: password?,
        })
    }
}

/// A user, as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserResponse {
    /// The user's id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Lower-cased e-mail address.
    pub email: String,
    /// When the account was created.
    pub created_at: DateTime<Utc>,
}

impl From<User> for UserResponse {
    fn from(user: User) -> Self {
        Self {
            id: user.id.0,
            name: user.name,
            email: user.email,
            created_at: user.created_at,
        }
    }
}

fn check_password(password: &SecretString) -> Result<(), Invalid> {
    let len = password.expose_secret().chars().count();
    if len < 8 {
        Err(Invalid {
            kind: "string_too_short",
            message: "String should have at least 8 characters".into(),
        })
    } else if len > 128 {
        Err(Invalid {
            kind: "string_too_long",
            message: "String should have at most 128 characters".into(),
        })
    } else {
        Ok(())
    }
}

/// Creates an account.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterRequest, responses(
    (status = 201, body = UserResponse, description = "Account created"),
    (status = 409, body = ErrorBody, description = "Email already registered", example = json!({"detail": "Email already registered"})),
    (status = 413, body = ErrorBody, description = "Request body larger than 64 KiB"), (status = 415, body = ErrorBody, description = "Content-Type is not application/json"),
    (status = 422, body = ValidationErrorBody, description = "Invalid input: one entry per problem", example = json!({"detail": [{"loc": ["body", "email"], "msg": "value is not a valid email address", "type": "value_error"}, {"loc": ["body", "password"], "msg": "String should have at least 8 characters", "type": "string_too_short"}]})),
    (status = 429, body = ErrorBody, description = "Rate limit exceeded (5/min)", headers(("Retry-After" = u64))),
    (status = 503, body = ErrorBody, description = "PostgreSQL or Redis unavailable"),
))]
async fn register(
    State(state): State<AppState>,
    Json(body): Json<RegisterRequest>,
) -> ApiResult<Response> {
    let hash = state.passwords.hash(body.password).await?;
    let user = users::insert_user(&state.db, &body.name, &body.email, &hash)
        .await
        .map_err(|err| match err {
            InsertUserError::EmailTaken => ApiError::Conflict("Email already registered"),
            InsertUserError::Database(err) => err.into(),
        })?;
    tracing::info!(user_id = %user.id, "user registered");
    Ok((StatusCode::CREATED, JsonResponse(UserResponse::from(user))).into_response())
}

/// Credentials.
#[derive(Debug, ToSchema)]
pub struct LoginRequest {
    #[schema(value_type = String, example = "grace@example.com", format = Email, max_length = 254)]
    email: Email,
    #[schema(value_type = String, format = Password, example = "correct horse battery staple")]
    password: SecretString,
}

impl FromFields for LoginRequest {
    fn from_fields(fields: &mut Fields) -> Option<Self> {
        let email = fields
            .take::<String>("email")
            .and_then(|email| fields.check("email", Email::parse(&email)));
        let password = fields.take::<SecretString>("password");
        Some(Self {
            email: email?,
            password: password?,
        })
    }
}

/// A token pair.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// Send as `Authorization: Bearer <access_token>`.
    pub access_token: String,
    /// Exchange at `/auth/refresh` for a new pair; also set as an HttpOnly cookie.
    pub refresh_token: String,
    /// Always `bearer`.
    #[schema(example = "bearer")]
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    #[schema(example = 900)]
    pub expires_in: u64,
}

/// A session's tokens: what the client gets, and until when its refresh token is accepted.
pub(crate) struct IssuedPair {
    /// The pair, as `/auth/login` and `/auth/refresh` answer it.
    pub(crate) body: TokenResponse,
    /// When the refresh token expires: a cookie holding it lives as long.
    pub(crate) refresh_expires_at: DateTime<Utc>,
}

/// Issues an access token and the next refresh token of `family_id`, storing the latter's hash. Neither
/// outlives the session (`session_expires_at`).
async fn issue_tokens(
    conn: &mut PgConnection,
    jwt: &JwtKeys,
    user_id: UserId,
    family_id: Uuid,
    session_expires_at: DateTime<Utc>,
) -> ApiResult<IssuedPair> {
    let session_end = Some(session_expires_at);
    let session = Some(family_id);
    let access = jwt.issue_until(
        user_id,
        TokenKind::Access,
        Uuid::new_v4(),
        session,
        session_end,
    )?;
    let refresh = jwt.issue_until(
        user_id,
        TokenKind::Refresh,
        Uuid::now_v7(),
        session,
        session_end,
    )?;
    let hash = token_hash(&refresh.token);
    sessions::insert_refresh_token(
        conn,
        &NewRefreshToken {
            id: refresh.jti,
            family_id,
            user_id,
            token_hash: &hash,
            expires_at: refresh.expires_at,
            session_expires_at,
        },
    )
    .await?;
    let session_left = (session_expires_at - Utc::now())
        .to_std()
        .unwrap_or_default();
    Ok(IssuedPair {
        body: TokenResponse {
            access_token: access.token,
            refresh_token: refresh.token,
            token_type: "bearer",
            expires_in: jwt.access_ttl().min(session_left).as_secs(),
        },
        refresh_expires_at: refresh.expires_at,
    })
}

/// The token pair as a response, with the refresh token also in its cookie (which lives as long as the token).
fn tokens_response(pair: IssuedPair) -> Response {
    let tokens = pair.body;
    let max_age = (pair.refresh_expires_at - Utc::now()).num_seconds().max(0);
    let cookie = refresh_cookie(&tokens.refresh_token, u64::try_from(max_age).unwrap_or(0));
    let mut response = (StatusCode::OK, JsonResponse(tokens)).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

const INVALID_CREDENTIALS: &str = "Invalid credentials";

/// The login throttle's window: at most `LOGIN_MAX_FAILURES` attempts per account and client in it.
pub const LOGIN_THROTTLE_WINDOW: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// An account's attempts over all clients in a window, as a multiple of `LOGIN_MAX_FAILURES`, past which only
/// clients new to the account get their password checked (100 by default).
pub const LOGIN_ACCOUNT_BUDGET_FACTOR: u32 = 10;

/// The client a login counts against in the throttle: the address the rate limits key it by (see [`ClientKey`]).
#[derive(Debug, Clone)]
pub(crate) struct LoginClient(pub(crate) String);

/// Names the client of a request for the login throttle, as the rate limits name it. Every route that checks a
/// password (`/auth/login`, the console's login form) runs behind it.
pub(crate) async fn identify_client(
    State(key): State<ClientKey>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // Without a peer address (never the case when served), every such request shares one name.
    let client = key
        .client(&request)
        .map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    request.extensions_mut().insert(LoginClient(client));
    next.run(request).await
}

/// Logs in: a token pair in the body and the refresh token in an HttpOnly cookie (starts a new session).
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest, responses(
    (status = 200, body = TokenResponse, description = "A token pair; the refresh token is also set as an HttpOnly cookie", headers(("Set-Cookie" = String, description = "refresh_token=...; HttpOnly; Secure; SameSite=Strict; Path=/auth"))),
    (status = 401, body = ErrorBody, description = "Invalid credentials (unknown email and wrong password alike)", example = json!({"detail": "Invalid credentials"})),
    (status = 413, body = ErrorBody, description = "Request body larger than 64 KiB"), (status = 415, body = ErrorBody, description = "Content-Type is not application/json"),
    (status = 422, body = ValidationErrorBody, description = "Invalid input: one entry per problem", example = json!({"detail": [{"loc": ["body", "password"], "msg": "Field required", "type": "missing"}]})),
    (status = 429, body = ErrorBody, description = "Rate limit exceeded (5/min per client), or too many attempts for this account from this client (10 per 15 min, whether or not the account exists; a successful login resets the count), or, once the account has had 100 attempts in 15 min, any attempt from a client that has already tried it", headers(("Retry-After" = u64))),
    (status = 503, body = ErrorBody, description = "PostgreSQL or Redis unavailable"),
))]
async fn login(
    State(state): State<AppState>,
    axum::Extension(LoginClient(client)): axum::Extension<LoginClient>,
    Json(body): Json<LoginRequest>,
) -> ApiResult<Response> {
    let user_id = authenticate(&state, &client, &body.email, body.password).await?;
    let tokens = start_session(&state, user_id).await?;
    tracing::info!(%user_id, "user logged in");
    Ok(tokens_response(tokens))
}

/// Checks an email and password, as every login does (`/auth/login` and the console's form): the attempt counts
/// in the login throttle of (`email`, `client`) first, then the password is checked. Returns the user, or `401`
/// (unknown email and wrong password alike) or `429` (throttled).
pub(crate) async fn authenticate(
    state: &AppState,
    client: &str,
    email: &Email,
    password: SecretString,
) -> ApiResult<UserId> {
    // Counted before the password is checked, known email or not: parallel guesses cannot slip past the limits,
    // a refused attempt costs no hash, and the answer tells nothing about which accounts exist.
    let limits = Limits {
        per_client: state.login_max_failures,
        per_account: state
            .login_max_failures
            .saturating_mul(LOGIN_ACCOUNT_BUDGET_FACTOR),
        window: LOGIN_THROTTLE_WINDOW,
    };
    let throttle = login_attempts::count_attempt(&state.db, email, client, limits).await?;
    if let Throttle::Blocked { until } = throttle {
        tracing::warn!("login throttled: too many attempts for one account");
        metrics::counter!("logins_throttled_total").increment(1);
        let wait = (until - Utc::now()).num_seconds().max(1);
        return Err(ApiError::TooManyRequests {
            retry_after_secs: u64::try_from(wait).unwrap_or(1),
        });
    }
    let credentials = users::find_credentials(&state.db, email).await?;
    let user_id = credentials.as_ref().map(|c| c.user_id);
    let stored_hash = credentials.map(|c| c.password_hash);
    let valid = state.passwords.verify(password, stored_hash).await?;
    let Some(user_id) = user_id.filter(|_| valid) else {
        return Err(ApiError::Unauthorized(INVALID_CREDENTIALS));
    };
    login_attempts::succeeded(&state.db, email, client).await?;
    Ok(user_id)
}

/// Starts a new session (refresh token family) for `user_id`, ending at the latest `SESSION_MAX_DAYS` from now:
/// its first token pair.
pub(crate) async fn start_session(state: &AppState, user_id: UserId) -> ApiResult<IssuedPair> {
    let mut conn = state.db.acquire().await?;
    let session_end = Utc::now() + state.session_max;
    issue_tokens(&mut conn, &state.jwt, user_id, Uuid::now_v7(), session_end).await
}

/// A refresh token, in the body or (with an empty body) in the `refresh_token` cookie.
#[derive(Debug, ToSchema)]
pub struct RefreshRequest {
    /// The refresh token from login or the last refresh.
    refresh_token: String,
}

impl FromFields for RefreshRequest {
    fn from_fields(fields: &mut Fields) -> Option<Self> {
        Some(Self {
            refresh_token: fields.take("refresh_token")?,
        })
    }
}

fn presented_refresh_token(headers: &HeaderMap, body: Option<RefreshRequest>) -> ApiResult<String> {
    body.map(|b| b.refresh_token)
        .or_else(|| refresh_token_from_cookie(headers))
        .ok_or(ApiError::Unauthorized("Missing refresh token"))
}

const INVALID_REFRESH: &str = "Invalid or expired refresh token";

/// Exchanges a refresh token for a new pair. The presented token dies; presenting it again revokes the whole
/// session (reuse detection).
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body(content = Option<RefreshRequest>, description = "Or an empty body with the `refresh_token` cookie"), responses(
    (status = 200, body = TokenResponse, description = "A new pair; the refresh token is new too"),
    (status = 401, body = ErrorBody, description = "Invalid, expired, revoked or reused refresh token, a session past SESSION_MAX_DAYS, or an access token", example = json!({"detail": "Invalid or expired refresh token"})),
    (status = 413, body = ErrorBody, description = "Request body larger than 64 KiB"), (status = 415, body = ErrorBody, description = "Content-Type is not application/json"),
    (status = 422, body = ValidationErrorBody, description = "Invalid input: one entry per problem", example = json!({"detail": [{"loc": ["body", "refresh_token"], "msg": "Input should be a valid string", "type": "string_type"}]})),
    (status = 429, body = ErrorBody, description = "Rate limit exceeded (10/min)", headers(("Retry-After" = u64))),
    (status = 503, body = ErrorBody, description = "PostgreSQL or Redis unavailable"),
))]
async fn refresh(
    State(state): State<AppState>,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<RefreshRequest>,
) -> ApiResult<Response> {
    let token = presented_refresh_token(&headers, body)?;
    rotate_session(&state, &token).await.map(tokens_response)
}

/// Exchanges a refresh token for the next pair of its session (`/auth/refresh`, the console's refresh): the
/// presented token dies; presenting it again revokes the whole session (reuse detection). `401` for a token that
/// is invalid, expired, revoked or reused.
pub(crate) async fn rotate_session(state: &AppState, token: &str) -> ApiResult<IssuedPair> {
    let claims = state
        .jwt
        .verify(token, TokenKind::Refresh)
        .map_err(|_| ApiError::Unauthorized(INVALID_REFRESH))?;
    let mut tx = state.db.begin().await?;
    match sessions::redeem_refresh_token(&mut tx, &token_hash(token)).await? {
        Redeemed::Live {
            family_id,
            user_id,
            session_expires_at,
        } if user_id.0 == claims.sub => {
            let tokens =
                issue_tokens(&mut tx, &state.jwt, user_id, family_id, session_expires_at).await?;
            tx.commit().await?;
            Ok(tokens)
        }
        Redeemed::Reused { family_id } => {
            sessions::revoke_family(&mut tx, family_id).await?;
            tx.commit().await?;
            tracing::warn!(user_id = %claims.sub, %family_id, "refresh token reused: session revoked");
            Err(ApiError::Unauthorized(INVALID_REFRESH))
        }
        Redeemed::Live { .. } | Redeemed::Dead => Err(ApiError::Unauthorized(INVALID_REFRESH)),
    }
}

/// Ends the session a refresh token belongs to: its refresh tokens stop working, and its event streams end
/// within 2 s on every api process. Idempotent: a refresh token of this user that has not expired gets 204 again,
/// whether its session is already revoked or its rows are already purged.
///
/// Access tokens already issued stay valid until they expire (ACCESS_TOKEN_EXPIRE_MINUTES, 15 by default).
#[utoipa::path(post, path = "/auth/logout", tag = "auth", security(("bearer" = [])), request_body(content = Option<RefreshRequest>, description = "Or an empty body with the `refresh_token` cookie"), responses(
    (status = 204, description = "Session revoked (or already ended); the refresh token and event-stream cookies are cleared"),
    (status = 401, body = ErrorBody, description = "Missing or invalid access token, a missing, invalid or expired refresh token, or one that is not this user's", example = json!({"detail": "Missing refresh token"})),
    (status = 413, body = ErrorBody, description = "Request body larger than 64 KiB"), (status = 415, body = ErrorBody, description = "Content-Type is not application/json"),
    (status = 422, body = ValidationErrorBody, description = "Invalid input: one entry per problem", example = json!({"detail": [{"loc": ["body", "refresh_token"], "msg": "Field required", "type": "missing"}]})),
    (status = 503, body = ErrorBody, description = "PostgreSQL or Redis unavailable"),
))]
async fn logout(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<RefreshRequest>,
) -> ApiResult<Response> {
    let token = presented_refresh_token(&headers, body)?;
    end_session(&state, &token, Some(user.user_id)).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(header::SET_COOKIE, clear_refresh_cookie());
    headers.append(header::SET_COOKIE, crate::auth::clear_events_cookie());
    Ok(response)
}

/// Ends the session a refresh token belongs to (`/auth/logout`, the console's logout), idempotently: a
/// refresh token that has not expired ends its session again without error, whether the session is already
/// revoked or its rows already purged. With `caller`, the token must be that user's. Returns the session's user;
/// `401` for an invalid or expired token, or another user's.
pub(crate) async fn end_session(
    state: &AppState,
    token: &str,
    caller: Option<UserId>,
) -> ApiResult<UserId> {
    let claims = state
        .jwt
        .verify(token, TokenKind::Refresh)
        .map_err(|_| ApiError::Unauthorized(INVALID_REFRESH))?;
    let user_id = UserId(claims.sub);
    if caller.is_some_and(|caller| caller != user_id) {
        return Err(ApiError::Unauthorized(INVALID_REFRESH));
    }
    let mut tx = state.db.begin().await?;
    match sessions::revoke_session_of(&mut tx, &token_hash(token), user_id).await? {
        LoggedOut::Revoked => tx.commit().await?,
        // A token this service signed for this user and that has not expired, but whose row is gone: the purge
        // deletes a session's tokens once it is revoked, so this session already ended. Idempotent: 204, unless
        // the user is gone too (their tokens went with them).
        LoggedOut::Unknown => {
            drop(tx);
            users::find_user(&state.db, user_id)
                .await?
                .ok_or(ApiError::Unauthorized("User no longer exists"))?;
        }
        LoggedOut::NotTheirs => return Err(ApiError::Unauthorized(INVALID_REFRESH)),
    }
    tracing::info!(%user_id, "user logged out");
    Ok(user_id)
}

/// The logged-in user.
#[utoipa::path(get, path = "/auth/me", tag = "auth", security(("bearer" = [])), responses(
    (status = 200, body = UserResponse, description = "The user"),
    (status = 401, body = ErrorBody, description = "Missing or invalid access token", example = json!({"detail": "Not authenticated"})),
    (status = 503, body = ErrorBody, description = "PostgreSQL or Redis unavailable"),
))]
async fn me(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<JsonResponse<UserResponse>> {
    let user = users::find_user(&state.db, user.user_id)
        .await?
        .ok_or(ApiError::Unauthorized("User no longer exists"))?;
    Ok(JsonResponse(user.into()))
}
