//! otnd: Facebook Messenger One-Time Notifications, end to end, behind a gRPC API.

pub mod api;
pub mod config;
pub mod console;
pub mod crashpoint;
pub mod crypto;
pub mod demo;
pub mod domain;
pub mod engine;
pub mod graph;
pub mod http;
pub mod progress;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod webhook;

pub use api::pb;
