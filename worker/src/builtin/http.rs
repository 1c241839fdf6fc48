//! `builtin.http` `{method?, url, headers?, body?}`: calls a URL and returns
//! `{status, body}`. Server errors, 408 and 429 are retryable (honouring a
//! `Retry-After` in seconds), other 4xx are permanent, and a failed connection
//! is retryable: the server may be back on the next attempt.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

use super::{Config, kind, tail};
use crate::handler::{StepContext, StepError};

/// How much of an error response's body goes into the failure message.
const BODY_TAIL: usize = 512;

pub async fn http(client: reqwest::Client, ctx: StepContext) -> Result<Value, StepError> {
    let request = Request::parse(&ctx)?;
    let what = format!("{} {}", request.method, request.url);
    let mut builder = client
        .request(request.method, request.url)
        .headers(request.headers);
    if let Some(body) = request.body {
        builder = builder.json(&body);
    }
    let call = async {
        let response = builder.send().await.map_err(|e| {
            let message = format!("{what}: {}", describe(&e));
            // A request that cannot even be built will not build next time;
            // anything on the way to the server may be gone next time.
            if e.is_builder() {
                StepError::permanent(message)
            } else {
                StepError::retryable(message)
            }
        })?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(|e| {
            StepError::retryable(format!("{what}: reading the response: {}", describe(&e)))
        })?;
        Ok::<_, StepError>((status, retry_after, bytes))
    };
    let (status, retry_after, bytes) = tokio::select! {
        result = call => result?,
        () = ctx.cancellation.cancelled() => return Err(StepError::retryable(format!("{what}: cancelled"))),
    };
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    classify(status, retry_after, &what, body)
}

/// A response's verdict: success below 400, retryable when the server may
/// recover, permanent when the request itself is wrong.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    what: &str,
    body: Value,
) -> Result<Value, StepError> {
    if !status.is_client_error() && !status.is_server_error() {
        return Ok(json!({ "status": status.as_u16(), "body": body }));
    }
    let text = match &body {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let message = format!("{what}: HTTP {status}: {}", tail(&text, BODY_TAIL));
    let retryable = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT;
    Err(match (retryable, retry_after) {
        (false, _) => StepError::permanent(message),
        (true, Some(after)) => StepError::retryable_after(message, after),
        (true, None) => StepError::retryable(message),
    })
}

/// `Retry-After` in delta-seconds, the form rate limiters send.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A transport error with its causes, which reqwest keeps in the source chain.
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

struct Request {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Value>,
}

impl Request {
    fn parse(ctx: &StepContext) -> Result<Self, StepError> {
        let config = Config::new(&ctx.config, &["method", "url", "headers", "body"])?;
        let method = match config.str("method")? {
            None => Method::GET,
            Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                StepError::permanent(format!("config.method: {m:?} is not an HTTP method"))
            })?,
        };
        let url = config.required(config.str("url")?, "url", "a string")?;
        let url = Url::parse(url).map_err(|e| StepError::permanent(format!("config.url: {e}")))?;
        // Anything else would fail at connect time and be retried forever.
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(StepError::permanent(format!(
                "config.url: only http:// and https:// URLs are supported, found {}://",
                url.scheme()
            )));
        }
        let headers = match config.get("headers") {
            None => HeaderMap::new(),
            Some(Value::Object(map)) => {
                let mut headers = HeaderMap::new();
                for (name, value) in map {
                    let field = format!("config.headers.{name}");
                    let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        StepError::permanent(format!("{field}: not a valid header name"))
                    })?;
                    let value = value.as_str().ok_or_else(|| {
                        StepError::permanent(format!(
                            "{field}: expected a string, found {}",
                            kind(value)
                        ))
                    })?;
                    let value = HeaderValue::from_str(value).map_err(|_| {
                        StepError::permanent(format!("{field}: not a valid header value"))
                    })?;
                    headers.append(header, value);
                }
                headers
            }
            Some(other) => {
                return Err(StepError::permanent(format!(
                    "config.headers: expected an object, found {}",
                    kind(other)
                )));
            }
        };
        // An explicit body is sent with any method; methods that carry a
        // payload send the step's input when no body is configured.
        let body = match config.get("body") {
            Some(body) => Some(body.clone()),
            None if [Method::POST, Method::PUT, Method::PATCH].contains(&method) => {
                Some(ctx.input.clone())
            }
            None => None,
        };
        Ok(Self {
            method,
            url,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use axum::Json;
    use axum::http::StatusCode as Status;
    use axum::response::IntoResponse;
    use axum::routing::{get, post};

    use super::*;
    use crate::builtin::tests::ctx;

    /// A real server on a free local port, serving one route per behaviour.
    async fn server() -> String {
        let app = axum::Router::new()
            .route("/ok", get(|| async { Json(json!({"hello": "world"})) }))
            .route("/text", get(|| async { "plain words" }))
            .route(
                "/echo",
                post(|Json(body): Json<Value>| async move { Json(json!({"got": body})) }),
            )
            .route(
                "/unavailable",
                get(|| async { (Status::SERVICE_UNAVAILABLE, "down for maintenance") }),
            )
            .route(
                "/limited",
                get(|| async {
                    (
                        Status::TOO_MANY_REQUESTS,
                        [("retry-after", "2")],
                        "slow down",
                    )
                        .into_response()
                }),
            )
            .route(
                "/missing",
                get(|| async { (Status::NOT_FOUND, "no such thing") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    async fn call(config: Value) -> Result<Value, StepError> {
        http(reqwest::Client::new(), ctx("builtin.http", 1, config)).await
    }

    #[tokio::test]
    async fn statuses_map_to_outcomes() {
        let base = server().await;
        assert_eq!(
            call(json!({"url": format!("{base}/ok")})).await,
            Ok(json!({"status": 200, "body": {"hello": "world"}}))
        );
        assert_eq!(
            call(json!({"url": format!("{base}/text")})).await,
            Ok(json!({"status": 200, "body": "plain words"}))
        );
        assert_eq!(
            call(json!({"url": format!("{base}/unavailable")})).await,
            Err(StepError::retryable(format!(
                "GET {base}/unavailable: HTTP 503 Service Unavailable: down for maintenance"
            )))
        );
        assert_eq!(
            call(json!({"url": format!("{base}/limited")})).await,
            Err(StepError::retryable_after(
                format!("GET {base}/limited: HTTP 429 Too Many Requests: slow down"),
                Duration::from_secs(2)
            ))
        );
        assert_eq!(
            call(json!({"url": format!("{base}/missing")})).await,
            Err(StepError::permanent(format!(
                "GET {base}/missing: HTTP 404 Not Found: no such thing"
            )))
        );
    }

    #[tokio::test]
    async fn post_sends_the_body_or_the_input() {
        let base = server().await;
        let url = format!("{base}/echo");
        assert_eq!(
            call(json!({"method": "post", "url": url})).await,
            Ok(json!({"status": 200, "body": {"got": {"order": 7}}}))
        );
        assert_eq!(
            call(
                json!({"method": "POST", "url": url, "body": [1, 2], "headers": {"x-trace": "t"}})
            )
            .await,
            Ok(json!({"status": 200, "body": {"got": [1, 2]}}))
        );
    }

    #[tokio::test]
    async fn connection_errors_are_retryable() {
        // Bind then drop: a local port nobody listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let result = call(json!({"url": format!("http://{addr}/")})).await;
        assert!(
            matches!(result, Err(StepError::Retryable { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn bad_config_names_the_field() {
        let check = |config: Value, expected: &'static str| async move {
            assert_eq!(call(config).await, Err(StepError::permanent(expected)));
        };
        check(json!({}), "config.url: missing, expected a string").await;
        check(
            json!({"url": "not a url"}),
            "config.url: relative URL without a base",
        )
        .await;
        check(
            json!({"url": "ftp://example.com"}),
            "config.url: only http:// and https:// URLs are supported, found ftp://",
        )
        .await;
        check(
            json!({"url": "http://x", "method": "GE T"}),
            "config.method: \"GE T\" is not an HTTP method",
        )
        .await;
        check(
            json!({"url": "http://x", "headers": {"a": 1}}),
            "config.headers.a: expected a string, found 1",
        )
        .await;
    }
}
