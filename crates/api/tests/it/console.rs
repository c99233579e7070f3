//! The operations console's own routes over real HTTP: the login form and the session's cookies, refresh and
//! logout behind the CSRF header, a customer turned away, the pages and assets with their security headers. The
//! screens themselves are driven in a browser (`browser.rs`, `tests/browser/console.mjs`).

use std::collections::BTreeMap;

use reqwest::{
    Client, Response, StatusCode,
    header::{self, HeaderMap},
    redirect::Policy,
};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{PASSWORD, TestApp};

/// A browser's cookie jar, as far as the console needs one: the cookies set so far, by name.
#[derive(Debug, Default, Clone)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    /// Keeps the cookies a response sets (and forgets those it clears).
    fn take(&mut self, response: &Response) {
        for cookie in set_cookies(response.headers()) {
            let (name, value) = cookie.pair();
            if cookie.attribute("Max-Age") == Some("0") {
                self.0.remove(name);
            } else {
                self.0.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn get(&self, name: &str) -> &str {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {self:?}"))
    }
}

/// One `Set-Cookie` line.
#[derive(Debug)]
struct SetCookie(String);

impl SetCookie {
    fn pair(&self) -> (&str, &str) {
        let first = self.0.split(';').next().unwrap();
        first.split_once('=').unwrap()
    }

    fn name(&self) -> &str {
        self.pair().0
    }

    /// The attribute's value (`Path`, `Max-Age`, `SameSite`), or `""` for a flag that is present (`HttpOnly`).
    fn attribute(&self, name: &str) -> Option<&str> {
        self.0.split(';').skip(1).find_map(|part| {
            let part = part.trim();
            match part.split_once('=') {
                Some((key, value)) if key.eq_ignore_ascii_case(name) => Some(value),
                None if part.eq_ignore_ascii_case(name) => Some(""),
                _ => None,
            }
        })
    }

    fn has(&self, flag: &str) -> bool {
        self.attribute(flag).is_some()
    }
}

fn set_cookies(headers: &HeaderMap) -> Vec<SetCookie> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|value| SetCookie(value.to_str().unwrap().to_owned()))
        .collect()
}

/// A client that does not follow redirects, so that each answer can be looked at.
fn browser() -> Client {
    Client::builder().redirect(Policy::none()).build().unwrap()
}

/// Sends `GET path` with the cookies of `jar`.
async fn get_with(app: &TestApp, client: &Client, path: &str, jar: &Jar) -> Response {
    client
        .get(app.url(path))
        .header(header::COOKIE, jar.header())
        .send()
        .await
        .unwrap()
}

/// The login form as a browser holds it once opened: its cookies (a `console_csrf`) and the form's CSRF value.
struct LoginForm {
    jar: Jar,
    csrf: String,
}

impl LoginForm {
    /// Opens the login form in a browser with no cookies yet, checking that the form carries the cookie's value.
    async fn open(app: &TestApp, client: &Client) -> Self {
        let mut jar = Jar::default();
        let form = get_with(app, client, "/console/login", &jar).await;
        assert_eq!(form.status(), StatusCode::OK);
        jar.take(&form);
        let csrf = jar.get("console_csrf").to_owned();
        let page = form.text().await.unwrap();
        assert!(
            page.contains(&format!(r#"name="csrf" value="{csrf}""#)),
            "{page}"
        );
        Self { jar, csrf }
    }

    /// The form's fields filled in with `email` and `password`.
    fn fields<'a>(&'a self, email: &'a str, password: &'a str) -> [(&'a str, &'a str); 3] {
        [
            ("email", email),
            ("password", password),
            ("csrf", &self.csrf),
        ]
    }

    /// Posts the form filled in with `email` and `password`, with its cookies.
    async fn submit(
        &self,
        app: &TestApp,
        client: &Client,
        email: &str,
        password: &str,
    ) -> Response {
        post_login(app, client, &self.jar, &self.fields(email, password), None).await
    }
}

/// Posts the login form with these fields.
async fn post_login(
    app: &TestApp,
    client: &Client,
    jar: &Jar,
    fields: &[(&str, &str)],
    host: Option<&str>,
) -> Response {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    let mut request = client
        .post(app.url("/console/login"))
        .header(header::COOKIE, jar.header())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body);
    if let Some(host) = host {
        request = request.header(header::HOST, host);
    }
    request.send().await.unwrap()
}

/// Logs in through the form as `email`: the browser's cookies afterwards.
async fn console_login(app: &TestApp, client: &Client, email: &str) -> Jar {
    let form = LoginForm::open(app, client).await;
    let response = form.submit(app, client, email, PASSWORD).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let mut jar = form.jar;
    jar.take(&response);
    jar
}

/// Posts to `path` with the cookies of `jar` and `csrf` as X-CSRF-Token (if any).
async fn post_with(
    app: &TestApp,
    client: &Client,
    path: &str,
    jar: &Jar,
    csrf: Option<&str>,
) -> Response {
    let mut request = client
        .post(app.url(path))
        .header(header::COOKIE, jar.header());
    if let Some(csrf) = csrf {
        request = request.header("X-CSRF-Token", csrf);
    }
    request.send().await.unwrap()
}

/// Posts to `path` as the console's script does: the cookies of `jar`, and its `console_csrf` as X-CSRF-Token.
async fn post_from_page(app: &TestApp, client: &Client, path: &str, jar: &Jar) -> Response {
    post_with(app, client, path, jar, Some(jar.get("console_csrf"))).await
}

/// Fails if `response` sets a cookie.
fn assert_sets_no_cookie(response: &Response, what: &str) {
    let cookies = set_cookies(response.headers());
    assert!(cookies.is_empty(), "{what}: {cookies:?}");
}

/// Fails unless `response` is an HTML page.
fn assert_html(response: &Response) {
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
}

/// Fails unless `response` carries the console's security headers (`what` names it in the message).
fn assert_security_headers(response: &Response, what: &str) {
    let headers = response.headers();
    let csp = headers
        .get(header::CONTENT_SECURITY_POLICY)
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy"))
        .to_str()
        .unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(directive), "{what}: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{what}: {csp}");
    assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY", "{what}");
    assert_eq!(headers[header::REFERRER_POLICY], "no-referrer", "{what}");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{what}");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn logging_in_sets_the_three_console_cookies_with_their_attributes(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let client = browser();
    let email = app.register_with_role("operator").await.email;
    let mut form = LoginForm::open(&app, &client).await;

    let fields = [
        form.fields(&email, PASSWORD).as_slice(),
        &[("next", "/console/parked")],
    ]
    .concat();
    let response = post_login(&app, &client, &form.jar, &fields, None).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[header::LOCATION], "/console/parked");
    let cookies = set_cookies(response.headers());
    let names: Vec<&str> = cookies.iter().map(SetCookie::name).collect();
    assert_eq!(names, ["console_token", "console_refresh", "console_csrf"]);
    for cookie in &cookies {
        assert_eq!(cookie.attribute("SameSite"), Some("Strict"), "{cookie:?}");
        // Served on 127.0.0.1 over plain HTTP: a browser would refuse Secure cookies from anywhere else.
        assert!(!cookie.has("Secure"), "{cookie:?}");
        let max_age: u64 = cookie.attribute("Max-Age").unwrap().parse().unwrap();
        assert!(max_age > 0, "{cookie:?}");
    }
    let [token, refresh, new_csrf] = &cookies[..] else {
        unreachable!()
    };
    assert!(token.has("HttpOnly") && token.attribute("Path") == Some("/"));
    assert_eq!(token.attribute("Max-Age"), Some("900"));
    assert!(refresh.has("HttpOnly") && refresh.attribute("Path") == Some("/console"));
    // The page's script reads this one, to send it back as X-CSRF-Token.
    assert!(!new_csrf.has("HttpOnly") && new_csrf.attribute("Path") == Some("/"));
    assert_ne!(
        new_csrf.pair().1,
        form.csrf,
        "a login starts with a new CSRF value"
    );
    assert!(new_csrf.pair().1.len() >= 32);

    // The cookie holds an ordinary access token of a new session.
    let me = app.get(token.pair().1, "/auth/me").await;
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(crate::helpers::json(me).await["email"], email.as_str());

    // Served under another name than the loopback, every cookie is Secure.
    let response = post_login(
        &app,
        &client,
        &form.jar,
        &form.fields(&email, PASSWORD),
        Some("console.example.com"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookies = set_cookies(response.headers());
    assert_eq!(cookies.len(), 3);
    assert!(
        cookies.iter().all(|cookie| cookie.has("Secure")),
        "{cookies:?}"
    );

    // A browser that holds a session is sent on from the form to the console.
    form.jar.take(&response);
    let again = get_with(&app, &client, "/console/login", &form.jar).await;
    assert_eq!(again.status(), StatusCode::SEE_OTHER);
    assert_eq!(again.headers()[header::LOCATION], "/console");
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_wrong_password_answers_the_form_again_with_a_message_and_no_session(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let client = browser();
    let email = app.register_with_role("operator").await.email;
    let form = LoginForm::open(&app, &client).await;
    let cases = [
        (
            email.as_str(),
            "wrong password!",
            StatusCode::UNAUTHORIZED,
            "Wrong email or password.",
        ),
        (
            "nobody@example.com",
            PASSWORD,
            StatusCode::UNAUTHORIZED,
            "Wrong email or password.",
        ),
        (
            "not an address",
            PASSWORD,
            StatusCode::UNPROCESSABLE_ENTITY,
            "Enter a valid email address.",
        ),
        (
            email.as_str(),
            "",
            StatusCode::UNPROCESSABLE_ENTITY,
            "Enter your password.",
        ),
    ];
    for (address, password, status, message) in cases {
        let response = form.submit(&app, &client, address, password).await;
        assert_eq!(response.status(), status, "{address} / {password}");
        assert_sets_no_cookie(&response, address);
        assert_html(&response);
        assert_security_headers(&response, "the form again");
        let page = response.text().await.unwrap();
        assert!(page.contains(message), "{page}");
        // The address typed is kept, as text; the password never comes back.
        assert!(
            page.contains(r#"name="email""#) && page.contains(&escape(address)),
            "{page}"
        );
        assert!(!page.contains("wrong password!"));
    }
    assert_eq!(
        app.count("refresh_tokens").await,
        0,
        "no session was started"
    );

    // A form that did not come from the console's page (no console_csrf cookie, or another value) is refused,
    // and the form shown again carries a fresh value.
    let response = post_login(
        &app,
        &client,
        &Jar::default(),
        &form.fields(&email, PASSWORD),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let cookies = set_cookies(response.headers());
    assert_eq!(cookies.len(), 1);
    assert_eq!(cookies[0].name(), "console_csrf");
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("This form has expired")
    );
    assert_eq!(app.count("refresh_tokens").await, 0);
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('"', "&quot;")
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_login_form_is_throttled_as_the_login_route_is(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| config.login_max_failures = 2).await;
    let client = browser();
    let email = app.register_with_role("viewer").await.email;
    let form = LoginForm::open(&app, &client).await;
    for _ in 0..2 {
        let response = form.submit(&app, &client, &email, "wrong password!").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    // The third attempt is refused before the password is looked at, right or not, and the attempts counted on
    // the form count for /auth/login too.
    let response = form.submit(&app, &client, &email, PASSWORD).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key(header::RETRY_AFTER));
    assert_sets_no_cookie(&response, "the throttled form");
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("Too many login attempts")
    );
    assert_eq!(
        app.login(&email, PASSWORD).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// The login form counts against `/auth/login`'s rate limit (the deployment's defaults: 5 a minute per client,
/// shared by every api process), and past it answers the form again, not the JSON `429`.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn the_login_form_shares_the_login_rate_limit(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        config.rate_limits =
            <api::Config as clap::Parser>::parse_from(["api", "--jwt-secret", "x"]).rate_limits;
    })
    .await;
    let client = browser();
    let email = app.register_with_role("viewer").await.email;
    let form = LoginForm::open(&app, &client).await;
    for attempt in 1..=3 {
        let response = form.submit(&app, &client, &email, "wrong password!").await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    for attempt in 4..=5 {
        assert_eq!(
            app.login(&email, "wrong password!").await.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    let response = form.submit(&app, &client, &email, "wrong password!").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(crate::helpers::retry_after(&response) >= 1);
    assert_security_headers(&response, "the limited form");
    assert_html(&response);
    let page = response.text().await.unwrap();
    assert!(
        page.contains("Too many login attempts from this address"),
        "{page}"
    );
    assert!(
        page.contains(&format!(r#"name="csrf" value="{}""#, form.csrf)),
        "{page}"
    );
    // Showing the form is not an attempt.
    let form = client.get(app.url("/console/login")).send().await.unwrap();
    assert_eq!(form.status(), StatusCode::OK);
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_customer_gets_a_no_access_page_and_no_session(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let client = browser();
    let email = app.register_with_role("customer").await.email;
    let form = LoginForm::open(&app, &client).await;
    let response = form.submit(&app, &client, &email, PASSWORD).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_sets_no_cookie(&response, "no access");
    assert_security_headers(&response, "no access");
    let page = response.text().await.unwrap();
    assert!(page.contains("has no console access"), "{page}");
    assert_eq!(app.count("refresh_tokens").await, 0);

    // Made a viewer, the same account gets in.
    app.set_role(&email, "viewer").await;
    let jar = console_login(&app, &client, &email).await;
    assert!(!jar.get("console_token").is_empty());
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn refresh_and_logout_need_the_csrf_header(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let client = browser();
    let email = app.register_with_role("viewer").await.email;
    let jar = console_login(&app, &client, &email).await;

    for path in ["/console/refresh", "/console/logout"] {
        for wrong in [None, Some("not-the-cookie"), Some("")] {
            let response = post_with(&app, &client, path, &jar, wrong).await;
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path} {wrong:?}");
            assert_sets_no_cookie(&response, path);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["detail"], "Missing or wrong X-CSRF-Token");
        }
    }

    // With it, a refresh rotates the session: three new cookies, the old refresh token dead.
    let response = post_from_page(&app, &client, "/console/refresh", &jar).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let mut renewed = jar.clone();
    renewed.take(&response);
    for name in ["console_token", "console_refresh", "console_csrf"] {
        assert_ne!(renewed.get(name), jar.get(name), "{name}");
    }
    let me = app.get(renewed.get("console_token"), "/auth/me").await;
    assert_eq!(me.status(), StatusCode::OK);

    // Logout revokes the session and clears the cookies.
    let response = post_from_page(&app, &client, "/console/logout", &renewed).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let cleared = set_cookies(response.headers());
    assert_eq!(cleared.len(), 3);
    assert!(cleared.iter().all(|c| c.attribute("Max-Age") == Some("0")));
    let revoked: i64 =
        sqlx::query_scalar("select count(*) from refresh_tokens where revoked_at is null")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(revoked, 0, "every token of the session is revoked");

    // The session is over: a refresh with its last token is refused, and clears the cookies.
    let response = post_from_page(&app, &client, "/console/refresh", &renewed).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(set_cookies(response.headers()).len(), 3);
}

/// The console's pages as a browser holding a session gets them.
const PAGES: [&str; 7] = [
    "/console",
    "/console/workers",
    "/console/orders",
    "/console/orders?status=PENDING&parked=true",
    "/console/orders/0190f5c4-8b7a-7c3e-9d2f-0123456789ab",
    "/console/parked",
    "/console/audit",
];

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn pages_and_assets_carry_the_security_headers(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let client = browser();
    let email = app.register_with_role("viewer").await.email;

    // Without a session, a page sends the browser to the login form, which brings it back.
    let response = client
        .get(app.url("/console/orders?status=PENDING"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()[header::LOCATION],
        "/console/login?next=%2Fconsole%2Forders%3Fstatus%3DPENDING"
    );
    assert_security_headers(&response, "redirect");

    let jar = console_login(&app, &client, &email).await;
    for path in PAGES.into_iter().chain(["/console/login"]) {
        let mut request = client.get(app.url(path));
        if path != "/console/login" {
            request = request.header(header::COOKIE, jar.header());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_security_headers(&response, path);
        assert_eq!(
            response.headers()[header::CACHE_CONTROL],
            "no-store",
            "{path}"
        );
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let page = response.text().await.unwrap();
        assert!(
            page.starts_with("<!doctype html>\n<html lang=\"en\">"),
            "{path}"
        );
        // No inline script or style: the policy would block them.
        assert!(
            !page.contains("<script>") && !page.contains(" style="),
            "{path}"
        );
        assert!(
            !page.contains("onclick=") && !page.contains("javascript:"),
            "{path}"
        );
    }

    // An unknown page, and an order page for something that is not an order id, are a page too.
    for path in [
        "/console/nope",
        "/console/orders/not-an-id",
        "/console/assets/console.js",
    ] {
        let response = get_with(&app, &client, path, &jar).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_security_headers(&response, path);
        assert!(response.text().await.unwrap().contains("Page not found"));
    }
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn every_asset_and_link_the_pages_reference_is_served(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let client = browser();
    let email = app.register_with_role("operator").await.email;
    let jar = console_login(&app, &client, &email).await;

    let mut referenced = BTreeMap::new();
    for path in PAGES.into_iter().chain(["/console/login"]) {
        let cookies = if path == "/console/login" {
            &Jar::default()
        } else {
            &jar
        };
        let page = get_with(&app, &client, path, cookies)
            .await
            .text()
            .await
            .unwrap();
        for attribute in ["src=\"", "href=\""] {
            for (at, _) in page.match_indices(attribute) {
                let rest = &page[at + attribute.len()..];
                let url = &rest[..rest.find('"').unwrap()];
                referenced.insert(url.to_owned(), path);
            }
        }
    }
    let assets: Vec<&String> = referenced
        .keys()
        .filter(|url| url.starts_with("/console/assets/"))
        .collect();
    assert_eq!(
        assets.len(),
        3,
        "a stylesheet, a script, an icon: {referenced:?}"
    );
    for (url, page) in &referenced {
        assert!(
            url.starts_with('/') || url.starts_with('#'),
            "{page} links away: {url}"
        );
        if url.starts_with('#') {
            continue;
        }
        let response = get_with(&app, &client, url, &jar).await;
        assert_eq!(response.status(), StatusCode::OK, "{url} (on {page})");
        if url.starts_with("/console/assets/") {
            assert_security_headers(&response, url);
            assert_eq!(
                response.headers()[header::CACHE_CONTROL],
                "public, max-age=31536000, immutable"
            );
            let kind = response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned();
            let expected = match url.rsplit('.').next().unwrap() {
                "css" => "text/css; charset=utf-8",
                "js" => "text/javascript; charset=utf-8",
                "svg" => "image/svg+xml",
                other => panic!("unexpected asset kind {other}"),
            };
            assert_eq!(kind, expected, "{url}");
            assert!(!response.bytes().await.unwrap().is_empty());
        }
    }
}

/// Waits up to `secs` for the next line the browser script prints, parsed as JSON.
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    secs: u64,
    waiting_for: &str,
) -> Value {
    let line = tokio::time::timeout(std::time::Duration::from_secs(secs), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no `{waiting_for}` from the browser within {secs} s"))
        .unwrap()
        .unwrap_or_else(|| panic!("the browser script ended before `{waiting_for}`"));
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
}

/// The console in a real browser (Debian's chromium, driven through the pages by `tests/browser/console.mjs`): an
/// operator logs in and watches the overview count orders as they complete, without a reload; after the
/// connection drops with the access token gone, the page reconnects, renews its session and counts on. The
/// operator re-drives parked orders three ways (a selection on the parked list; one found by its id, from its own
/// page, until that page shows it COMPLETED; every order a search matches, after a confirmation), cancels a pending
/// order from its page (the customer's live stream of that order shows it CANCELLED), looks at the workers and the
/// audit log, and logs out. A viewer then finds no action control, and the API refuses their re-drive. Screenshots
/// of every screen: `target/console-*.png`.
#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn an_operator_steers_and_a_viewer_watches_through_the_console_in_a_browser(pool: PgPool) {
    use std::process::Stdio;

    use tokio::io::{AsyncBufReadExt, BufReader};

    use crate::{
        browser::{CutProxy, spawn_worker},
        events::{Stream, statuses},
    };

    let app = TestApp::spawn_with(pool.clone(), |config| {
        config.admin_overview_refresh_ms = 300;
    })
    .await;
    let proxy = CutProxy::start(app.base.trim_start_matches("http://").to_owned()).await;
    let operator = app.register_with_role("operator").await.email;
    let viewer = app.register_with_role("viewer").await.email;
    let customer = app.new_user().await;

    // Five parked orders, parked before any worker runs: their attempts ran out on a failing payment.
    let gizmo = format!("Gizmo-{}", Uuid::new_v4().simple());
    let mut parked = serde_json::Map::new();
    for (role, product) in [
        ("detail", "Widget"),
        ("selection", "Widget"),
        ("all", gizmo.as_str()),
        ("cancel", "Widget"),
        ("viewer", "Widget"),
    ] {
        let created = app
            .create_order(
                &customer.access,
                &serde_json::json!({"product_name": product, "amount": 12.5}),
            )
            .await;
        assert_eq!(created.status(), StatusCode::CREATED);
        let id: Uuid = crate::helpers::json(created).await["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        sqlx::query(
            "update orders set parked_at = now(), attempts = 5, \
             last_error = 'payment provider timed out after 30 s' where id = $1",
        )
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
        parked.insert(role.to_owned(), Value::from(id.to_string()));
    }
    parked.insert("all_product".to_owned(), Value::from(gizmo.clone()));
    // The customer follows, on its live stream, the order the operator cancels from its page in the console.
    let cancel_events = format!("/orders/{}/events", parked["cancel"].as_str().unwrap());
    let mut following_cancel = Stream::start(&app, &customer.access, &cancel_events, None).await;
    let first = following_cancel
        .next(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(first.status(), "PENDING");
    let (stop, worker) = spawn_worker(&app, &pool, |settings| {
        settings.order_stage_delay_ms = 100;
        settings.reconcile_interval_ms = 200;
    });

    let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    let screenshots = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target");
    let mut node = tokio::process::Command::new("node")
        .arg(format!("{folder}/console.mjs"))
        .args([&proxy.base, screenshots, &operator, &viewer, PASSWORD])
        .arg(Value::Object(parked.clone()).to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed (apt-get install nodejs npm)");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();

    let watching = next_line(&mut lines, 90, "watching").await;
    assert_eq!(
        watching["step"], "watching",
        "the browser did not start: is chromium installed, and `npm ci` run in {folder}? {watching}"
    );
    for _ in 0..5 {
        app.create_widget(&customer.access).await;
    }
    let live = next_line(&mut lines, 120, "live").await;
    assert_eq!(live["step"], "live", "{live}");

    // The connection drops (as a load balancer or a network would drop it) while the page has lost its access
    // token; then more orders complete.
    assert!(proxy.cut() >= 1, "the page's stream went through the proxy");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for _ in 0..3 {
        app.create_widget(&customer.access).await;
    }
    let reconnected = next_line(&mut lines, 150, "reconnected").await;
    assert_eq!(reconnected["step"], "reconnected", "{reconnected}");

    let log = next_line(&mut lines, 240, "the result").await;
    assert!(log.get("error").is_none(), "{log:#}");
    assert_eq!(log["problems"], serde_json::json!([]), "{log:#}");
    assert!(log["live_increase"].as_i64().unwrap() >= 5, "{log:#}");
    assert_eq!(log["chart_bars"], 60, "{log:#}");
    let states: Vec<&str> = log["live_states"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(states.contains(&"reconnecting"), "{log:#}");
    assert_eq!(states.last(), Some(&"live"), "{log:#}");
    assert_eq!(log["renewed_token"], true, "{log:#}");
    for (screen, unlabelled) in log["unlabelled"].as_object().unwrap() {
        assert_eq!(unlabelled, &serde_json::json!([]), "{screen}");
    }
    assert!(
        log["selection_outcome"]
            .as_str()
            .unwrap()
            .contains("re-driven"),
        "{log:#}"
    );
    assert_eq!(log["detail_parked"], true, "{log:#}");
    assert!(
        log["detail_last_error"]
            .as_str()
            .unwrap()
            .contains("payment provider timed out"),
        "{log:#}"
    );
    assert!(
        log["detail_outcome"]
            .as_str()
            .unwrap()
            .contains("re-driven"),
        "{log:#}"
    );
    assert_eq!(log["detail_status"], "completed", "{log:#}");
    // Followed live while unfinished, and no more once completed.
    assert_eq!(
        log["following_parked"], "Live: following this order until it finishes.",
        "{log:#}"
    );
    assert_eq!(log["following_done"], "", "{log:#}");
    let parked_timeline = log["timeline_parked"].to_string();
    for step in ["Created", "Parked"] {
        assert!(
            parked_timeline.contains(step),
            "{step} missing from {parked_timeline}"
        );
    }
    let timeline = log["timeline"].to_string();
    // The re-drive, from the audit log, with who made it.
    for step in ["Created", "Re-driven requeued", "processing", "completed"] {
        assert!(timeline.contains(step), "{step} missing from {timeline}");
    }
    assert!(timeline.contains(&operator), "{timeline}");
    assert!(
        log["confirmation"]
            .as_str()
            .unwrap()
            .contains("1 order matches"),
        "{log:#}"
    );
    assert!(
        log["all_outcome"].as_str().unwrap().contains("re-driven"),
        "{log:#}"
    );
    assert!(
        log["cancel_outcome"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{log:#}"
    );
    assert_eq!(log["cancel_buttons_after"], 0, "{log:#}");
    assert!(log["workers"].as_u64().unwrap() >= 1, "{log:#}");
    assert_eq!(
        log["audit_actions"],
        serde_json::json!(["cancel", "redrive", "redrive", "redrive"]),
        "{log:#}"
    );
    assert_eq!(log["logged_out"], true, "{log:#}");
    assert_eq!(log["viewer_checkboxes"], 0, "{log:#}");
    assert_eq!(log["viewer_action_buttons"], 0, "{log:#}");
    assert_eq!(log["viewer_detail_actions"], 0, "{log:#}");
    assert_eq!(log["viewer_redrive_status"], 403, "{log:#}");
    assert_eq!(
        log["viewer_first_focus"],
        serde_json::json!({"text": "Skip to content", "outline": "solid", "on_screen": true}),
        "{log:#}"
    );
    assert!(node.wait().await.unwrap().success());

    // What the pages did is what the database holds: three re-driven orders completed, the viewer's still parked.
    let status = |id: &Value| {
        let id: Uuid = id.as_str().unwrap().parse().unwrap();
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, bool)>(
                "select status::text, parked_at is not null from orders where id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    for role in ["detail", "selection", "all"] {
        loop {
            let now = status(&parked[role]).await;
            if now == ("COMPLETED".to_owned(), false) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{role} order is {now:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        status(&parked["viewer"]).await,
        ("PENDING".to_owned(), true)
    );
    assert_eq!(
        status(&parked["cancel"]).await,
        ("CANCELLED".to_owned(), true)
    );
    assert_eq!(statuses(&following_cancel.rest().await), ["CANCELLED"]);
    stop.cancel();
    worker.await.unwrap().unwrap();
}
