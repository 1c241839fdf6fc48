//! The HTTP side of the client: where the API is (flag > environment >
//! config file > default), and one request helper that turns transport
//! failures and problem documents into [`Error`]s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, Url};
use serde::Deserialize;
use serde_json::Value;

use super::Error;
use crate::config::{ClientArgs, OutputFormat};

/// Where the API is when nothing says otherwise: `weft dev`'s address.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";

/// How long one request may take; the API answers every call in milliseconds
/// unless the database is in trouble.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client config file (`$WEFT_CONFIG`, else `~/.config/weft/client.json`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub api_url: Option<String>,
    pub token: Option<String>,
}

/// Resolved client settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub api_url: Url,
    pub token: Option<String>,
    pub output: OutputFormat,
}

impl Settings {
    /// Applies the precedence: flag or environment (clap merges those two),
    /// then the config file, then the default. A config file named by
    /// `--config` / `WEFT_CONFIG` must exist; the default one may not.
    pub fn resolve(args: &ClientArgs) -> Result<Settings, Error> {
        let file = match (&args.config, &args.default_config) {
            (Some(path), _) => read_config(path)?,
            (None, Some(path)) if path.exists() => read_config(path)?,
            (None, _) => ConfigFile::default(),
        };
        let raw = args
            .api_url
            .clone()
            .or(file.api_url)
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        Ok(Settings {
            api_url: parse_api_url(&raw)?,
            token: args.token.clone().or(file.token).filter(|t| !t.is_empty()),
            output: args.output,
        })
    }
}

fn read_config(path: &Path) -> Result<ConfigFile, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Parses the API's base URL: http, or https (rustls, webpki roots).
pub fn parse_api_url(raw: &str) -> Result<Url, Error> {
    let url = Url::parse(raw).map_err(|e| Error::Usage(format!("--api-url {raw:?}: {e}")))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(Error::Usage(format!(
            "--api-url {raw}: unsupported scheme {other:?}, expected http or https"
        ))),
    }
}

/// An answer of the API: its status and JSON body (`Null` when empty, a JSON
/// string when the body is not JSON, as from a proxy).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// A request body.
pub enum Body {
    Empty,
    Json(Value),
    Raw {
        bytes: Vec<u8>,
        content_type: &'static str,
    },
}

/// The API client.
pub struct Api {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Api {
    pub fn new(settings: &Settings) -> Result<Api, Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("weft/", env!("CARGO_PKG_VERSION")))
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|source| Error::Http {
                url: settings.api_url.to_string(),
                source,
            })?;
        Ok(Api {
            http,
            base: settings.api_url.clone(),
            token: settings.token.clone(),
        })
    }

    /// The URL of a path under the base URL; each segment is percent-encoded.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends a request and returns the answer whatever its status.
    pub async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Body,
    ) -> Result<Reply, Error> {
        let url = self.url(segments);
        let mut request = self.http.request(method, url.clone());
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        request = match body {
            Body::Empty => request,
            Body::Json(value) => request.json(&value),
            Body::Raw {
                bytes,
                content_type,
            } => request.header(CONTENT_TYPE, content_type).body(bytes),
        };
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Reply { status, body })
    }

    /// Sends a request; any status but 2xx is an [`Error::Problem`].
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Body,
    ) -> Result<Reply, Error> {
        let reply = self.send(method, segments, query, body).await?;
        if (200..300).contains(&reply.status) {
            Ok(reply)
        } else {
            Err(Error::Problem {
                status: reply.status,
                body: reply.body,
            })
        }
    }

    pub async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Value, Error> {
        Ok(self
            .call(Method::GET, segments, query, Body::Empty)
            .await?
            .body)
    }

    pub async fn post(&self, segments: &[&str], body: Body) -> Result<Reply, Error> {
        self.call(Method::POST, segments, &[], body).await
    }

    fn transport_error(&self, source: reqwest::Error) -> Error {
        let url = self.base.to_string();
        if source.is_connect() {
            Error::Unreachable {
                url,
                reason: root_cause(&source),
            }
        } else if source.is_timeout() {
            Error::Unreachable {
                url,
                reason: format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
            }
        } else {
            Error::Http { url, source }
        }
    }
}

/// The innermost error's text (`Connection refused (os error 111)`), which is
/// what a person needs; reqwest's outer layers only say "error sending request".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// A content type for a template file, by extension (the API reads both).
pub fn template_content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        _ => "application/yaml",
    }
}

/// Reads a JSON argument: inline JSON, `@FILE`, or `@-` for stdin.
pub fn json_argument(flag: &str, raw: &str) -> Result<Value, Error> {
    let (text, origin) = match raw.strip_prefix('@') {
        Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|source| {
                Error::Read {
                    path: PathBuf::from("-"),
                    source,
                }
            })?;
            (text, "stdin".to_owned())
        }
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: PathBuf::from(path),
                source,
            })?;
            (text, path.to_owned())
        }
        None => (raw.to_owned(), "the argument".to_owned()),
    };
    serde_json::from_str(&text)
        .map_err(|e| Error::Usage(format!("{flag}: {origin} is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(
        api_url: Option<&str>,
        config: Option<PathBuf>,
        default: Option<PathBuf>,
    ) -> ClientArgs {
        ClientArgs {
            api_url: api_url.map(str::to_owned),
            token: None,
            output: OutputFormat::Table,
            config,
            default_config: default,
        }
    }

    fn write_config(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("weft-client-{}-{name}.json", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn precedence_is_flag_then_file_then_default() {
        let file = write_config(
            "precedence",
            r#"{"api_url": "http://file:1/", "token": "t0k"}"#,
        );
        let missing = std::env::temp_dir().join("weft-client-no-such-file.json");

        let s = Settings::resolve(&args(Some("http://flag:2"), Some(file.clone()), None)).unwrap();
        assert_eq!(s.api_url.as_str(), "http://flag:2/");
        assert_eq!(s.token.as_deref(), Some("t0k"));

        let s = Settings::resolve(&args(None, None, Some(file.clone()))).unwrap();
        assert_eq!(s.api_url.as_str(), "http://file:1/");

        let s = Settings::resolve(&args(None, None, Some(missing.clone()))).unwrap();
        assert_eq!(s.api_url.as_str(), "http://127.0.0.1:8080/");
        assert_eq!(s.token, None);

        let named_but_missing = Settings::resolve(&args(None, Some(missing), None));
        assert!(matches!(named_but_missing, Err(Error::Read { .. })));

        let typo = write_config("typo", r#"{"api-url": "http://x"}"#);
        let err = Settings::resolve(&args(None, Some(typo.clone()), None)).unwrap_err();
        assert!(err.to_string().contains("unknown field `api-url`"), "{err}");
        for path in [file, typo] {
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn only_http_and_https_urls() {
        assert!(parse_api_url("http://127.0.0.1:8080").is_ok());
        assert!(parse_api_url("https://weft.example").is_ok());
        let ftp = parse_api_url("ftp://weft.example").unwrap_err().to_string();
        assert!(ftp.contains("expected http or https"), "{ftp}");
        assert!(parse_api_url("127.0.0.1:8080").is_err());
    }

    #[test]
    fn urls_keep_a_base_path_and_encode_segments() {
        let settings = Settings {
            api_url: parse_api_url("http://host/weft/").unwrap(),
            token: None,
            output: OutputFormat::Table,
        };
        let api = Api::new(&settings).unwrap();
        assert_eq!(
            api.url(&["v1", "dlq", "weft_dlq_demo:4", "replay"])
                .as_str(),
            "http://host/weft/v1/dlq/weft_dlq_demo:4/replay"
        );
        assert_eq!(
            api.url(&["v1", "tasks", "a/b?c"]).as_str(),
            "http://host/weft/v1/tasks/a%2Fb%3Fc"
        );
    }

    #[test]
    fn json_arguments() {
        assert_eq!(
            json_argument("--input", r#"{"a":1}"#).unwrap(),
            serde_json::json!({"a": 1})
        );
        let file = write_config("input", "[1, 2]");
        assert_eq!(
            json_argument("--input", &format!("@{}", file.display())).unwrap(),
            serde_json::json!([1, 2])
        );
        std::fs::remove_file(file).unwrap();
        let err = json_argument("--input", "{nope").unwrap_err().to_string();
        assert!(
            err.starts_with("--input: the argument is not valid JSON"),
            "{err}"
        );
    }
}
