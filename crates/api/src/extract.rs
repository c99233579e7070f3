//! Our own extractors, so that every rejection has the contract's shape: 422 in FastAPI's form for input that
//! does not parse (axum would answer 400 for malformed JSON or a bad path), 415 for a body that is not JSON,
//! 413 above the body limit.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{HeaderMap, header, request::Parts},
};
use orders_core::domain::Invalid;
use orders_core::domain::{IdempotencyKey, OrderId};
use serde::de::DeserializeOwned;
use serde_json::{Value, value::RawValue};
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

impl<S: Send + Sync, T: FromFields> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = read_body(req, state).await?;
        parse_fields(&bytes).map(Json)
    }
}

/// A JSON body that may also be absent (an empty body with no `Content-Type`).
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: FromFields> FromRequest<S> for OptionalJson<T> {
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
        parse_fields(&bytes).map(|value| OptionalJson(Some(value)))
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

/// A request body that is read field by field, so that one 422 lists every problem with it, as FastAPI does:
/// each missing field, each field of the wrong type or with a bad value, each unknown field. Implementations take
/// each field from [`Fields`] and parse it into its domain type there.
pub trait FromFields: Sized {
    /// Takes every field; `None` if any was missing or bad (each problem is recorded in `fields`).
    fn from_fields(fields: &mut Fields) -> Option<Self>;
}

/// A JSON object's fields, as the client wrote them, and the problems found so far.
#[derive(Debug)]
pub struct Fields {
    entries: Vec<(String, Box<RawValue>)>,
    errors: Vec<FieldError>,
}

impl Fields {
    /// Reads a JSON object. Malformed JSON or anything but an object is a 422 of its own: there are no fields
    /// to say more about.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let value: Box<RawValue> = serde_json::from_slice(bytes).map_err(|err| {
            ApiError::Validation(vec![FieldError::new(
                loc!["body", err.column()],
                "json_invalid",
                format!("JSON decode error: {}", bare_message(&err.to_string())),
            )])
        })?;
        let entries = serde_json::from_str::<Entries>(value.get())
            .map_err(|_| {
                ApiError::field(
                    loc!["body"],
                    "model_attributes_type",
                    "Input should be a valid dictionary or object to extract fields from",
                )
            })?
            .0;
        Ok(Self {
            entries,
            errors: Vec::new(),
        })
    }

    /// Takes field `name` as a `T`, recording a problem if it is missing, given twice or not a `T`.
    pub fn take<T: DeserializeOwned>(&mut self, name: &str) -> Option<T> {
        let raw = self.take_raw(name)?;
        match serde_json::from_str(raw.get()) {
            Ok(value) => Some(value),
            Err(err) => {
                let message = bare_message(&err.to_string());
                self.errors.push(describe_data_error(
                    "body",
                    vec![Value::from(name)],
                    &message,
                ));
                None
            }
        }
    }

    /// Whether the body has a field `name` (for bodies with alternative fields).
    pub fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|(field, _)| field == name)
    }

    /// Takes field `name` as the JSON text the client sent, recording a problem if it is missing or given twice.
    pub fn take_raw(&mut self, name: &str) -> Option<Box<RawValue>> {
        let mut found = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i].0 == name {
                found.push(self.entries.remove(i).1);
            } else {
                i += 1;
            }
        }
        match found.len() {
            0 => {
                self.errors.push(FieldError::new(
                    loc!["body", name],
                    "missing",
                    "Field required",
                ));
                None
            }
            1 => found.pop(),
            _ => {
                self.errors.push(FieldError::new(
                    loc!["body", name],
                    "value_error",
                    "Give this field once",
                ));
                None
            }
        }
    }

    /// Records the problem of a field that was read but did not parse into its domain type.
    pub fn check<T>(&mut self, name: &str, parsed: Result<T, Invalid>) -> Option<T> {
        parsed
            .map_err(|invalid| {
                self.errors
                    .push(FieldError::invalid(loc!["body", name], invalid))
            })
            .ok()
    }

    /// Every problem found, unknown fields last; `Ok` if there was none.
    fn finish(mut self) -> Result<(), ApiError> {
        for (name, _) in self.entries.drain(..) {
            self.errors.push(FieldError::new(
                loc!["body", name],
                "extra_forbidden",
                "Extra inputs are not permitted",
            ));
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.errors))
        }
    }
}

/// Reads a body with [`FromFields`].
pub fn parse_fields<T: FromFields>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut fields = Fields::parse(bytes)?;
    let parsed = T::from_fields(&mut fields);
    fields.finish()?;
    parsed.ok_or_else(|| anyhow::anyhow!("a body was refused without saying why").into())
}

/// A JSON object's entries in the order written, duplicates kept (serde's maps would keep only the last).
struct Entries(Vec<(String, Box<RawValue>)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(Visit)
    }
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
        if ["u8", "u16", "u32", "u64", "i32", "i64"]
            .iter()
            .any(|int| message.ends_with(&format!("expected {int}")))
        {
            return FieldError::new(loc, "int_type", "Input should be a valid integer");
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
    use super::*;

    #[derive(Debug)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    impl FromFields for Body {
        fn from_fields(fields: &mut Fields) -> Option<Self> {
            let name = fields.take("name");
            let count = fields.take("count");
            Some(Self {
                name: name?,
                count: count?,
            })
        }
    }

    /// Every problem, as (loc, type).
    fn errors_of(json: &str) -> Vec<(Vec<Value>, String)> {
        match parse_fields::<Body>(json.as_bytes()) {
            Err(ApiError::Validation(errors)) => {
                errors.into_iter().map(|e| (e.loc, e.kind)).collect()
            }
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn one(loc: Vec<Value>, kind: &str) -> (Vec<Value>, String) {
        (loc, kind.to_owned())
    }

    #[test]
    fn malformed_json_and_non_objects_are_one_problem() {
        assert_eq!(errors_of("{\"name\": ")[0].1, "json_invalid");
        assert_eq!(errors_of("")[0].1, "json_invalid");
        assert_eq!(
            errors_of("[1, 2]"),
            [one(loc!["body"], "model_attributes_type")]
        );
        assert_eq!(
            errors_of("null"),
            [one(loc!["body"], "model_attributes_type")]
        );
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        assert_eq!(
            errors_of("{}"),
            [
                one(loc!["body", "name"], "missing"),
                one(loc!["body", "count"], "missing")
            ]
        );
        assert_eq!(
            errors_of(r#"{"name": 5, "count": "x", "extra": 1, "more": 2}"#),
            [
                one(loc!["body", "name"], "string_type"),
                one(loc!["body", "count"], "int_type"),
                one(loc!["body", "extra"], "extra_forbidden"),
                one(loc!["body", "more"], "extra_forbidden"),
            ]
        );
        assert_eq!(
            errors_of(r#"{"name": "a", "name": "b", "count": 1}"#),
            [one(loc!["body", "name"], "value_error")]
        );
    }

    #[test]
    fn a_good_body_parses() {
        let body = parse_fields::<Body>(br#"{"count": 3, "name": "x"}"#).unwrap();
        assert_eq!((body.name.as_str(), body.count), ("x", 3));
    }
}
