//! The audience, turned into deliveries as the send goes: each step materialises the next
//! users (in psid order, after the send's cursor) and claims them at once.

use std::collections::HashMap;

use sea_orm::{DatabaseBackend, DatabaseTransaction, FromQueryResult};

use super::{Claimed, PHASE_DONE, PHASE_TOKEN, PHASE_WINDOW, Send};
use crate::{
    domain::{DeliveryState, OptInEvent, Route, TokenKind},
    store::{StoreError, eligibility, sql::Sql},
};

#[derive(FromQueryResult)]
struct AudienceSlice {
    n: i64,
    last: Option<String>,
}

#[derive(FromQueryResult)]
struct Inserted {
    id: i64,
    psid: String,
    route: Route,
    state: crate::domain::DeliveryState,
    optin_id: Option<i64>,
}

#[derive(FromQueryResult)]
struct Token {
    id: i64,
    token: String,
    expires_at: i64,
}

/// The columns every materialised delivery is inserted with, in this order.
const DELIVERY_COLUMNS: &str = "INSERT INTO deliveries (send_id, page_id, psid, route, optin_id, \
     state, attempts, claim, ambiguous, confirmed_by_token, next_attempt_at, error_message, \
     updated_at) ";

/// The key a user's token is chosen by: the smallest. A one-time token before any recurring one
/// (it lapses within a year and is used once, while a recurring token stays for the next story
/// and its cooldown cannot hold this one back), then the one that expires first. One integer,
/// so that SQLite's MIN() can pick the row: a recurring token's expiry is halved into the upper
/// half of the range (a token that never expires, `i64::MAX`, maps to `i64::MAX`).
const CHOICE_KEY: &str = "CASE WHEN o.kind = 'one_time' THEN o.expires_at \
     ELSE o.expires_at / 2 + 4611686018427387904 END";

/// The recipients of a phase, as a `WHERE` condition on `optins o` (token phase) or
/// `subscribers s` (window phase): psid above `after`, and at most `through` when given.
fn audience_condition(
    sql: &mut Sql,
    send: &Send,
    kinds: &[TokenKind],
    token_phase: bool,
    now: i64,
    after: &str,
    through: Option<&str>,
) {
    let aim = eligibility::Aim {
        page_id: &send.page_id,
        topic: &send.topic,
        kinds,
    };
    let column = if token_phase {
        eligibility::usable_optin(sql, "o", aim, now);
        "o.psid"
    } else {
        eligibility::window_user(sql, "s", aim, now);
        "s.psid"
    };
    sql.push(&format!(" AND {column} > ")).bind(after);
    if let Some(through) = through {
        sql.push(&format!(" AND {column} <= ")).bind(through);
    }
    if let Some(rule) = send.segment() {
        sql.push(" AND ");
        eligibility::in_segment(sql, column, &send.page_id, &rule);
    }
}

/// What a materialising step made: the deliveries claimed (`in_flight`, for the sender pool),
/// how many it skipped at once (recipients the recurring cooldown holds back), and the audience
/// phase and cursor the send moves to.
pub(super) struct Materialized {
    pub claimed: Vec<Claimed>,
    pub skipped: i64,
    pub phase: &'static str,
    pub cursor: String,
}

/// Materialises up to `limit` more recipients of the send and claims them at once, in the
/// step's transaction: each user's token is chosen (a one-time token, the first-expiring,
/// before a recurring one; of the kinds the send takes) and a one-time token reserved (token
/// route); a recurring token is not reserved, it stays active (recurring route), and a user the
/// cooldown holds back gets a delivery skipped with the reason. Then, when asked, users inside
/// the window without a token (window route); the segment applies to all. The new deliveries
/// are `in_flight` (attempt 1 of claim 1), ready for the sender pool.
///
/// The recipients move from table to table inside the database: a step first finds the psid
/// range of its next `limit` users, then inserts their deliveries and reserves their opt-ins
/// with statements whose text does not depend on how many rows they move. Binding each row's
/// values instead cost a dozen parameters a delivery, and every new row count a fresh parse
/// of a statement with thousands of placeholders (20 ms and more on SQLite).
pub(super) async fn materialize(
    txn: &DatabaseTransaction,
    send: &Send,
    now: i64,
    limit: u64,
) -> Result<Materialized, StoreError> {
    use sea_orm::ConnectionTrait;
    let backend = txn.get_database_backend();
    let token_phase = match send.audience_phase.as_str() {
        PHASE_TOKEN => true,
        PHASE_WINDOW => false,
        _ => {
            return Ok(Materialized {
                claimed: Vec::new(),
                skipped: 0,
                phase: PHASE_DONE,
                cursor: String::new(),
            });
        }
    };
    let phase = if token_phase {
        PHASE_TOKEN
    } else {
        PHASE_WINDOW
    };
    let kinds = send.token_kinds();
    let after = send.audience_cursor.as_str();

    // The next `limit` users of the phase: how many there are, and the last one's psid.
    let mut sql = Sql::new(backend);
    sql.push(if token_phase {
        "SELECT COUNT(*) AS n, MAX(psid) AS last FROM (SELECT DISTINCT o.psid AS psid \
         FROM optins o WHERE "
    } else {
        "SELECT COUNT(*) AS n, MAX(psid) AS last FROM (SELECT s.psid AS psid \
         FROM subscribers s WHERE "
    });
    audience_condition(&mut sql, send, &kinds, token_phase, now, after, None);
    sql.push(if token_phase {
        " ORDER BY o.psid LIMIT "
    } else {
        " ORDER BY s.psid LIMIT "
    })
    .bind(limit as i64)
    .push(") AS next_users");
    let slice = AudienceSlice::find_by_statement(sql.statement())
        .one(txn)
        .await?
        .unwrap_or(AudienceSlice { n: 0, last: None });
    let exhausted = (slice.n as u64) < limit;

    let mut claimed = Vec::new();
    let mut skipped = 0;
    if let Some(through) = slice.last.as_deref() {
        let mut sql = Sql::new(backend);
        sql.push(DELIVERY_COLUMNS)
            .push("SELECT ")
            .bind(send.id.as_str())
            .push(", ")
            .bind(send.page_id.as_str());
        if token_phase {
            // A recurring token's user inside the cooldown: skipped at once, with the reason.
            let held = |sql: &mut Sql| {
                sql.push("r.kind = 'recurring' AND ");
                eligibility::in_cooldown(
                    sql,
                    "r.psid",
                    &send.page_id,
                    send.recurring_cooldown_ms,
                    now,
                );
            };
            let hours = send.recurring_cooldown_ms as f64 / 3_600_000.0;
            let why = format!(
                "held back by the recurring cooldown: otnd sent this subscriber a recurring \
                 notification less than {hours} h ago (Facebook takes one per subscriber per \
                 {hours} h)"
            );
            sql.push(
                ", r.psid, CASE WHEN r.kind = 'recurring' THEN 'recurring' ELSE 'token' END, \
                 r.id, CASE WHEN ",
            );
            held(&mut sql);
            sql.push(" THEN 'skipped' ELSE 'in_flight' END, CASE WHEN ");
            held(&mut sql);
            sql.push(" THEN 0 ELSE 1 END, 1, FALSE, FALSE, 0, CASE WHEN ");
            held(&mut sql);
            sql.push(" THEN ")
                .bind(why)
                .push(" ELSE NULL END, ")
                .bind(now)
                .push(" FROM (");
            // Each user's token by the choice key: SQLite takes the bare columns of a MIN()
            // aggregate from the row holding the minimum; PostgreSQL has DISTINCT ON.
            if backend == DatabaseBackend::Postgres {
                sql.push(
                    "SELECT DISTINCT ON (o.psid) o.psid AS psid, o.id AS id, o.kind AS kind \
                     FROM optins o WHERE ",
                );
                audience_condition(&mut sql, send, &kinds, true, now, after, Some(through));
                sql.push(&format!(" ORDER BY o.psid, {CHOICE_KEY}, o.id"));
            } else {
                sql.push(&format!(
                    "SELECT o.psid AS psid, o.id AS id, o.kind AS kind, MIN({CHOICE_KEY}) \
                     AS choice FROM optins o WHERE "
                ));
                audience_condition(&mut sql, send, &kinds, true, now, after, Some(through));
                sql.push(" GROUP BY o.psid");
            }
            // (The condition names `choice` so that SQLite keeps the MIN() its bare columns
            // are chosen by; PostgreSQL's subquery has no such column.)
            sql.push(if backend == DatabaseBackend::Postgres {
                ") AS r WHERE TRUE ORDER BY r.psid"
            } else {
                ") AS r WHERE r.choice IS NOT NULL ORDER BY r.psid"
            });
        } else {
            sql.push(
                ", s.psid, 'window', CAST(NULL AS BIGINT), 'in_flight', 1, 1, FALSE, FALSE, 0, \
                 NULL, ",
            )
            .bind(now)
            .push(" FROM subscribers s WHERE ");
            audience_condition(&mut sql, send, &kinds, false, now, after, Some(through));
            sql.push(" ORDER BY s.psid");
        }
        // A user who already has this send's delivery is skipped by the unique key.
        sql.push(
            " ON CONFLICT (send_id, psid) DO NOTHING RETURNING id, psid, route, state, optin_id",
        );
        let inserted = Inserted::find_by_statement(sql.statement())
            .all(txn)
            .await?;
        let mut tokens = HashMap::new();
        if token_phase && !inserted.is_empty() {
            // The rows just inserted are exactly the send's deliveries in this id range: only
            // this page's actor adds deliveries to the send, and its earlier ones are older.
            let first = inserted.iter().map(|row| row.id).min().unwrap_or_default();
            let last = inserted.iter().map(|row| row.id).max().unwrap_or_default();
            let of_route = |sql: &mut Sql, route: Route| {
                sql.push(" WHERE id IN (SELECT d.optin_id FROM deliveries d WHERE d.send_id = ")
                    .bind(send.id.as_str())
                    .push(" AND d.id BETWEEN ")
                    .bind(first)
                    .push(" AND ")
                    .bind(last)
                    .push(&format!(
                        " AND d.route = '{}' AND d.state = 'in_flight')",
                        route.as_str()
                    ));
            };
            let one_time = inserted.iter().filter(|r| r.route == Route::Token).count();
            if one_time > 0 {
                let event = OptInEvent::Reserve;
                let mut sql = Sql::new(backend);
                sql.push("UPDATE optins SET state = ").bind(event.target());
                of_route(&mut sql, Route::Token);
                crate::store::optins::guard(&mut sql, event, "state");
                sql.push(" RETURNING id, token, expires_at");
                let reserved = Token::find_by_statement(sql.statement()).all(txn).await?;
                if reserved.len() != one_time {
                    // Only this page's actor reserves opt-ins: another writer is at work.
                    return Err(StoreError::Conflict);
                }
                tokens.extend(
                    reserved
                        .into_iter()
                        .map(|t| (t.id, (t.token, t.expires_at))),
                );
            }
            if inserted
                .iter()
                .any(|r| r.route == Route::Recurring && r.state == DeliveryState::InFlight)
            {
                // A recurring token is read, not reserved: it stays active for other sends.
                let mut sql = Sql::new(backend);
                sql.push("SELECT id, token, expires_at FROM optins");
                of_route(&mut sql, Route::Recurring);
                let read = Token::find_by_statement(sql.statement()).all(txn).await?;
                tokens.extend(read.into_iter().map(|t| (t.id, (t.token, t.expires_at))));
            }
        }
        claimed.reserve(inserted.len());
        for row in inserted {
            if row.state == DeliveryState::Skipped {
                skipped += 1;
                continue;
            }
            let (token, expires_at) = match row.optin_id.and_then(|id| tokens.get(&id).cloned()) {
                Some((token, expires_at)) => (Some(token), Some(expires_at)),
                None if token_phase => return Err(StoreError::Conflict),
                None => (None, None),
            };
            claimed.push(Claimed {
                id: row.id,
                psid: row.psid,
                route: row.route,
                attempts: 1,
                claim: 1,
                ambiguous: false,
                token,
                expires_at,
                optin_id: row.optin_id,
            });
        }
        claimed.sort_by_key(|c| c.id);
    }

    let (next_phase, cursor) = match (exhausted, token_phase, send.include_window_users) {
        (false, _, _) => (phase, slice.last.unwrap_or_default()),
        (true, true, true) => (PHASE_WINDOW, String::new()),
        (true, _, _) => (PHASE_DONE, String::new()),
    };
    Ok(Materialized {
        claimed,
        skipped,
        phase: next_phase,
        cursor,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use sea_orm::ConnectionTrait;

    use crate::{
        domain::{OptInState, Psid, SegmentRule, Tag},
        store::{
            audience, now_ms,
            sends::{NewSend, Started, start},
            testing::{TestStore, store_tests},
        },
    };

    /// Materialises up to `limit` recipients of `send` as its row stands in `send`, committed.
    async fn next(t: &TestStore, send: &Send, limit: u64) -> (Vec<Claimed>, &'static str, String) {
        let made = t
            .txn(async |txn| materialize(txn, send, now_ms(), limit).await)
            .await
            .unwrap();
        (made.claimed, made.phase, made.cursor)
    }

    fn psids(claimed: &[Claimed]) -> Vec<&str> {
        claimed.iter().map(|c| c.psid.as_str()).collect()
    }

    fn in_phase(send: &Send, phase: &str, cursor: &str) -> Send {
        Send {
            audience_phase: phase.into(),
            audience_cursor: cursor.into(),
            ..send.clone()
        }
    }

    /// A queued send of a new story of the page, to its window users too, aimed at `segment`.
    async fn window_send(
        t: &TestStore,
        page: &crate::domain::PageId,
        segment: Option<&SegmentRule>,
    ) -> Send {
        let story = t.story(page, "news", true).await;
        let started = t
            .txn(async |txn| {
                let new = NewSend {
                    story: &story,
                    request_id: "r1",
                    segment,
                    max_active: 10,
                    expected: 0,
                    recurring_cooldown_ms: 48 * 3_600_000,
                };
                start(txn, new, now_ms()).await
            })
            .await;
        let Ok(Started::Created(send)) = started else {
            panic!("created")
        };
        send
    }

    store_tests! {
        /// A user with several usable opt-ins on the topic is reached once, by the one that
        /// expires first; the others stay for later sends.
        async fn each_user_is_reached_once_by_their_first_expiring_opt_in(t) {
            let page = t.page("1").await;
            let day = 24 * 60 * 60 * 1000;
            let later = t.opt_in(&page, "a", "news", "later", now_ms()).await;
            let sooner = t
                .opt_in(&page, "a", "news", "sooner", now_ms() - 100 * day)
                .await;
            let send = t.send(&page, "news").await;
            let (claimed, _, _) = next(&t, &send, 10).await;
            assert_eq!(claimed.len(), 1);
            assert_eq!(
                (claimed[0].optin_id, claimed[0].token.as_deref()),
                (Some(sooner.id), Some("sooner"))
            );
            assert_eq!(t.opt_in_row(sooner.id).await.state, OptInState::Reserved);
            assert_eq!(t.opt_in_row(later.id).await.state, OptInState::Active);
        }

        /// A phase not exhausted goes on after its last user; an exhausted token phase gives
        /// way to the window when the send asks for it, else the audience is done.
        async fn the_audience_moves_from_phase_to_phase_as_each_is_exhausted(t) {
            let page = t.page("1").await;
            for psid in ["a", "b"] {
                t.opt_in(&page, psid, "news", &format!("t-{psid}"), now_ms())
                    .await;
            }
            t.interaction(&page, "w", now_ms()).await;
            let send = window_send(&t, &page, None).await;
            let (claimed, phase, cursor) = next(&t, &send, 1).await;
            assert_eq!(
                (psids(&claimed), phase, cursor.as_str()),
                (vec!["a"], PHASE_TOKEN, "a")
            );
            let (claimed, phase, cursor) = next(&t, &in_phase(&send, PHASE_TOKEN, "a"), 2).await;
            assert_eq!(
                (psids(&claimed), phase, cursor.as_str()),
                (vec!["b"], PHASE_WINDOW, "")
            );
            // a and b, their opt-ins now reserved, read as window users too: the send's key
            // skips them.
            let (claimed, phase, _) = next(&t, &in_phase(&send, PHASE_WINDOW, ""), 10).await;
            assert_eq!((psids(&claimed), phase), (vec!["w"], PHASE_DONE));
            assert_eq!(
                (claimed[0].route, claimed[0].token.as_deref()),
                (Route::Window, None)
            );
            let (claimed, phase, _) = next(&t, &in_phase(&send, PHASE_DONE, ""), 2).await;
            assert_eq!((claimed.len(), phase), (0, PHASE_DONE));
            let token_only = t.send(&page, "sport").await;
            assert_eq!(next(&t, &token_only, 2).await.1, PHASE_DONE);
        }

        /// A step that materialises a slice again (its row read before an earlier commit)
        /// adds nobody twice: a reserved opt-in is no longer usable, and a user the send
        /// already has is skipped by its key.
        async fn materialising_the_same_slice_twice_adds_each_user_once(t) {
            let page = t.page("1").await;
            t.opt_in(&page, "a", "news", "t-a", now_ms()).await;
            t.interaction(&page, "w", now_ms()).await;
            let send = window_send(&t, &page, None).await;
            assert_eq!(psids(&next(&t, &send, 10).await.0), ["a"]);
            assert!(next(&t, &send, 10).await.0.is_empty());
            let window = in_phase(&send, PHASE_WINDOW, "");
            assert_eq!(psids(&next(&t, &window, 10).await.0), ["w"]);
            assert!(next(&t, &window, 10).await.0.is_empty());
            assert_eq!(t.deliveries(&send.id).await.len(), 2);
        }

        /// A user holding both kinds is reached by the one-time token (reserved); a user with
        /// only a recurring one by it (not reserved: it stays active); a recurring user otnd
        /// messaged within the cooldown gets a delivery skipped with the reason.
        async fn recurring_tokens_are_read_not_reserved_and_the_cooldown_skips(t) {
            let page = t.page("1").await;
            t.opt_in(&page, "both", "news", "ot-both", now_ms()).await;
            t.recurring_opt_in(&page, "both", "news", "rt-both", None).await;
            let only = t.recurring_opt_in(&page, "only", "news", "rt-only", None).await;
            t.recurring_opt_in(&page, "recent", "news", "rt-recent", None).await;
            // `recent` was messaged through a recurring token by an earlier send a minute ago.
            let earlier = t.send(&page, "news").await;
            t.db()
                .execute_unprepared(&format!(
                    "INSERT INTO deliveries (send_id, page_id, psid, route, optin_id, state, \
                     attempts, claim, ambiguous, confirmed_by_token, next_attempt_at, updated_at) \
                     VALUES ('{}', '1', 'recent', 'recurring', NULL, 'sent', 1, 1, FALSE, FALSE, \
                     0, {})",
                    earlier.id,
                    now_ms() - 60_000
                ))
                .await
                .unwrap();
            let send = t.send(&page, "news").await;
            let made = t
                .txn(async |txn| materialize(txn, &send, now_ms(), 10).await)
                .await
                .unwrap();
            assert_eq!(made.skipped, 1);
            let routes: Vec<(&str, Route, Option<&str>)> = made
                .claimed
                .iter()
                .map(|c| (c.psid.as_str(), c.route, c.token.as_deref()))
                .collect();
            assert_eq!(
                routes,
                [
                    ("both", Route::Token, Some("ot-both")),
                    ("only", Route::Recurring, Some("rt-only"))
                ]
            );
            assert_eq!(t.opt_in_row(only.id).await.state, OptInState::Active);
            assert_eq!(
                t.opt_in_by_token(&page, "ot-both").await.state,
                OptInState::Reserved
            );
            let rows = t.deliveries(&send.id).await;
            let recent = rows.iter().find(|d| d.psid == "recent").unwrap();
            assert_eq!((recent.state, recent.route), (crate::domain::DeliveryState::Skipped, Route::Recurring));
            assert!(
                recent
                    .error_message
                    .as_deref()
                    .is_some_and(|m| m.contains("recurring cooldown")),
                "{recent:?}"
            );
            // Another send at once: `only` is now inside the cooldown too (in flight), `both`
            // has only its recurring token left, and is reached by it.
            let next = t.send(&page, "news").await;
            let made = t
                .txn(async |txn| materialize(txn, &next, now_ms(), 10).await)
                .await
                .unwrap();
            let claimed: Vec<(&str, Route)> =
                made.claimed.iter().map(|c| (c.psid.as_str(), c.route)).collect();
            assert_eq!(claimed, [("both", Route::Recurring)]);
            assert_eq!(made.skipped, 2);
        }

        /// The segment the send froze narrows both phases.
        async fn the_segment_applies_to_both_phases(t) {
            let page = t.page("1").await;
            for psid in ["a", "b"] {
                t.opt_in(&page, psid, "news", &format!("t-{psid}"), now_ms())
                    .await;
            }
            for psid in ["v", "w"] {
                t.interaction(&page, psid, now_ms()).await;
            }
            let tagged = BTreeSet::from([Psid::parse("a").unwrap(), Psid::parse("w").unwrap()]);
            let x = BTreeSet::from([Tag::parse("x").unwrap()]);
            audience::tag_subscribers(t.db(), &page, &tagged, &x, &BTreeSet::new(), now_ms())
                .await
                .unwrap();
            let rule = SegmentRule {
                any_tags: ["x".to_string()].into(),
                ..Default::default()
            };
            let send = window_send(&t, &page, Some(&rule)).await;
            assert_eq!(psids(&next(&t, &send, 10).await.0), ["a"]);
            assert_eq!(
                psids(&next(&t, &in_phase(&send, PHASE_WINDOW, ""), 10).await.0),
                ["w"]
            );
        }
    }
}
