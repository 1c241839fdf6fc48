//! Extractors that turn every kind of unreadable request (body, query
//! string, path) into an [`ApiError`] problem document, never axum's
//! plain-text rejections; and the limits they enforce.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::{ApiError, malformed, too_large};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Largest page of a listing.
pub const MAX_PAGE: i64 = 500;

/// A page limit from the query string: `default` when absent, a 400 when
/// outside 1 to [`MAX_PAGE`].
pub fn page_limit(limit: Option<i64>, default: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(malformed(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ))
    }
}

/// The request body as bytes, under [`MAX_BODY_BYTES`]; a larger body is a
/// 413 naming the limit.
#[derive(Debug)]
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(Body)
            .map_err(|rejection: BytesRejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    too_large(
                        "",
                        format!(
                            "the request body exceeds the limit of {} MiB ({MAX_BODY_BYTES} bytes)",
                            MAX_BODY_BYTES / (1024 * 1024)
                        ),
                    )
                } else {
                    malformed("", format!("cannot read the request body: {rejection}"))
                }
            })
    }
}

/// A query string deserialized into `T` (whose fields deny unknown
/// parameters); a refusal is a 400 naming the parameter.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(QueryParams)
            .map_err(|e| {
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                let path = match path.as_str() {
                    // Unknown and duplicate parameters fail before a field is entered.
                    "." => quoted_name(&message).unwrap_or_default(),
                    _ => path,
                };
                malformed(path, format!("invalid query string: {message}"))
            })
    }
}

/// The first name between backticks in a serde message
/// (``unknown field `foo`, expected one of …``).
fn quoted_name(message: &str) -> Option<String> {
    let (_, rest) = message.split_once('`')?;
    let (name, _) = rest.split_once('`')?;
    Some(name.to_owned())
}

/// Path parameters; a refusal (such as bytes that are not UTF-8) is a 400.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| PathParams(value))
            .map_err(|rejection| malformed("", format!("invalid path: {}", rejection.body_text())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_serde_messages() {
        assert_eq!(
            quoted_name("unknown field `lmit`, expected one of `limit`").as_deref(),
            Some("lmit")
        );
        assert_eq!(
            quoted_name("duplicate field `limit`").as_deref(),
            Some("limit")
        );
        assert_eq!(quoted_name("invalid digit found in string"), None);
    }
}
