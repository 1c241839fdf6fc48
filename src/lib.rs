//! The `weft` command line: the servers (`orchestrator`, `worker`), `migrate`,
//! `dev` (everything on one machine) and the client commands.
//!
//! Architecture invariant: this crate wires configuration to the library
//! crates and prints; it holds no orchestration or worker logic of its own.

pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod health;
pub mod pg;
