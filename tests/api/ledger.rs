//! The ledger checker: once otnd has settled (faults off, nothing in flight), its database is
//! read directly and judged against the promise and against the sandbox's record of what
//! Facebook accepted. It names every broken rule it finds, not only the first.
//!
//! - every send is finished, or paused/halted; a finished send has no delivery left pending or
//!   in flight, and no send has anything in flight once settled;
//! - each send's counters equal its rows;
//! - no opt-in is `reserved` without a live (pending or in-flight) delivery, no `active` opt-in is
//!   bound to a delivery, and the opt-in of a `sent` or `unknown` delivery is never `active`;
//! - of each send, nobody got the story twice, and the recipients Facebook accepted are exactly
//!   the `sent` ones plus some of the `unknown` ones (reviewers' previews aside).

use std::collections::{BTreeMap, BTreeSet};

use sea_orm::{ConnectionTrait, Database, FromQueryResult, Statement};
use serde_json::Value;

#[derive(Debug, FromQueryResult)]
struct SendRow {
    id: String,
    state: String,
    message: String,
    total: i64,
    in_flight: i64,
    sent: i64,
    failed: i64,
    skipped: i64,
    unknown: i64,
}

#[derive(Debug, FromQueryResult)]
struct DeliveryCount {
    send_id: String,
    state: String,
    n: i64,
}

#[derive(Debug, FromQueryResult)]
struct Binding {
    delivery_state: String,
    send_state: String,
    optin_state: String,
    optin_id: i64,
}

#[derive(Debug, FromQueryResult)]
struct Reserved {
    id: i64,
    live: i64,
}

#[derive(Debug, FromQueryResult)]
struct Recipient {
    send_id: String,
    psid: String,
    state: String,
}

/// What the sandbox accepted: (message, psid) per accepted message, from `/__sandbox/messages`.
pub fn accepted(messages: &Value) -> Vec<(Value, String)> {
    messages["messages"]
        .as_array()
        .expect("the sandbox's messages")
        .iter()
        .map(|m| {
            (
                m["message"].clone(),
                m["psid"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn rows<T: FromQueryResult>(db: &impl ConnectionTrait, sql: &str) -> Vec<T> {
    T::find_by_statement(Statement::from_string(db.get_database_backend(), sql))
        .all(db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Every broken rule, as readable lines (empty: the ledger holds). `accepted` is what Facebook
/// took on every page involved; `None` leaves the comparison with Facebook out.
pub async fn violations(database_url: &str, accepted: Option<&[(Value, String)]>) -> Vec<String> {
    let db = Database::connect(database_url).await.unwrap();
    let mut broken = Vec::new();

    let sends: Vec<SendRow> = rows(
        &db,
        "SELECT id, state, message, total, in_flight, sent, failed, skipped, unknown FROM sends",
    )
    .await;
    let counts: Vec<DeliveryCount> = rows(
        &db,
        "SELECT send_id, state, COUNT(*) AS n FROM deliveries GROUP BY send_id, state",
    )
    .await;
    let mut by_send: BTreeMap<&str, BTreeMap<&str, i64>> = BTreeMap::new();
    for c in &counts {
        by_send
            .entry(c.send_id.as_str())
            .or_default()
            .insert(c.state.as_str(), c.n);
    }
    for send in &sends {
        let rows = by_send.get(send.id.as_str()).cloned().unwrap_or_default();
        let n = |state: &str| rows.get(state).copied().unwrap_or(0);
        let total: i64 = rows.values().sum();
        let stored = (
            send.total,
            send.in_flight,
            send.sent,
            send.failed,
            send.skipped,
            send.unknown,
        );
        let counted = (
            total,
            n("in_flight"),
            n("sent"),
            n("failed"),
            n("skipped"),
            n("unknown"),
        );
        if stored != counted {
            broken.push(format!(
                "send {} ({}): counters (total, in_flight, sent, failed, skipped, unknown) \
                 {stored:?} but rows {counted:?}",
                send.id, send.state
            ));
        }
        let finished = matches!(send.state.as_str(), "completed" | "cancelled");
        if !finished && !matches!(send.state.as_str(), "paused" | "halted") {
            broken.push(format!("send {} is still {}", send.id, send.state));
        }
        if n("in_flight") > 0 {
            broken.push(format!(
                "send {} ({}) has {} deliveries in flight",
                send.id,
                send.state,
                n("in_flight")
            ));
        }
        if finished && n("pending") > 0 {
            broken.push(format!(
                "send {} is {} with {} deliveries pending",
                send.id,
                send.state,
                n("pending")
            ));
        }
    }

    let reserved: Vec<Reserved> = rows(
        &db,
        "SELECT o.id AS id, (SELECT COUNT(*) FROM deliveries d WHERE d.optin_id = o.id \
         AND d.state IN ('pending', 'in_flight')) AS live FROM optins o WHERE o.state = 'reserved'",
    )
    .await;
    let orphaned: Vec<i64> = reserved
        .iter()
        .filter(|r| r.live == 0)
        .map(|r| r.id)
        .collect();
    if !orphaned.is_empty() {
        broken.push(format!(
            "{} opt-ins reserved without a live delivery (ids {:?})",
            orphaned.len(),
            &orphaned[..orphaned.len().min(10)]
        ));
    }
    let bindings: Vec<Binding> = rows(
        &db,
        "SELECT d.state AS delivery_state, s.state AS send_state, o.state AS optin_state, \
         o.id AS optin_id FROM deliveries d JOIN optins o ON o.id = d.optin_id \
         JOIN sends s ON s.id = d.send_id",
    )
    .await;
    for b in &bindings {
        let wrong = match (b.delivery_state.as_str(), b.optin_state.as_str()) {
            (_, "active") => true,
            ("sent" | "unknown", state) => state != "used",
            ("pending" | "in_flight", state) => state != "reserved",
            _ => false,
        };
        if wrong {
            broken.push(format!(
                "opt-in {} is {} while its delivery (of a {} send) is {}",
                b.optin_id, b.optin_state, b.send_state, b.delivery_state
            ));
        }
    }

    let Some(accepted) = accepted else {
        let _ = db.close().await;
        return broken;
    };
    // The sandbox's ledger against each send's deliveries; sends are told apart by message.
    let recipients: Vec<Recipient> = rows(&db, "SELECT send_id, psid, state FROM deliveries").await;
    // Previews go to reviewers as standard messages with the story's content, which a send to
    // them repeats: reviewers are left out of this comparison.
    #[derive(FromQueryResult)]
    struct Reviewer {
        psid: String,
    }
    let reviewers: BTreeSet<String> = rows::<Reviewer>(
        &db,
        "SELECT DISTINCT reviewer_psid AS psid FROM stories WHERE reviewer_psid IS NOT NULL",
    )
    .await
    .into_iter()
    .map(|r| r.psid)
    .collect();
    let mut send_of_message: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for send in &sends {
        let message: Value = serde_json::from_str(&send.message).unwrap_or(Value::Null);
        send_of_message
            .entry(message.to_string())
            .or_default()
            .push(send.id.as_str());
    }
    let mut got: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
    for (message, psid) in accepted {
        if reviewers.contains(psid) {
            continue;
        }
        *got.entry(message.to_string())
            .or_default()
            .entry(psid.as_str())
            .or_default() += 1;
    }
    for (message, ids) in &send_of_message {
        let theirs: BTreeMap<&str, BTreeSet<&str>> = recipients
            .iter()
            .filter(|r| ids.contains(&r.send_id.as_str()) && !reviewers.contains(&r.psid))
            .fold(BTreeMap::new(), |mut acc, r| {
                acc.entry(r.state.as_str())
                    .or_insert_with(BTreeSet::new)
                    .insert(r.psid.as_str());
                acc
            });
        let empty = BTreeSet::new();
        let sent = theirs.get("sent").unwrap_or(&empty);
        let unknown = theirs.get("unknown").unwrap_or(&empty);
        let accepted = got.get(message).cloned().unwrap_or_default();
        let twice: Vec<&&str> = accepted
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(p, _)| p)
            .collect();
        if !twice.is_empty() {
            broken.push(format!(
                "sends {ids:?}: {} users got the story more than once ({:?})",
                twice.len(),
                &twice[..twice.len().min(10)]
            ));
        }
        let accepted: BTreeSet<&str> = accepted.keys().copied().collect();
        let unaccounted: Vec<&&str> = accepted
            .iter()
            .filter(|p| !sent.contains(*p) && !unknown.contains(*p))
            .collect();
        if !unaccounted.is_empty() {
            broken.push(format!(
                "sends {ids:?}: Facebook accepted the story for {} users that otnd counts \
                 neither sent nor unknown ({:?})",
                unaccounted.len(),
                &unaccounted[..unaccounted.len().min(10)]
            ));
        }
        let never: Vec<&&str> = sent.iter().filter(|p| !accepted.contains(*p)).collect();
        if !never.is_empty() {
            broken.push(format!(
                "sends {ids:?}: {} users counted sent that Facebook never accepted ({:?})",
                never.len(),
                &never[..never.len().min(10)]
            ));
        }
    }
    let _ = db.close().await;
    broken
}

/// Fails the test with every broken rule.
pub async fn assert_holds(database_url: &str, accepted: &[(Value, String)]) {
    assert_rows_hold(database_url, Some(accepted)).await;
}

/// [`assert_holds`], optionally without the comparison with Facebook.
pub async fn assert_rows_hold(database_url: &str, accepted: Option<&[(Value, String)]>) {
    let broken = violations(database_url, accepted).await;
    assert!(
        broken.is_empty(),
        "the ledger is broken:\n- {}",
        broken.join("\n- ")
    );
}
