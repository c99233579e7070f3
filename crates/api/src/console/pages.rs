//! The console's pages and assets, embedded in the binary. Each screen is one static page: the layout (header,
//! navigation, account) around the screen's own markup, which the script fills from the admin API. The pages are
//! composed once, when the router is built; only the login form and the notices carry per-request values, always
//! HTML-escaped.
//!
//! Assets are served under a name that holds a hash of their content (`console.3f2a9c1b0d4e.js`), so a browser
//! may keep them for a year and still never runs a stale script after an upgrade: a new binary links new names.

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};

/// A screen of the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Screen {
    /// Orders by status, backlog, throughput and latency, live.
    Overview,
    /// The workers that are running.
    Workers,
    /// Search orders.
    Orders,
    /// One order and its history.
    Order,
    /// Parked orders, to re-drive.
    Parked,
    /// What operators did.
    Audit,
}

impl Screen {
    const ALL: [Self; 6] = [
        Self::Overview,
        Self::Workers,
        Self::Orders,
        Self::Order,
        Self::Parked,
        Self::Audit,
    ];

    /// The name the script knows the screen by (`<body data-page>`).
    fn key(self) -> &'static str {
        match self {
            Self::Overview => "overview",
            Self::Workers => "workers",
            Self::Orders => "orders",
            Self::Order => "order",
            Self::Parked => "parked",
            Self::Audit => "audit",
        }
    }

    /// The page's title and first heading.
    fn title(self) -> &'static str {
        match self {
            Self::Overview => "Overview",
            Self::Workers => "Workers",
            Self::Orders => "Orders",
            Self::Order => "Order",
            Self::Parked => "Parked orders",
            Self::Audit => "Audit log",
        }
    }

    /// The navigation entry marked as the current page: an order's page belongs to the orders.
    fn nav(self) -> &'static str {
        match self {
            Self::Order => Self::Orders.key(),
            other => other.key(),
        }
    }

    fn body(self) -> &'static str {
        match self {
            Self::Overview => include_str!("templates/overview.html"),
            Self::Workers => include_str!("templates/workers.html"),
            Self::Orders => include_str!("templates/orders.html"),
            Self::Order => include_str!("templates/order.html"),
            Self::Parked => include_str!("templates/parked.html"),
            Self::Audit => include_str!("templates/audit.html"),
        }
    }
}

/// An embedded file, served at `/console/assets/<name>`.
#[derive(Debug)]
struct Asset {
    /// `console.<hash>.css`
    name: String,
    content_type: &'static str,
    body: &'static [u8],
}

impl Asset {
    fn new(stem: &str, extension: &str, content_type: &'static str, body: &'static [u8]) -> Self {
        let hash = Sha256::digest(body);
        let hash: String = hash[..6].iter().map(|byte| format!("{byte:02x}")).collect();
        Self {
            name: format!("{stem}.{hash}.{extension}"),
            content_type,
            body,
        }
    }

    fn url(&self) -> String {
        format!("/console/assets/{}", self.name)
    }
}

/// What the login form shows: a message, and the values it keeps.
#[derive(Debug, Default)]
pub(crate) struct LoginForm<'a> {
    /// Why the last attempt failed, if it did.
    pub message: Option<&'a str>,
    /// The address typed last time.
    pub email: &'a str,
    /// The double-submit value the form repeats (the `console_csrf` cookie).
    pub csrf: &'a str,
    /// Where to go once logged in: a console path.
    pub next: &'a str,
}

/// Every page and asset of the console, composed once.
#[derive(Debug)]
pub(crate) struct Pages {
    screens: Vec<(Screen, String)>,
    login: String,
    notice: String,
    assets: Vec<Asset>,
}

impl Pages {
    /// Composes the pages around the assets' hashed names.
    pub(crate) fn new() -> Self {
        let assets = vec![
            Asset::new(
                "console",
                "css",
                "text/css; charset=utf-8",
                include_bytes!("assets/console.css"),
            ),
            Asset::new(
                "console",
                "js",
                "text/javascript; charset=utf-8",
                include_bytes!("assets/console.js"),
            ),
            Asset::new(
                "icon",
                "svg",
                "image/svg+xml",
                include_bytes!("assets/icon.svg"),
            ),
        ];
        let [css, js, icon] = [0, 1, 2].map(|i| assets[i].url());
        // Every page's head, then the two shells: the screens' layout (header, navigation, the script) and the
        // single panel of the login form and the notices.
        let with_assets = |template: &str| {
            template
                .replace("{{head}}", include_str!("templates/head.html").trim_end())
                .replace("{{css}}", &css)
                .replace("{{js}}", &js)
                .replace("{{icon}}", &icon)
        };
        let layout = with_assets(include_str!("templates/layout.html"));
        let panel = |title: &str, heading: &str, body: &str| {
            with_assets(include_str!("templates/panel.html"))
                .replace("{{title}}", title)
                .replace("{{heading}}", heading)
                .replace("{{panel}}", body.trim_end())
        };
        let screens = Screen::ALL
            .into_iter()
            .map(|screen| {
                let mut page = layout
                    .replace("{{title}}", screen.title())
                    .replace("{{page}}", screen.key())
                    .replace("{{body}}", screen.body().trim_end());
                for other in Screen::ALL {
                    let current = if other.key() == screen.nav() {
                        r#" aria-current="page""#
                    } else {
                        ""
                    };
                    page = page.replace(&format!("{{{{nav-{}}}}}", other.key()), current);
                }
                (screen, page)
            })
            .collect();
        Self {
            screens,
            login: panel(
                "Log in",
                "Orders console",
                include_str!("templates/login.html"),
            ),
            notice: panel(
                "{{title}}",
                "{{title}}",
                include_str!("templates/notice.html"),
            ),
            assets,
        }
    }

    /// A screen's page.
    pub(crate) fn screen(&self, screen: Screen) -> Response {
        let page = self
            .screens
            .iter()
            .find(|(s, _)| *s == screen)
            .map_or("", |(_, page)| page.as_str());
        html(StatusCode::OK, page.to_owned())
    }

    /// The login form, answered with `status`.
    pub(crate) fn login(&self, status: StatusCode, form: &LoginForm<'_>) -> Response {
        html(status, self.login_page(form))
    }

    fn login_page(&self, form: &LoginForm<'_>) -> String {
        let message = form.message.map_or_else(String::new, |message| {
            format!(
                r#"<p class="notice error" id="login-error" role="alert">{}</p>"#,
                escape(message)
            )
        });
        let described_by = if form.message.is_some() {
            r#" aria-describedby="login-error""#
        } else {
            ""
        };
        self.login
            .replace("{{message}}", &message)
            .replace("{{described-by}}", described_by)
            .replace("{{email}}", &escape(form.email))
            .replace("{{csrf}}", &escape(form.csrf))
            .replace("{{next}}", &escape(form.next))
    }

    /// A page with a title, a message and a way on, answered with `status`.
    pub(crate) fn notice(
        &self,
        status: StatusCode,
        title: &str,
        message: &str,
        link: (&str, &str),
    ) -> Response {
        let (href, text) = link;
        let page = self
            .notice
            .replace("{{title}}", &escape(title))
            .replace("{{message}}", &escape(message))
            .replace("{{href}}", &escape(href))
            .replace("{{link}}", &escape(text));
        html(status, page)
    }

    /// The asset `name` (with its hash), kept by browsers for a year; `None` for an unknown name.
    pub(crate) fn asset(&self, name: &str) -> Option<Response> {
        let asset = self.assets.iter().find(|asset| asset.name == name)?;
        let mut response = Body::from(asset.body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=31536000, immutable"),
        );
        Some(response)
    }
}

fn html(status: StatusCode, page: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

/// `text` safe to place in HTML text and in double-quoted attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled() {
        let pages = Pages::new();
        for (screen, page) in &pages.screens {
            assert!(!page.contains("{{"), "{screen:?}: {page}");
            assert_eq!(
                page.matches(r#"aria-current="page""#).count(),
                1,
                "{screen:?}"
            );
        }
        let form = LoginForm {
            message: Some("<b>"),
            email: "a\"@example.com",
            csrf: "c",
            next: "/console",
        };
        let login = pages.login_page(&form);
        assert!(!login.contains("{{"), "{login}");
        assert!(
            login.contains("&lt;b&gt;") && login.contains("a&quot;@example.com"),
            "{login}"
        );
    }

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
