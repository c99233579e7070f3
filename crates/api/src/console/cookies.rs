//! The console's cookies. A page keeps its access token where no script can read it, in the HttpOnly cookie
//! `console_token`, which the admin API accepts as it accepts a Bearer token. A browser sends cookies with every
//! request to the site, whoever's page asks, so each request that changes something must also prove that it comes
//! from the console's own page (double submit): `console_csrf` holds a random value that the page's script reads
//! and copies into the `X-CSRF-Token` header. Another site's page can make the browser send the cookies, but it can
//! read neither the cookie nor the console's pages (same-origin policy), so it cannot know the value. All three
//! cookies are `SameSite=Strict` besides, so no other site's request carries them at all in current browsers.

use axum::http::{HeaderMap, HeaderValue, header};
use uuid::Uuid;

// The admin API reads these cookies and checks the CSRF header (`admin::access`): one definition for both.
pub use crate::admin::access::{CONSOLE_COOKIE as TOKEN_COOKIE, CSRF_COOKIE, CSRF_HEADER};
use crate::{
    admin::access::{csrf_token_matches, same_secret},
    auth::cookie,
};

/// The console's refresh token cookie, sent only to `/console` paths, where only `/console/refresh` and
/// `/console/logout` read it.
pub const REFRESH_COOKIE: &str = "console_refresh";

/// One of the console's cookies: its name, the paths it is sent to, and whether scripts may read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cookie {
    name: &'static str,
    path: &'static str,
    http_only: bool,
}

/// `console_token`: sent to every path, since the admin API lives under `/admin`.
pub(crate) const TOKEN: Cookie = Cookie {
    name: TOKEN_COOKIE,
    path: "/",
    http_only: true,
};

/// `console_refresh`: only `/console` paths need it.
pub(crate) const REFRESH: Cookie = Cookie {
    name: REFRESH_COOKIE,
    path: "/console",
    http_only: true,
};

/// `console_csrf`: readable by the page's script, which copies it into [`CSRF_HEADER`].
pub(crate) const CSRF: Cookie = Cookie {
    name: CSRF_COOKIE,
    path: "/",
    http_only: false,
};

impl Cookie {
    /// `Set-Cookie` for `value`, kept `max_age_secs` seconds; `Secure` unless the page is served to a browser on
    /// the same machine over plain HTTP (see [`needs_secure`]).
    pub(crate) fn set(self, value: &str, max_age_secs: u64, secure: bool) -> HeaderValue {
        HeaderValue::from_str(&self.line(value, max_age_secs, secure))
            .unwrap_or_else(|_| self.clear(secure))
    }

    /// `Set-Cookie` that removes the cookie.
    pub(crate) fn clear(self, secure: bool) -> HeaderValue {
        HeaderValue::from_str(&self.line("", 0, secure))
            .unwrap_or_else(|_| HeaderValue::from_static("console_token=; Path=/; Max-Age=0"))
    }

    fn line(self, value: &str, max_age_secs: u64, secure: bool) -> String {
        let Self {
            name,
            path,
            http_only,
        } = self;
        let http_only = if http_only { "; HttpOnly" } else { "" };
        let secure = if secure { "; Secure" } else { "" };
        format!(
            "{name}={value}{http_only}; SameSite=Strict; Path={path}; Max-Age={max_age_secs}{secure}"
        )
    }

    /// The cookie's value in the request, if it was sent and is not empty.
    pub(crate) fn read(self, headers: &HeaderMap) -> Option<&str> {
        cookie(headers, self.name)
    }
}

/// Whether the console's cookies must be `Secure`: always, except for a page whose host is this machine's
/// loopback (`localhost`, `127.0.0.1`, `[::1]`), which is what a developer opens over plain HTTP. A browser
/// refuses to store a `Secure` cookie sent over plain HTTP from any other host, and on any other host plain HTTP
/// would expose the tokens on the network, so there the console works only behind TLS.
pub(crate) fn needs_secure(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return true;
    };
    // `[::1]:8000`, `localhost:8000`, `127.0.0.1`: the name without its port.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().map(|inner| format!("[{inner}]")),
        None => host.split(':').next().map(str::to_owned),
    };
    !name.is_some_and(|name| {
        matches!(
            name.to_ascii_lowercase().as_str(),
            "localhost" | "127.0.0.1" | "[::1]"
        )
    })
}

/// Whether the request repeats its `console_csrf` cookie in the `X-CSRF-Token` header, as the admin API checks
/// it on every change asked for with the console's cookie.
pub(crate) fn csrf_header_matches(headers: &HeaderMap) -> bool {
    csrf_token_matches(headers)
}

/// Whether `presented` equals the request's `console_csrf` cookie (compared in constant time): the login form
/// repeats it in a hidden field. `false` if the cookie is missing or either is empty.
pub(crate) fn csrf_field_matches(headers: &HeaderMap, presented: &str) -> bool {
    !presented.is_empty()
        && CSRF
            .read(headers)
            .is_some_and(|cookie| same_secret(cookie.as_bytes(), presented.as_bytes()))
}

/// A fresh double-submit value: 244 random bits (two version 4 UUIDs, from the operating system's generator),
/// as 64 hexadecimal digits.
pub(crate) fn new_csrf_token() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_host(host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        headers
    }

    #[test]
    fn cookies_are_secure_except_on_the_loopback_host() {
        for local in [
            "localhost",
            "localhost:8000",
            "127.0.0.1:1234",
            "[::1]:80",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(!needs_secure(&with_host(local)), "{local}");
        }
        for remote in [
            "example.com",
            "10.0.0.1:8000",
            "[::2]:80",
            "localhost.example.com",
            "127.0.0.2",
        ] {
            assert!(needs_secure(&with_host(remote)), "{remote}");
        }
        assert!(needs_secure(&HeaderMap::new()));
    }

    #[test]
    fn the_csrf_header_must_repeat_the_cookie() {
        let mut headers = HeaderMap::new();
        assert!(!csrf_header_matches(&headers));
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; console_csrf=abc"),
        );
        assert!(!csrf_header_matches(&headers));
        headers.insert(CSRF_HEADER, HeaderValue::from_static("abd"));
        assert!(!csrf_header_matches(&headers));
        headers.insert(CSRF_HEADER, HeaderValue::from_static("abc"));
        assert!(csrf_header_matches(&headers));
        assert!(csrf_field_matches(&headers, "abc"));
        assert!(!csrf_field_matches(&headers, "ab"));
    }

    #[test]
    fn a_cookie_line_has_its_attributes() {
        assert_eq!(
            TOKEN.line("t", 900, false),
            "console_token=t; HttpOnly; SameSite=Strict; Path=/; Max-Age=900"
        );
        assert_eq!(
            CSRF.line("c", 60, true),
            "console_csrf=c; SameSite=Strict; Path=/; Max-Age=60; Secure"
        );
        assert_eq!(
            REFRESH.line("", 0, true),
            "console_refresh=; HttpOnly; SameSite=Strict; Path=/console; Max-Age=0; Secure"
        );
    }
}
