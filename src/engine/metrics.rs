//! The engine's counters and histograms, through the `metrics` facade (rendered as Prometheus
//! text on `GET /metrics` by the HTTP server). Names are a contract for dashboards.

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const DELIVERIES: &str = "otnd_deliveries_total";
pub const GRAPH_CALL_SECONDS: &str = "otnd_graph_call_seconds";
pub const GRAPH_ITEMS: &str = "otnd_graph_items_total";
pub const THROTTLE_EVENTS: &str = "otnd_throttle_events_total";
pub const IN_FLIGHT: &str = "otnd_deliveries_in_flight";
pub const QUEUE_DEPTH: &str = "otnd_deliveries_pending";
pub const RECOVERED: &str = "otnd_deliveries_recovered_total";
pub const PAGE_PACE: &str = "otnd_page_pace_calls_per_second";
pub const PAGE_BUDGET: &str = "otnd_page_budget_calls_per_second";

/// The process's recorder, installed on first use (one per process: tests run several apps in
/// one process, and they share it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(GRAPH_CALL_SECONDS.into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                    ],
                )
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

pub fn describe() {
    metrics::describe_counter!(
        DELIVERIES,
        "Deliveries that ended (or went back to pending), by outcome"
    );
    metrics::describe_histogram!(
        GRAPH_CALL_SECONDS,
        metrics::Unit::Seconds,
        "Graph API request latency (one send or one batch)"
    );
    metrics::describe_counter!(GRAPH_ITEMS, "Sends carried by Graph API requests");
    metrics::describe_counter!(THROTTLE_EVENTS, "Throttled answers from the Graph API");
    metrics::describe_gauge!(IN_FLIGHT, "Deliveries committed in flight, per page");
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        "Materialised deliveries waiting for their turn, per page"
    );
    metrics::describe_gauge!(
        PAGE_PACE,
        "Graph calls per second a page is paced at now (after throttles and its budget)"
    );
    metrics::describe_gauge!(
        PAGE_BUDGET,
        "A page's calls per second as Facebook's usage header reveals them"
    );
    metrics::describe_counter!(
        RECOVERED,
        "Deliveries found in flight after a restart and settled by recovery"
    );
}

pub fn graph_call(latency: Duration, items: usize) {
    metrics::histogram!(GRAPH_CALL_SECONDS).record(latency.as_secs_f64());
    metrics::counter!(GRAPH_ITEMS).increment(items as u64);
}

pub fn outcome(outcome: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(DELIVERIES, "outcome" => outcome).increment(n);
    }
}

pub fn throttled(page_id: &str) {
    metrics::counter!(THROTTLE_EVENTS, "page_id" => page_id.to_string()).increment(1);
}

pub fn page_gauges(page_id: &str, in_flight: usize, pending: i64) {
    metrics::gauge!(IN_FLIGHT, "page_id" => page_id.to_string()).set(in_flight as f64);
    metrics::gauge!(QUEUE_DEPTH, "page_id" => page_id.to_string()).set(pending as f64);
}

pub fn page_pace(page_id: &str, pace: f64, budget: Option<f64>) {
    metrics::gauge!(PAGE_PACE, "page_id" => page_id.to_string()).set(pace);
    if let Some(budget) = budget {
        metrics::gauge!(PAGE_BUDGET, "page_id" => page_id.to_string()).set(budget);
    }
}

pub fn recovered(n: u64) {
    if n > 0 {
        metrics::counter!(RECOVERED).increment(n);
    }
}
