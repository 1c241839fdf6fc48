//! Weft's one integration-test binary (2-core machines pay a link per test
//! binary). Every test gets its own database, cloned from a migrated template
//! database on the PostgreSQL that `DATABASE_URL` points at; `scripts/test`
//! starts a private cluster and sets it.

// Test helpers panic on failure: that is how a test reports it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet;
mod support;

mod api;
mod bench;
mod chaos;
mod cli;
mod engine;
mod migrations;
mod operations;
mod reliability;
mod status_model;
mod traces;
