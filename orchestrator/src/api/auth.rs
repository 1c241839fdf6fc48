//! Bearer-token authentication with three nested scopes.
//!
//! Operators configure tokens as `name:scope:sha256hex` entries: only the
//! SHA-256 digest of a token is ever stored, and a presented token is hashed
//! and compared with every configured digest in constant time. Which scope a
//! route needs is decided where it is registered (see `api::router`), and the
//! same registration writes the OpenAPI security requirement.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tracing::debug;

use super::error::ApiError;

/// What a token may do. Each scope includes the ones below it: `admin`
/// implies `write`, which implies `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every `GET` route.
    Read,
    /// Registering templates, creating and cancelling tasks.
    Write,
    /// Repairs: retrying and resolving steps, replaying dead letters.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Write, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configured token: its name (for logs), scope and SHA-256 digest.
#[derive(Clone)]
pub struct Token {
    pub name: String,
    pub scope: Scope,
    digest: [u8; 32],
}

impl Token {
    /// A token from its plain text, hashed here (tests, tools).
    pub fn from_secret(name: impl Into<String>, scope: Scope, secret: &str) -> Token {
        Token {
            name: name.into(),
            scope,
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Who may call the API.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Every route is open: only for an API bound to loopback (`weft dev`,
    /// tests), and only when asked for explicitly.
    Off,
    /// Every `/v1` route but the OpenAPI document needs a bearer token.
    Tokens(Arc<[Token]>),
}

impl Default for Auth {
    /// On, with no token yet: [`Auth::check`] refuses it, so an operator must
    /// either configure tokens or turn authentication off explicitly.
    fn default() -> Self {
        Auth::Tokens(Arc::from(Vec::new()))
    }
}

/// Why the token configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "API authentication is on but no token is configured: set --auth-tokens-file \
         (WEFT_AUTH_TOKENS_FILE) or WEFT_AUTH_TOKENS to `name:scope:sha256hex` entries \
         (the hash of a token: printf %s \"$TOKEN\" | sha256sum), or turn authentication \
         off with --auth off (WEFT_AUTH=off) on a loopback-only address"
    )]
    NoTokens,
    #[error("{origin}, {entry}: {message}")]
    Entry {
        origin: String,
        entry: String,
        message: String,
    },
}

impl Auth {
    /// Authentication with these tokens.
    pub fn with_tokens(tokens: Vec<Token>) -> Auth {
        Auth::Tokens(Arc::from(tokens))
    }

    /// Refuses a configuration that would lock everyone out: on, with no token.
    pub fn check(&self) -> Result<(), AuthError> {
        match self {
            Auth::Tokens(tokens) if tokens.is_empty() => Err(AuthError::NoTokens),
            _ => Ok(()),
        }
    }
}

/// Parses token entries `name:scope:sha256hex`, one per line or separated by
/// `;`; `#` starts a comment. `origin` names the source in errors (a file
/// path or a variable). Names and digests must be unique across `tokens`.
pub fn parse_tokens(text: &str, origin: &str, tokens: &mut Vec<Token>) -> Result<(), AuthError> {
    let multiline = text.lines().nth(1).is_some();
    for (line_no, line) in text.lines().enumerate() {
        let content = line.split_once('#').map_or(line, |(before, _)| before);
        let entries: Vec<&str> = content
            .split(';')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        for (i, entry) in entries.iter().enumerate() {
            let at = match (multiline, entries.len() > 1) {
                (true, true) => format!("line {}, entry {}", line_no + 1, i + 1),
                (true, false) => format!("line {}", line_no + 1),
                (false, _) => format!("entry {}", i + 1),
            };
            let fail = |message: String| AuthError::Entry {
                origin: origin.to_owned(),
                entry: at.clone(),
                message,
            };
            let token = parse_entry(entry).map_err(fail)?;
            if tokens.iter().any(|t| t.name == token.name) {
                return Err(fail(format!("token name `{}` is used twice", token.name)));
            }
            if tokens.iter().any(|t| t.digest == token.digest) {
                return Err(fail(format!(
                    "token `{}` has the same hash as token `{}`",
                    token.name,
                    tokens
                        .iter()
                        .find(|t| t.digest == token.digest)
                        .map_or("", |t| t.name.as_str())
                )));
            }
            tokens.push(token);
        }
    }
    Ok(())
}

fn parse_entry(entry: &str) -> Result<Token, String> {
    let mut fields = entry.split(':').map(str::trim);
    let (Some(name), Some(scope), Some(hash), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err("expected name:scope:sha256hex".into());
    };
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err("the token name must be non-empty, without spaces".into());
    }
    let scope = Scope::ALL
        .into_iter()
        .find(|s| s.as_str() == scope)
        .ok_or_else(|| format!("scope must be read, write or admin, not `{scope}`"))?;
    let digest = decode_hex(hash).ok_or_else(|| {
        format!(
            "token `{name}`: the third field must be the token's SHA-256 as 64 hex digits \
             (printf %s \"$TOKEN\" | sha256sum), never the token itself"
        )
    })?;
    Ok(Token {
        name: name.to_owned(),
        scope,
        digest,
    })
}

fn decode_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0_u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimizer from turning the fold into an early exit.
    std::hint::black_box(difference) == 0
}

/// The configured token a request presents, or why there is none.
fn authenticate<'a>(tokens: &'a [Token], request: &Request) -> Result<&'a Token, ApiError> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized { presented: false })?;
    let secret = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, secret)| secret.trim())
        .filter(|secret| !secret.is_empty())
        .ok_or(ApiError::Unauthorized { presented: true })?;
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    // Every digest is compared, so the time taken does not tell which matched.
    let mut found = None;
    for token in tokens {
        if constant_time_eq(&token.digest, &digest) {
            found = Some(token);
        }
    }
    found.ok_or(ApiError::Unauthorized { presented: true })
}

/// What the authorization middleware needs: the tokens and the scope of the
/// routes it guards.
#[derive(Clone)]
pub struct Guard {
    pub tokens: Arc<[Token]>,
    pub needed: Scope,
}

/// Middleware: refuses requests without a valid token (401) or whose token's
/// scope is below the route's (403).
pub async fn authorize(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let token = match authenticate(&guard.tokens, &request) {
        Ok(token) => token,
        Err(e) => {
            debug!(path = %request.uri().path(), "request without a valid token");
            return e.into_response();
        }
    };
    if token.scope < guard.needed {
        debug!(token = %token.name, needed = %guard.needed, "token scope too small");
        return ApiError::Forbidden {
            needed: guard.needed,
        }
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"

    fn parse(text: &str) -> Result<Vec<(String, Scope)>, String> {
        let mut tokens = Vec::new();
        parse_tokens(text, "tokens.txt", &mut tokens).map_err(|e| e.to_string())?;
        Ok(tokens.into_iter().map(|t| (t.name, t.scope)).collect())
    }

    #[test]
    fn token_entries() {
        let file = format!(
            "# ops tokens\nci:write:{HASH}\n\n  alice : admin : {}  # on call\n",
            HASH.to_uppercase().replace("9F", "8F")
        );
        assert_eq!(
            parse(&file),
            Ok(vec![
                ("ci".into(), Scope::Write),
                ("alice".into(), Scope::Admin)
            ])
        );
        let mut other = HASH.to_owned();
        other.replace_range(0..1, "0");
        assert_eq!(
            parse(&format!("a:read:{HASH}; b:write:{other}")),
            Ok(vec![("a".into(), Scope::Read), ("b".into(), Scope::Write)])
        );
        for (text, error) in [
            (
                "a:read",
                "tokens.txt, entry 1: expected name:scope:sha256hex",
            ),
            (
                &format!("a:root:{HASH}"),
                "tokens.txt, entry 1: scope must be read, write or admin, not `root`",
            ),
            (
                "a:read:secret",
                "tokens.txt, entry 1: token `a`: the third field must be the token's SHA-256",
            ),
            (
                &format!("a:read:{HASH}\nb:read:{HASH}"),
                "tokens.txt, line 2: token `b` has the same hash as token `a`",
            ),
            (
                &format!("a:read:{HASH};a:read:{other}"),
                "tokens.txt, entry 2: token name `a` is used twice",
            ),
        ] {
            let got = parse(text).unwrap_err();
            assert!(got.starts_with(error), "{text}: {got}");
        }
    }

    #[test]
    fn the_digest_of_a_secret_matches_its_hex() {
        let token = Token::from_secret("t", Scope::Read, "test");
        assert_eq!(Some(token.digest), decode_hex(HASH));
        assert!(constant_time_eq(&token.digest, &token.digest));
        let mut other = token.digest;
        other[31] ^= 1;
        assert!(!constant_time_eq(&token.digest, &other));
    }

    #[test]
    fn scopes_nest() {
        assert!(Scope::Admin > Scope::Write && Scope::Write > Scope::Read);
        assert!(Auth::default().check().is_err());
        assert!(Auth::Off.check().is_ok());
    }
}
