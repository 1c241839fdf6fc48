//! Identifiers of durable things. Random (v7, time-ordered) UUIDs, typed so
//! a step id is never passed where a task id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $ty(pub Uuid);

        impl $ty {
            /// A new, time-ordered id (UUID v7): index-friendly for inserts.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $ty {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, uuid::Error> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

id_type!(
    /// One execution of a template.
    TaskId
);
id_type!(
    /// One node of a task's DAG.
    StepId
);
