//! One error type for every handler. Each variant maps to the contract's status and body; the cause of a 500
//! or 503 is logged here and never sent to the client.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use orders_core::db::batch::BatchError;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// `{"detail": "..."}`: the body of every error except validation errors.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a human.
    #[schema(example = "A message for a human")]
    pub detail: String,
}

/// One problem with the request, in FastAPI's shape.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FieldError {
    /// Where: `["body", "amount"]`, `["query", "limit"]`, `["path", "id"]`, `["header", "idempotency-key"]`.
    #[schema(value_type = Vec<LocItem>, example = json!(["body", "product_name"]))]
    pub loc: Vec<Value>,
    /// What is wrong, for a human.
    #[schema(example = "Field required")]
    pub msg: String,
    /// What is wrong, for a program (pydantic's error types).
    #[serde(rename = "type")]
    #[schema(example = "missing")]
    pub kind: String,
}

impl FieldError {
    /// A problem at `loc`.
    pub fn new(loc: Vec<Value>, kind: impl Into<String>, msg: impl Into<String>) -> Self {
        Self {
            loc,
            msg: msg.into(),
            kind: kind.into(),
        }
    }

    /// A problem with a domain value, at `loc`.
    pub fn invalid(loc: Vec<Value>, invalid: orders_core::domain::Invalid) -> Self {
        Self::new(loc, invalid.kind, invalid.message)
    }
}

/// One step of a `loc`: where the input was (`body`, `query`, `path`, `header`), then a field name or a list
/// index. Only describes the schema; `loc` is built from JSON values.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum LocItem {
    /// A place or a field name.
    Name(String),
    /// An index in a list.
    Index(u64),
}

/// `{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationErrorBody {
    /// Every problem found.
    pub detail: Vec<FieldError>,
}

/// Builds a `loc` from its parts.
#[macro_export]
macro_rules! loc {
    ($($part:expr),* $(,)?) => { vec![$(serde_json::Value::from($part)),*] };
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 422: the input does not parse.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 401 with `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403: authenticated, but the role (or, for the console's cookie, the CSRF token) does not allow it.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404.
    #[error("{0}")]
    NotFound(&'static str),
    /// 409.
    #[error("{0}")]
    Conflict(&'static str),
    /// 413: body above the limit.
    #[error("request body too large")]
    PayloadTooLarge,
    /// 415: not JSON.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 400: a body that could not be read at all.
    #[error("{0}")]
    BadRequest(&'static str),
    /// 429 with `Retry-After` (whole seconds, at least 1): a rate limit or the login throttle.
    #[error("too many requests")]
    TooManyRequests {
        /// Seconds until a retry can succeed.
        retry_after_secs: u64,
    },
    /// 429: the user has as many event streams open as `SSE_MAX_STREAMS_PER_USER` allows.
    #[error("too many open event streams")]
    TooManyStreams(u32),
    /// 503: the process holds as many event streams as `SSE_MAX_STREAMS` allows.
    #[error("event streams full")]
    StreamsFull,
    /// 503 with `Retry-After`: PostgreSQL or Redis is unreachable or too slow. A create answered so was not
    /// created.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// 503 with `Retry-After`: as many requests wait for a database statement as `BATCH_MAX_WAITING` allows;
    /// refused before anything was written.
    #[error("too many requests waiting for the database")]
    Busy,
    /// 500: a bug. Logged with its cause; the client sees a generic message.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A single validation problem.
    pub fn field(loc: Vec<Value>, kind: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(loc, kind, msg)])
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(err.into())
        }
    }
}

impl From<BatchError> for ApiError {
    fn from(err: BatchError) -> Self {
        match err {
            BatchError::Database(err) if is_unavailable(&err) => Self::Unavailable(err.to_string()),
            BatchError::Database(err) => Self::Internal(err.into()),
            BatchError::Expired => Self::Unavailable(
                "the request's time ran out before its statement committed".into(),
            ),
            BatchError::Full => Self::Busy,
            BatchError::Abandoned => Self::Internal(err.into()),
        }
    }
}

/// Errors that mean "the database is down, overloaded or too slow", as opposed to a bug.
fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57: operator intervention
            // (57014 is a statement timeout); 40001/40P01: serialization failure, deadlock.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}

/// The `Retry-After` of a 503 for an outage or an overload, in seconds: a hint to space retries, not a promise.
const RETRY_AFTER_UNAVAILABLE: u64 = 1;

fn detail(status: StatusCode, detail: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            detail: detail.into(),
        }),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Validation(errors) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(ValidationErrorBody { detail: errors }),
            )
                .into_response(),
            Self::Unauthorized(msg) => {
                let mut response = detail(StatusCode::UNAUTHORIZED, msg);
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                response
            }
            Self::Forbidden(msg) => detail(StatusCode::FORBIDDEN, msg),
            Self::NotFound(msg) => detail(StatusCode::NOT_FOUND, msg),
            Self::Conflict(msg) => detail(StatusCode::CONFLICT, msg),
            Self::PayloadTooLarge => detail(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body is larger than 64 KiB",
            ),
            Self::UnsupportedMediaType => detail(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected a request with `Content-Type: application/json`",
            ),
            Self::BadRequest(msg) => detail(StatusCode::BAD_REQUEST, msg),
            Self::TooManyRequests { retry_after_secs } => {
                let mut response = detail(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Rate limit exceeded. Try again later.",
                );
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs.max(1)),
                );
                response
            }
            Self::TooManyStreams(max) => {
                let mut response = detail(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "Too many open event streams: at most {max} per user. Close one first."
                    ),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1));
                response
            }
            Self::StreamsFull => {
                let mut response = detail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "This server holds as many event streams as it can. Try again later.",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(5));
                response
            }
            Self::Unavailable(cause) => {
                tracing::warn!(%cause, "dependency unavailable");
                let mut response = detail(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable");
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(RETRY_AFTER_UNAVAILABLE),
                );
                response
            }
            Self::Busy => {
                let mut response = detail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Too many requests are waiting for the database. Try again later.",
                );
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(RETRY_AFTER_UNAVAILABLE),
                );
                response
            }
            Self::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                detail(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
            }
        }
    }
}

/// Handler result.
pub type ApiResult<T> = Result<T, ApiError>;
