//! Integration tests: the real application, spawned on port 0 with a database of its own, driven
//! through the generated gRPC clients and plain HTTP like any other client.

mod support;

mod audience;
mod auth;
mod binary;
mod console;
mod console_browser;
mod contract;
mod demo;
mod erasure;
mod faults;
mod fleet;
mod fuzz;
mod graph;
mod grpc_web;
mod hardening;
mod health;
mod judge;
mod ledger;
mod lifecycle;
mod limits;
mod model;
mod optins;
mod otnctl;
mod pages;
mod recurring;
mod restart;
mod secrets;
mod sends;
mod stories;
mod throttling;
mod tls;
mod upgrade;
mod webhook;
