//! otnd's schema, one migration per file, applied in order at start-up and by `otnd migrate`.
//! Only the schema builder is used, so every migration runs on SQLite and PostgreSQL alike.
//!
//! Conventions: times are `BIGINT` milliseconds since the Unix epoch (portable, indexable, and
//! compared cheaply in SQL on both backends); secrets are `BLOB`/`BYTEA` sealed by the service.

pub use sea_orm_migration::prelude::*;

mod m20261123_000001_pages;
mod m20261123_000002_audience_optins;
mod m20261123_000003_stories;
mod m20261124_000004_sends;
mod m20261124_000005_leases;
mod m20261206_000006_lifecycle;
mod m20261206_000007_erasures;
mod m20261207_000008_send_expected_total;
mod m20261207_000009_recurring;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_pages::Migration),
            Box::new(m20261123_000002_audience_optins::Migration),
            Box::new(m20261123_000003_stories::Migration),
            Box::new(m20261124_000004_sends::Migration),
            Box::new(m20261124_000005_leases::Migration),
            Box::new(m20261206_000006_lifecycle::Migration),
            Box::new(m20261206_000007_erasures::Migration),
            Box::new(m20261207_000008_send_expected_total::Migration),
            Box::new(m20261207_000009_recurring::Migration),
        ]
    }
}
