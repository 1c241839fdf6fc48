//! Validated names: parsed once at the edge, then passed as types.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name was refused; the message names the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {rule}")]
pub struct NameError {
    pub kind: &'static str,
    pub value: String,
    pub rule: &'static str,
}

fn is_lower_ident(s: &str, max: usize) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z'))
        && s.len() <= max
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal, $rule:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty(String);

        impl $ty {
            pub fn parse(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                let check: fn(&str) -> bool = $check;
                if check(&value) {
                    Ok(Self(value))
                } else {
                    Err(NameError { kind: $kind, value, rule: $rule })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::parse(s)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::parse(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A namespace: a group of templates and the worker pool that serves them.
    /// It names a queue, so it is short and lowercase.
    Namespace,
    "namespace",
    "must match ^[a-z][a-z0-9_]{0,29}$",
    |s| is_lower_ident(s, 30)
);

name_type!(
    /// A template's name within its namespace.
    TemplateName,
    "template name",
    "must match ^[a-z][a-z0-9_]{0,62}$",
    |s| is_lower_ident(s, 63)
);

name_type!(
    /// A step's name within its template.
    StepName,
    "step name",
    "must match ^[a-z][a-z0-9_]{0,62}$",
    |s| is_lower_ident(s, 63)
);

name_type!(
    /// A handler name: dot-separated lowercase identifiers, such as `payments.charge_card`.
    HandlerName,
    "handler name",
    "must be dot-separated segments matching ^[a-z][a-z0-9_]*$, at most 128 characters",
    |s| s.len() <= 128 && !s.is_empty() && s.split('.').all(|seg| is_lower_ident(seg, 128))
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_rules() {
        for ok in ["a", "shop", "a_1", "abcdefghijabcdefghijabcdefghij"] {
            assert!(Namespace::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "A",
            "a-b",
            "_a",
            "abcdefghijabcdefghijabcdefghijk",
            "a.b",
        ] {
            assert!(Namespace::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Namespace::parse("Shop").unwrap_err().to_string(),
            "invalid namespace \"Shop\": must match ^[a-z][a-z0-9_]{0,29}$"
        );
    }

    #[test]
    fn handler_rules() {
        for ok in ["builtin.noop", "payments.charge_card", "x"] {
            assert!(HandlerName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "A.b", "a.1b"] {
            assert!(HandlerName::parse(bad).is_err(), "{bad}");
        }
    }
}
