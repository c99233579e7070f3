//! Logging in to the console, and the session's cookies. The console's login form checks a password exactly as
//! `/auth/login` does (the same function, the same throttle, the same rate limit) and starts the same kind of
//! session; only the tokens travel in cookies instead of a JSON body.

use axum::{
    Extension,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use orders_core::{
    db::admin,
    domain::{Email, Role, UserId},
};
use secrecy::SecretString;

use super::{
    ConsoleState,
    cookies::{self, CSRF, REFRESH, TOKEN},
    pages::LoginForm,
};
use crate::{
    error::{ApiError, ErrorBody},
    routes::auth::{self as auth_routes, IssuedPair, LoginClient},
};

/// Where a login leads when the form names no page.
const HOME: &str = "/console";

/// `GET /console/login`: the form. A browser that holds a valid console token goes on to the console instead.
/// Sets `console_csrf` when the browser has none, for the form to repeat (a login from another site's form is
/// refused: it cannot know the value).
pub(super) async fn login_form(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let next = console_target(query_value(&uri, "next").as_deref()).to_owned();
    if TOKEN
        .read(&headers)
        .is_some_and(|token| state.app.jwt.verify_access(token).is_ok())
    {
        return see_other(&next);
    }
    let secure = cookies::needs_secure(&headers);
    let (csrf, new_cookie) = match CSRF.read(&headers) {
        Some(csrf) => (csrf.to_owned(), None),
        None => {
            let csrf = cookies::new_csrf_token();
            let cookie = CSRF.set(&csrf, LOGIN_FORM_LIFETIME_SECS, secure);
            (csrf, Some(cookie))
        }
    };
    let form = LoginForm {
        csrf: &csrf,
        next: &next,
        ..LoginForm::default()
    };
    let mut response = state.pages.login(StatusCode::OK, &form);
    if let Some(cookie) = new_cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// How long a login form's `console_csrf` lasts before a first login: a day to fill the form in.
const LOGIN_FORM_LIFETIME_SECS: u64 = 24 * 60 * 60;

/// The login form's fields, as sent (`application/x-www-form-urlencoded`).
#[derive(Debug, Default)]
struct LoginFields {
    email: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

impl LoginFields {
    /// The fields of a form body; a field given twice counts once (the first), an unknown one not at all.
    fn parse(body: &[u8]) -> Self {
        let mut fields = Self::default();
        let mut seen = Vec::new();
        for (name, value) in form_urlencoded::parse(body) {
            if seen.contains(&name) {
                continue;
            }
            let value = value.into_owned();
            match name.as_ref() {
                "email" => fields.email = value,
                "password" => fields.password = value,
                "csrf" => fields.csrf = value,
                "next" => fields.next = Some(value),
                _ => continue,
            }
            seen.push(name);
        }
        fields
    }
}

/// `POST /console/login`: checks the form's email and password as `/auth/login` does, and for an account with
/// console access (viewer or operator) starts a session, sets the console's cookies and goes on to the page the
/// form names (`303`). Every failure answers the form again with its message and a 4xx (or `503` while PostgreSQL
/// does not answer): `401` for wrong credentials, `422` for an unusable address, `429` when throttled, `403` for a
/// form that did not come from the console's page, or for an account without console access (no session is
/// started for it).
pub(super) async fn login(
    State(state): State<ConsoleState>,
    Extension(LoginClient(client)): Extension<LoginClient>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut fields = LoginFields::parse(&body);
    let password = std::mem::take(&mut fields.password);
    let next = console_target(fields.next.as_deref());
    let secure = cookies::needs_secure(&headers);
    let again = |status: StatusCode, message: &str| {
        let form = LoginForm {
            message: Some(message),
            email: &fields.email,
            csrf: &fields.csrf,
            next,
        };
        state.pages.login(status, &form)
    };
    if !cookies::csrf_field_matches(&headers, &fields.csrf) {
        // A form of another site's, or one older than its cookie: a fresh value, for the form shown now.
        let csrf = cookies::new_csrf_token();
        let form = LoginForm {
            message: Some("This form has expired. Please log in again."),
            email: &fields.email,
            csrf: &csrf,
            next,
        };
        let mut response = state.pages.login(StatusCode::FORBIDDEN, &form);
        response.headers_mut().append(
            header::SET_COOKIE,
            CSRF.set(&csrf, LOGIN_FORM_LIFETIME_SECS, secure),
        );
        return response;
    }
    let Ok(email) = Email::parse(&fields.email) else {
        return again(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Enter a valid email address.",
        );
    };
    if password.is_empty() {
        return again(StatusCode::UNPROCESSABLE_ENTITY, "Enter your password.");
    }
    let password = SecretString::from(password);
    let user_id = match auth_routes::authenticate(&state.app, &client, &email, password).await {
        Ok(user_id) => user_id,
        Err(err) => return failed_login(err, again),
    };
    match role_of(&state, user_id).await {
        Ok(role) if role.can_read_admin() => {}
        Ok(_) => {
            tracing::info!(%user_id, "console login refused: no console access");
            return state.pages.notice(
                StatusCode::FORBIDDEN,
                "No console access",
                &format!(
                    "{} has no console access: the console is for viewers and operators. \
                     An administrator can grant a role with `api users set-role EMAIL viewer`.",
                    email.as_str()
                ),
                ("/console/login", "Log in with another account"),
            );
        }
        Err(err) => return failed_login(err, again),
    }
    let pair = match auth_routes::start_session(&state.app, user_id).await {
        Ok(pair) => pair,
        Err(err) => return failed_login(err, again),
    };
    tracing::info!(%user_id, "console login");
    let mut response = see_other(next);
    set_session_cookies(response.headers_mut(), &pair, secure);
    response
}

/// The form again after a failed login: the status of the API's answer (a `500`, a bug that is logged, shows as
/// `503`: the form is never a server error page), its `Retry-After`, and a message for a person.
fn failed_login(err: ApiError, again: impl FnOnce(StatusCode, &str) -> Response) -> Response {
    let message = match &err {
        ApiError::Unauthorized(_) => "Wrong email or password.",
        ApiError::TooManyRequests { .. } => {
            "Too many login attempts for this account. Wait a while, then try again."
        }
        _ => "The service cannot log you in right now. Try again in a moment.",
    };
    // The API's answer logs an outage or a bug once, as for every route.
    let api = err.into_response();
    let status = match api.status() {
        status if status.is_client_error() => status,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = again(status, message);
    if let Some(retry_after) = api.headers().get(header::RETRY_AFTER) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after.clone());
    }
    response
}

/// The role of a user who just proved their password, read as every admin request reads it.
async fn role_of(state: &ConsoleState, user_id: UserId) -> Result<Role, ApiError> {
    admin::find_member(&state.app.db, user_id)
        .await?
        .map(|member| member.role)
        .ok_or(ApiError::Unauthorized("User no longer exists"))
}

/// `POST /console/refresh` (with `X-CSRF-Token`): rotates the session of the `console_refresh` cookie as
/// `/auth/refresh` does, and sets the three cookies again (`204`), with a new `console_csrf`. `401` clears them:
/// the session is over and the page goes to the login form.
pub(super) async fn refresh(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    if !cookies::csrf_header_matches(&headers) {
        return csrf_refused();
    }
    let secure = cookies::needs_secure(&headers);
    let result = match REFRESH.read(&headers) {
        Some(token) => auth_routes::rotate_session(&state.app, token).await,
        None => Err(ApiError::Unauthorized("Missing refresh token")),
    };
    match result {
        Ok(pair) => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            let headers = response.headers_mut();
            set_session_cookies(headers, &pair, secure);
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(err @ ApiError::Unauthorized(_)) => {
            let mut response = err.into_response();
            clear_session_cookies(response.headers_mut(), secure);
            response
        }
        Err(err) => err.into_response(),
    }
}

/// `POST /console/logout` (with `X-CSRF-Token`): ends the session of the `console_refresh` cookie as
/// `/auth/logout` does and clears the cookies (`204`). A session that is already over is cleared all the same.
/// Access tokens already issued stay valid until they expire, as for every logout; the cookie that held this
/// one is gone.
pub(super) async fn logout(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    if !cookies::csrf_header_matches(&headers) {
        return csrf_refused();
    }
    if let Some(token) = REFRESH.read(&headers) {
        match auth_routes::end_session(&state.app, token, None).await {
            Ok(_) | Err(ApiError::Unauthorized(_)) => {}
            // Not revoked (PostgreSQL does not answer): keep the cookies, so that logging out again can.
            Err(err) => return err.into_response(),
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    clear_session_cookies(response.headers_mut(), cookies::needs_secure(&headers));
    response
}

/// `403` for a request authenticated by the console's cookies without the `X-CSRF-Token` that repeats
/// `console_csrf`: it may come from another site's page.
fn csrf_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(ErrorBody {
            detail: "Missing or wrong X-CSRF-Token".into(),
        }),
    )
        .into_response()
}

/// The session's cookies: the access token (as long as it lives), the refresh token and a new double-submit
/// value (as long as the refresh token lives).
fn set_session_cookies(headers: &mut HeaderMap, pair: &IssuedPair, secure: bool) {
    let refresh_left = (pair.refresh_expires_at - chrono::Utc::now()).num_seconds();
    let refresh_left = u64::try_from(refresh_left).unwrap_or(0);
    let tokens = &pair.body;
    for cookie in [
        TOKEN.set(&tokens.access_token, tokens.expires_in, secure),
        REFRESH.set(&tokens.refresh_token, refresh_left, secure),
        CSRF.set(&cookies::new_csrf_token(), refresh_left, secure),
    ] {
        headers.append(header::SET_COOKIE, cookie);
    }
}

fn clear_session_cookies(headers: &mut HeaderMap, secure: bool) {
    for cookie in [TOKEN, REFRESH, CSRF] {
        headers.append(header::SET_COOKIE, cookie.clear(secure));
    }
}

/// `303 See Other` to `location`: after a form's POST, the browser GETs the next page.
pub(super) fn see_other(location: &str) -> Response {
    let location =
        HeaderValue::from_str(location).unwrap_or_else(|_| HeaderValue::from_static(HOME));
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

/// The first value of the query parameter `name`.
pub(super) fn query_value(uri: &Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// Where a login may lead: a page of the console (a path and its query), or the overview. Never another site, nor
/// a path a browser could read as one (`//host`, `/\host`).
fn console_target(next: Option<&str>) -> &str {
    match next {
        Some(next)
            if next.len() <= 2048
                && (next == HOME
                    || next.starts_with("/console/")
                    || next.starts_with("/console?"))
                && !next.starts_with("/console/login")
                && next.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
                && !next.contains("//") =>
        {
            next
        }
        _ => HOME,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_leads_only_to_a_console_page() {
        for good in ["/console", "/console/orders?status=PENDING", "/console?x=1"] {
            assert_eq!(console_target(Some(good)), good);
        }
        for bad in [
            "https://example.com/",
            "//example.com",
            "/console//example.com",
            "/consoles",
            "/console/\\example.com",
            "/console/login",
            "/console/a b",
            "/auth/me",
        ] {
            assert_eq!(console_target(Some(bad)), HOME, "{bad}");
        }
        assert_eq!(console_target(None), HOME);
    }

    #[test]
    fn form_fields_count_once() {
        let fields = LoginFields::parse(b"email=a%40b.c&password=p+w&email=x&csrf=t&other=1");
        assert_eq!(fields.email, "a@b.c");
        assert_eq!(fields.password, "p w");
        assert_eq!(fields.csrf, "t");
        assert_eq!(fields.next, None);
    }
}
