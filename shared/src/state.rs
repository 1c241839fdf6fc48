//! Durable states and the computed execution status.
//!
//! States are stored as text with CHECK constraints in the schema; the
//! spelling here and there must agree (a database test reads every value back).

use std::fmt;

use serde::{Deserialize, Serialize};
use sqlx::Postgres;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};

/// A value was not one of an enumeration's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownVariant {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! text_enum {
    ($(#[$doc:meta])* $ty:ident, $kind:literal { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $ty {
            $($(#[$vdoc])* $variant),+
        }

        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = UnknownVariant;
            fn from_str(s: &str) -> Result<Self, UnknownVariant> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    other => Err(UnknownVariant { kind: $kind, value: other.to_owned() }),
                }
            }
        }

        impl sqlx::Type<Postgres> for $ty {
            fn type_info() -> PgTypeInfo {
                <&str as sqlx::Type<Postgres>>::type_info()
            }
            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as sqlx::Type<Postgres>>::compatible(ty)
            }
        }

        impl sqlx::Encode<'_, Postgres> for $ty {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as sqlx::Encode<Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl sqlx::Decode<'_, Postgres> for $ty {
            fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
                let text = <&str as sqlx::Decode<Postgres>>::decode(value)?;
                Ok(text.parse()?)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $ty {
            fn array_type_info() -> PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }
    };
}

text_enum!(
    /// The durable state of a step.
    StepState, "step state" {
        /// Not yet run; waits for its dependencies.
        Pending => "pending",
        /// Its message is on the namespace queue (or held by a worker).
        Enqueued => "enqueued",
        /// Failed retryably; runs again once `next_attempt_at` has passed.
        WaitingRetry => "waiting_retry",
        /// Succeeded; its output is recorded.
        Complete => "complete",
        /// Failed permanently (or ran out of attempts).
        Error => "error",
        /// Withdrawn because its task was cancelled.
        Cancelled => "cancelled",
        /// An operator marked it done; satisfies dependents like `complete`.
        Resolved => "resolved",
    }
);

impl StepState {
    /// Satisfies a dependent's dependency.
    pub fn satisfies_dependents(self) -> bool {
        matches!(self, StepState::Complete | StepState::Resolved)
    }
}

text_enum!(
    /// The durable state of a task.
    TaskState, "task state" {
        Pending => "pending",
        Running => "running",
        Complete => "complete",
        Error => "error",
        Cancelled => "cancelled",
    }
);

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Complete | TaskState::Error | TaskState::Cancelled
        )
    }
}

text_enum!(
    /// What a task is doing, computed in SQL from its steps' states.
    /// Variants are listed in precedence order: the first that applies wins.
    ExecutionStatus, "execution status" {
        /// A step failed for good (or can never run again): the task cannot complete.
        BlockedByFailures => "blocked_by_failures",
        /// At least one step may be enqueued now.
        HasReadySteps => "has_ready_steps",
        /// Steps are in flight; nothing else may start yet.
        Processing => "processing",
        /// Every step is complete or resolved.
        AllComplete => "all_complete",
        /// Nothing is ready or in flight: steps wait on dependencies or on a retry backoff.
        WaitingForDependencies => "waiting_for_dependencies",
    }
);

text_enum!(
    /// What a task does once one of its steps has failed permanently.
    OnFailure, "on_failure" {
        /// Enqueue nothing more; the task ends in `error` once nothing is in flight.
        FailFast => "fail_fast",
        /// Independent branches keep running; the task still ends in `error`.
        Continue => "continue",
    }
);

// Written out because the variants come from a macro.
#[allow(clippy::derivable_impls)]
impl Default for OnFailure {
    fn default() -> Self {
        OnFailure::FailFast
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for s in StepState::ALL {
            assert_eq!(s.as_str().parse::<StepState>().unwrap(), *s);
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        }
        for s in ExecutionStatus::ALL {
            assert_eq!(s.as_str().parse::<ExecutionStatus>().unwrap(), *s);
        }
        assert!("running".parse::<StepState>().is_err());
    }
}
