//! The checker: once a history has settled, every rule of the promise is judged against the
//! database, the sandbox's ledger, the answers the history got and every instance's log. It
//! returns every broken rule as a line (empty: the history kept the promise).

use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::Value;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::world::World;
use crate::{
    erasure::every_row,
    ledger,
    secrets::database_text,
    support::{page_access_token, page_app_secret, page_verify_token, test_master_key_base64},
};

pub(crate) async fn violations(world: &World<'_>, pages: &[&str]) -> Vec<String> {
    let mut broken = world.observed.broken.clone();
    let messages = world.h.sandbox_get("/__sandbox/messages").await;
    let stats = world.h.sandbox_get("/__sandbox/stats").await;

    // The ledger: sends ended, counters equal rows, opt-ins consistent, and what Facebook
    // accepted is exactly what otnd counts sent (plus some of unknown), nobody twice.
    // Erased users' deliveries are gone with them; what they got is judged below.
    let erased: Vec<&str> = world
        .observed
        .erasures
        .iter()
        .map(|(_, psid, _)| psid.as_str())
        .collect();
    let accepted: Vec<(Value, String)> = ledger::accepted(&messages)
        .into_iter()
        .filter(|(_, psid)| !erased.contains(&psid.as_str()))
        .collect();
    broken.extend(ledger::violations(&world.db.url, Some(&accepted)).await);

    // The sandbox's own counts.
    if stats["tokens_accepted_more_than_once"] != 0 {
        broken.push(format!("a token was accepted twice: {stats}"));
    }
    if let Some(n) = stats["rejected_by_reason"].get("token_expired") {
        broken.push(format!("{n} expired tokens were presented"));
    }

    // `unknown` only where an answer could have been lost: an ambiguous fault the sandbox
    // injected, or a crash, drain or outage with at most the pages' in-flight caps out. A 5xx
    // (codes 1 and 2) counts as lost: Facebook's "unknown error" does not say whether the
    // message went, so a standard message that got one is never sent again (GRAPH_API.md).
    let unknown = count(
        &world.db.url,
        "SELECT COUNT(*) AS n FROM deliveries WHERE state = 'unknown'",
    )
    .await;
    let injected = |kind: &str| stats["faults_injected"][kind].as_i64().unwrap_or(0);
    let lost_answers =
        injected("timeout") + injected("reset") + injected("accept_then_fail") + injected("error");
    let cap_per_disruption: i64 = world
        .observed
        .max_rates
        .iter()
        .map(|rate| (*rate as u64).div_ceil(2).max(100) as i64)
        .sum();
    let allowed = lost_answers + world.observed.disruptions as i64 * cap_per_disruption;
    if unknown > allowed {
        broken.push(format!(
            "{unknown} deliveries unknown, but only {lost_answers} answers were lost and {} \
             crashes or outages happened (at most {allowed} unknown)",
            world.observed.disruptions
        ));
    }

    // A token Facebook accepted is never active again.
    let accepted_tokens: Vec<&str> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["token"].as_str())
        .collect();
    let active = strings(
        &world.db.url,
        "SELECT token AS s FROM optins WHERE state = 'active'",
    )
    .await;
    let reused: Vec<&&str> = accepted_tokens
        .iter()
        .filter(|t| active.iter().any(|a| a == **t))
        .collect();
    if !reused.is_empty() {
        broken.push(format!(
            "{} tokens Facebook accepted are active again",
            reused.len()
        ));
    }

    // Erased users: no row left, and nothing received after the erasure returned.
    if !world.observed.erasures.is_empty() {
        let rows = every_row(&world.db.url).await;
        for (page, psid, at) in &world.observed.erasures {
            let left: Vec<&String> = rows
                .iter()
                .filter(|(_, row)| row.split('|').any(|field| field == psid))
                .map(|(table, _)| table)
                .collect();
            if !left.is_empty() {
                broken.push(format!(
                    "user {psid} of page {page} was erased but has rows in {left:?}"
                ));
            }
            let after: Vec<&Value> = messages["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["page_id"] == page.as_str() && m["psid"] == psid.as_str())
                .filter(|m| m["time_ms"].as_i64().unwrap_or(0) > *at)
                .collect();
            if !after.is_empty() {
                broken.push(format!(
                    "user {psid} of page {page} got {} messages after the erasure returned \
                     ({} ms later)",
                    after.len(),
                    after[0]["time_ms"].as_i64().unwrap_or(0) - at
                ));
            }
        }
    }

    // No secret in any answer, log line or database row.
    let mut secrets: Vec<(String, String)> =
        vec![("the master key".into(), test_master_key_base64())];
    for page in pages {
        secrets.push((
            format!("page {page}'s access token"),
            page_access_token(page),
        ));
        secrets.push((format!("page {page}'s app secret"), page_app_secret(page)));
        secrets.push((
            format!("page {page}'s verify token"),
            page_verify_token(page),
        ));
    }
    for bad in &world.observed.bad_tokens {
        secrets.push(("an access token the history set".into(), bad.clone()));
    }
    let logs = world.logs();
    let database = database_text(world.db).await;
    for (what, secret) in &secrets {
        if world.observed.responses.contains(secret.as_str()) {
            broken.push(format!("{what} is in an answer"));
        }
        if logs.iter().any(|log| log.contains(secret.as_str())) {
            broken.push(format!("{what} is in a log"));
        }
        // The database holds page secrets sealed; none may be there in clear.
        if database.contains(secret.as_str()) {
            broken.push(format!("{what} is in the database in clear"));
        }
    }

    // Answers: never INTERNAL or UNKNOWN.
    for refusal in &world.observed.refusals {
        if matches!(refusal.code, Code::Internal | Code::Unknown) {
            broken.push(format!(
                "step {}: {} answered {:?}: {}",
                refusal.step, refusal.rpc, refusal.code, refusal.message
            ));
        }
    }

    // No panic, and the instance serves at the end.
    for log in &logs {
        if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
            broken.push(format!("a panic in a log: {line}"));
        }
    }
    let health = HealthClient::new(world.main_channel())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status());
    if !matches!(health, Ok(ServingStatus::Serving)) {
        broken.push(format!("health at the end: {health:?}"));
    }
    broken
}

async fn count(url: &str, sql: &str) -> i64 {
    let db = Database::connect(url).await.unwrap();
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    let _ = db.close().await;
    row.try_get::<i64>("", "n").unwrap()
}

async fn strings(url: &str, sql: &str) -> Vec<String> {
    let db = Database::connect(url).await.unwrap();
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap();
    let _ = db.close().await;
    rows.iter()
        .map(|r| r.try_get::<String>("", "s").unwrap())
        .collect()
}

/// One line of what a history did: its sends, their deliveries by state, the answers refused.
pub(crate) async fn summary(world: &World<'_>) -> String {
    let db = Database::connect(&world.db.url).await.unwrap();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state ORDER BY state",
        ))
        .await
        .unwrap();
    let sends = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM sends",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    let _ = db.close().await;
    let deliveries: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r.try_get::<i64>("", "n").unwrap(),
                r.try_get::<String>("", "state").unwrap()
            )
        })
        .collect();
    let mut codes: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &world.observed.refusals {
        *codes.entry(format!("{:?}", r.code)).or_default() += 1;
    }
    format!(
        "{sends} sends; deliveries: {}; refused: {codes:?}",
        deliveries.join(", ")
    )
}
