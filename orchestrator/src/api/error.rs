//! The one HTTP error type, [`ApiError`], with one status mapping: every
//! error response is an `application/problem+json` document naming what is
//! wrong, and never echoes database text. Also the body checks every route
//! shares: JSON parsing with the failing path, and text PostgreSQL can store.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::error;
use utoipa::ToSchema;

use super::auth::Scope;
use crate::store::StoreError;

/// A problem document (RFC 9457): every error response of the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "type": "https://weft.dev/problems/invalid-request",
    "title": "invalid request",
    "status": 422,
    "detail": "invalid namespace \"Shop\": must match ^[a-z][a-z0-9_]{0,29}$",
    "errors": [{"path": "tasks[3].namespace", "message": "invalid namespace \"Shop\": must match ^[a-z][a-z0-9_]{0,29}$"}]
}))]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The offending parts of the request, for invalid requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub errors: Option<Vec<FieldError>>,
}

/// One offending part of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// Where: a JSON path into the body (`tasks[3].namespace`), a query or
    /// path parameter name, or empty for the request as a whole.
    pub path: String,
    pub message: String,
}

/// The one HTTP error type: a status and a problem document.
#[derive(Debug)]
pub enum ApiError {
    /// The request is malformed (400), too large (413) or invalid (422);
    /// `path` names the offending part.
    Invalid {
        status: StatusCode,
        path: String,
        message: String,
    },
    /// No usable bearer token; `presented` when one was sent but is unknown.
    Unauthorized {
        presented: bool,
    },
    /// The token is valid but its scope is below what the route needs.
    Forbidden {
        needed: Scope,
    },
    NotFound(String),
    Conflict(String),
    Unavailable,
    Internal,
}

/// A 422: the request is well-formed but a value is not acceptable.
pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        path: path.into(),
        message: message.into(),
    }
}

/// A 400: the request cannot be read (syntax, query string, path).
pub fn malformed(path: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        status: StatusCode::BAD_REQUEST,
        path: path.into(),
        message: message.into(),
    }
}

/// A 413 naming the limit that was exceeded.
pub fn too_large(path: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        path: path.into(),
        message: message.into(),
    }
}

impl ApiError {
    /// Prefixes the path of an invalid-request error, for items of a batch.
    pub fn within(self, prefix: &str) -> ApiError {
        match self {
            ApiError::Invalid {
                status,
                path,
                message,
            } => ApiError::Invalid {
                status,
                path: match path.as_str() {
                    "" => prefix.to_owned(),
                    _ => format!("{prefix}.{path}"),
                },
                message,
            },
            other => other,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TemplateConflict { .. }
            | StoreError::IdempotencyConflict
            | StoreError::TemplateChanging(_) => ApiError::Conflict(e.to_string()),
            StoreError::TemplateNotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::CorruptTemplate { .. } => {
                error!(error = %e, "stored template unreadable");
                ApiError::Internal
            }
            StoreError::Database(db) => {
                error!(error = %db, "database error serving a request");
                if matches!(db, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) {
                    ApiError::Unavailable
                } else {
                    ApiError::Internal
                }
            }
        }
    }
}

const REALM: &str = "Bearer realm=\"weft\"";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut challenge = None;
        let (status, title, detail, path) = match self {
            ApiError::Invalid {
                status,
                path,
                message,
            } => {
                let title = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "request too large"
                } else {
                    "invalid request"
                };
                (status, title, message, Some(path))
            }
            ApiError::Unauthorized { presented } => {
                let (value, detail) = if presented {
                    (
                        format!("{REALM}, error=\"invalid_token\""),
                        "the bearer token is not valid",
                    )
                } else {
                    (
                        REALM.to_owned(),
                        "this route needs an Authorization: Bearer <token> header",
                    )
                };
                challenge = Some(value);
                (
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    detail.to_owned(),
                    None,
                )
            }
            ApiError::Forbidden { needed } => {
                challenge = Some(format!(
                    "{REALM}, error=\"insufficient_scope\", scope=\"{needed}\""
                ));
                (
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("this route needs a token with the {needed} scope"),
                    None,
                )
            }
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not found", m, None),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m, None),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unreachable; retry later".to_owned(),
                None,
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
                "an internal error occurred; see the server log".to_owned(),
                None,
            ),
        };
        let problem = Problem {
            kind: format!("https://weft.dev/problems/{}", title.replace(' ', "-")),
            title: title.to_owned(),
            status: status.as_u16(),
            errors: path.map(|path| {
                vec![FieldError {
                    path,
                    message: detail.clone(),
                }]
            }),
            detail,
        };
        // A problem document always serializes.
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(value) = challenge.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// Parses a JSON body, naming the offending field on failure: 400 when it is
/// not JSON, 422 when it is JSON of the wrong shape.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        // Characters after the value are a syntax error too.
        Ok(value) => de
            .end()
            .map(|()| value)
            .map_err(|e| malformed("", format!("body is not valid JSON: {e}"))),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // `.` is the document itself, `?` a key the parser did not reach.
            let path = match path.as_str() {
                "." | "?" => String::new(),
                _ => path,
            };
            if inner.is_syntax() || inner.is_eof() {
                Err(malformed(path, format!("body is not valid JSON: {inner}")))
            } else {
                Err(invalid(path, inner.to_string()))
            }
        }
    }
}

/// Parses a JSON body that must be an object into `T`: 400 when it is not
/// JSON, 422 naming the field when it does not fit. (serde would fill a
/// struct from an array by position; the API takes objects only.)
pub fn parse_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_object(parse_json::<Value>(body)?)
}

/// `T` from a JSON value that must be an object; a 422 naming the field.
pub fn from_object<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(invalid("", "must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        invalid(path, e.into_inner().to_string())
    })
}

/// Refuses JSON that PostgreSQL cannot store: U+0000 in a string or a key
/// (jsonb and text refuse it). A 422 naming where it is, under `path`.
pub fn storable(value: &Value, path: &str) -> Result<(), ApiError> {
    fn has_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    fn nul_at(value: &Value, at: String) -> Option<String> {
        match value {
            Value::String(s) if s.contains('\0') => Some(at),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| nul_at(v, format!("{at}[{i}]"))),
            Value::Object(map) => map.iter().find_map(|(k, v)| {
                let at = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                if k.contains('\0') {
                    Some(at)
                } else {
                    nul_at(v, at)
                }
            }),
            _ => None,
        }
    }
    // The cheap scan first: paths are built only for a refusal.
    if !has_nul(value) {
        return Ok(());
    }
    let at = nul_at(value, path.to_owned()).unwrap_or_default();
    Err(invalid(
        at,
        "text cannot contain the character U+0000 (PostgreSQL cannot store it)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_postgresql_cannot_store_is_refused_where_it_is() {
        let path = |value: serde_json::Value| match storable(&value, "input") {
            Ok(()) => None,
            Err(ApiError::Invalid { path, .. }) => Some(path),
            Err(other) => panic!("{other:?}"),
        };
        assert_eq!(path(serde_json::json!({"a": [1, "x", {"b": "ok"}]})), None);
        assert_eq!(
            path(serde_json::json!({"a": [1, "x", {"b": "n\0l"}]})).as_deref(),
            Some("input.a[2].b")
        );
        assert_eq!(
            path(serde_json::json!({"k\0": 1})).as_deref(),
            Some("input.k\u{0}")
        );
        assert_eq!(path(serde_json::json!("\0")).as_deref(), Some("input"));
    }

    #[test]
    fn json_errors_name_the_path_and_the_kind() {
        type Body = std::collections::HashMap<String, Vec<std::collections::HashMap<String, i32>>>;
        let check = |body: &str, status: StatusCode, path: &str| match parse_json::<Body>(
            body.as_bytes(),
        ) {
            Err(ApiError::Invalid {
                status: s, path: p, ..
            }) => assert_eq!((s, p.as_str()), (status, path), "{body}"),
            other => panic!("{body}: {other:?}"),
        };
        check("{", StatusCode::BAD_REQUEST, "");
        check("{} x", StatusCode::BAD_REQUEST, "");
        check(
            r#"{"tasks": [{"n": 1}, {"n": "x"}]}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "tasks[1].n",
        );
        check("[]", StatusCode::UNPROCESSABLE_ENTITY, "");
        assert!(parse_json::<Body>(br#"{"tasks": [{"n": 1}]} "#).is_ok());
    }
}
