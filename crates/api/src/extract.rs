//! Our own extractors, so that every rejection has the contract's shape: 422 in FastAPI's form for input that
//! does not parse (axum would answer 400 for malformed JSON or a bad path), 415 for a body that is not JSON,
//! 413 above the body limit.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{HeaderMap, header, request::Parts},
};
use orders_core::domain::{IdempotencyKey, OrderId};
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use crate::{
    error::{ApiError, FieldError},
    loc,
};

/// The most a request body may hold.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A JSON body, deserialised with FastAPI-style errors.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(Json)
    }
}

/// A JSON body that may also be absent (an empty body with no `Content-Type`).
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = is_json(req.headers());
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) || (json && bytes.trim_ascii() == b"null") {
            return Ok(OptionalJson(None));
        }
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse_json(&bytes).map(|value| OptionalJson(Some(value)))
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest("Failed to read the request body")
        }
    })
}

/// Parses a JSON body; a syntax error or a wrong shape becomes a 422 that points at the culprit.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would happily fill a struct from a JSON array: only an object is a valid body.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(ApiError::field(
            loc!["body"],
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
        ));
    }
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = path_segments(err.path());
        let inner = err.into_inner();
        let error = if inner.is_syntax() || inner.is_eof() {
            FieldError::new(
                loc!["body", inner.column()],
                "json_invalid",
                format!("JSON decode error: {}", bare_message(&inner.to_string())),
            )
        } else {
            describe_data_error("body", path, &bare_message(&inner.to_string()))
        };
        ApiError::Validation(vec![error])
    })
}

/// The query string, deserialised with FastAPI-style errors. Unknown parameters are ignored.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer = serde_urlencoded::Deserializer::new(form_urlencoded_parse(query));
        serde_path_to_error::deserialize(deserializer)
            .map(Query)
            .map_err(|err| {
                let path = path_segments(err.path());
                let message = err.into_inner().to_string();
                ApiError::Validation(vec![describe_data_error("query", path, &message)])
            })
    }
}

fn form_urlencoded_parse(query: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.as_bytes())
}

/// The `{id}` of `/orders/{id}`: a UUID, or a 422.
#[derive(Debug, Clone, Copy)]
pub struct OrderPath(pub OrderId);

impl<S: Send + Sync> FromRequestParts<S> for OrderPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| {
                    ApiError::field(
                        loc!["path", "id"],
                        "uuid_parsing",
                        "Input should be a valid UUID",
                    )
                })?;
        Uuid::parse_str(&raw)
            .map(|id| OrderPath(OrderId(id)))
            .map_err(|err| {
                ApiError::field(
                    loc!["path", "id"],
                    "uuid_parsing",
                    format!("Input should be a valid UUID, {err}"),
                )
            })
    }
}

/// The optional `Idempotency-Key` header.
#[derive(Debug, Clone)]
pub struct IdempotencyKeyHeader(pub Option<IdempotencyKey>);

/// The header's name.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKeyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(IDEMPOTENCY_KEY) else {
            return Ok(IdempotencyKeyHeader(None));
        };
        let raw = value.to_str().unwrap_or("\u{0}");
        IdempotencyKey::parse(raw)
            .map(|key| IdempotencyKeyHeader(Some(key)))
            .map_err(|invalid| {
                ApiError::Validation(vec![FieldError::invalid(
                    loc!["header", IDEMPOTENCY_KEY],
                    invalid,
                )])
            })
    }
}

fn path_segments(path: &serde_path_to_error::Path) -> Vec<Value> {
    path.iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Seq { index } => Some(Value::from(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Value::from(key.as_str())),
            serde_path_to_error::Segment::Enum { variant } => Some(Value::from(variant.as_str())),
            serde_path_to_error::Segment::Unknown => None,
        })
        .collect()
}

/// serde_json appends " at line L column C"; the location is already in `loc`.
fn bare_message(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// The text between the first pair of backticks.
fn quoted(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

/// Turns serde's message into pydantic's vocabulary, so clients of the original service keep working.
fn describe_data_error(root: &str, mut loc: Vec<Value>, message: &str) -> FieldError {
    loc.insert(0, Value::from(root));
    if let Some(rest) = message.strip_prefix("missing field ") {
        loc.extend(quoted(rest).map(Value::from));
        return FieldError::new(loc, "missing", "Field required");
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        // serde_path_to_error already ends the path with the unknown key.
        let name = quoted(rest).map(Value::from);
        if name.is_some() && loc.last() != name.as_ref() {
            loc.extend(name);
        }
        return FieldError::new(loc, "extra_forbidden", "Extra inputs are not permitted");
    }
    if let Some(rest) = message.strip_prefix("duplicate field ") {
        loc.extend(quoted(rest).map(Value::from));
        return FieldError::new(loc, "value_error", "Give this parameter once");
    }
    if message.starts_with("unknown variant") {
        return FieldError::new(
            loc,
            "enum",
            "Input should be 'PENDING', 'PROCESSING', 'COMPLETED' or 'CANCELLED'",
        );
    }
    if message.starts_with("invalid type") || message.starts_with("invalid value") {
        if message.ends_with("expected a string") {
            return FieldError::new(loc, "string_type", "Input should be a valid string");
        }
        if message.ends_with("expected f64") {
            return FieldError::new(loc, "float_type", "Input should be a valid number");
        }
        if message.contains("expected struct") || message.contains("expected a map") {
            return FieldError::new(
                loc,
                "model_attributes_type",
                "Input should be a valid dictionary or object to extract fields from",
            );
        }
    }
    if message.contains("invalid digit")
        || message.contains("number too")
        || message.contains("empty string")
    {
        return FieldError::new(
            loc,
            "int_parsing",
            "Input should be a valid integer, unable to parse string as an integer",
        );
    }
    FieldError::new(loc, "value_error", message)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        amount: f64,
    }

    fn error_of(json: &str) -> FieldError {
        match parse_json::<Body>(json.as_bytes()) {
            Err(ApiError::Validation(mut errors)) => errors.remove(0),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn syntax_errors_are_json_invalid() {
        assert_eq!(error_of("{\"name\": ").kind, "json_invalid");
        assert_eq!(error_of("").kind, "json_invalid");
    }

    #[test]
    fn each_shape_error_points_at_its_field() {
        let e = error_of(r#"{"name": "x"}"#);
        assert_eq!(
            (e.loc, e.kind.as_str()),
            (loc!["body", "amount"], "missing")
        );
        let e = error_of(r#"{"name": "x", "amount": 1, "extra": 1}"#);
        assert_eq!(
            (e.loc, e.kind.as_str()),
            (loc!["body", "extra"], "extra_forbidden")
        );
        let e = error_of(r#"{"name": 5, "amount": 1}"#);
        assert_eq!(
            (e.loc, e.kind.as_str()),
            (loc!["body", "name"], "string_type")
        );
        let e = error_of(r#"{"name": "x", "amount": "1"}"#);
        assert_eq!(
            (e.loc, e.kind.as_str()),
            (loc!["body", "amount"], "float_type")
        );
        let e = error_of(r#"[1, 2]"#);
        assert_eq!(
            (e.loc, e.kind.as_str()),
            (loc!["body"], "model_attributes_type")
        );
    }
}
