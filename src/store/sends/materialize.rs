//! The audience, turned into deliveries as the send goes: each step materialises the next
//! users (in psid order, after the send's cursor) and claims them at once.

use std::collections::HashMap;

use sea_orm::{DatabaseBackend, DatabaseTransaction, FromQueryResult};

use super::{Claimed, PHASE_DONE, PHASE_TOKEN, PHASE_WINDOW, Send};
use crate::{
    domain::{OptInEvent, Route},
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
    optin_id: Option<i64>,
}

#[derive(FromQueryResult)]
struct Reserved {
    id: i64,
    token: String,
    expires_at: i64,
}

/// The columns every materialised delivery is inserted with, in this order.
const DELIVERY_COLUMNS: &str = "INSERT INTO deliveries (send_id, page_id, psid, route, optin_id, \
     state, attempts, claim, ambiguous, confirmed_by_token, next_attempt_at, updated_at) ";

/// The recipients of a phase, as a `WHERE` condition on `optins o` (token phase) or
/// `subscribers s` (window phase): psid above `after`, and at most `through` when given.
fn audience_condition(
    sql: &mut Sql,
    send: &Send,
    token_phase: bool,
    now: i64,
    after: &str,
    through: Option<&str>,
) {
    let column = if token_phase {
        eligibility::usable_optin(sql, "o", &send.page_id, &send.topic, now);
        "o.psid"
    } else {
        eligibility::window_user(sql, "s", &send.page_id, &send.topic, now);
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

/// Materialises up to `limit` more recipients of the send and claims them at once, in the
/// step's transaction: each user's first-expiring usable opt-in is reserved (token route), then,
/// when asked, users inside the window without one (window route); the segment applies to both.
/// The new deliveries are `in_flight` (attempt 1 of claim 1), ready for the sender pool. Returns
/// them with the audience phase and cursor the send moves to.
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
) -> Result<(Vec<Claimed>, &'static str, String), StoreError> {
    use sea_orm::ConnectionTrait;
    let backend = txn.get_database_backend();
    let token_phase = match send.audience_phase.as_str() {
        PHASE_TOKEN => true,
        PHASE_WINDOW => false,
        _ => return Ok((Vec::new(), PHASE_DONE, String::new())),
    };
    let phase = if token_phase {
        PHASE_TOKEN
    } else {
        PHASE_WINDOW
    };
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
    audience_condition(&mut sql, send, token_phase, now, after, None);
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
    if let Some(through) = slice.last.as_deref() {
        let route = if token_phase {
            Route::Token
        } else {
            Route::Window
        };
        let mut sql = Sql::new(backend);
        sql.push(DELIVERY_COLUMNS)
            .push("SELECT ")
            .bind(send.id.as_str())
            .push(", ")
            .bind(send.page_id.as_str());
        if token_phase {
            sql.push(", r.psid, 'token', r.id, 'in_flight', 1, 1, FALSE, FALSE, 0, ")
                .bind(now)
                .push(" FROM (");
            // Each user's first-expiring usable opt-in: SQLite takes the bare columns of a
            // MIN() aggregate from the row holding the minimum; PostgreSQL has DISTINCT ON.
            if backend == DatabaseBackend::Postgres {
                sql.push(
                    "SELECT DISTINCT ON (o.psid) o.psid AS psid, o.id AS id FROM optins o WHERE ",
                );
                audience_condition(&mut sql, send, true, now, after, Some(through));
                sql.push(" ORDER BY o.psid, o.expires_at, o.id");
            } else {
                sql.push(
                    "SELECT o.psid AS psid, o.id AS id, MIN(o.expires_at) AS first_expiry \
                     FROM optins o WHERE ",
                );
                audience_condition(&mut sql, send, true, now, after, Some(through));
                sql.push(" GROUP BY o.psid");
            }
            // (The condition names `first_expiry` so that SQLite keeps the MIN() its bare
            // columns are chosen by; PostgreSQL's subquery has no such column.)
            sql.push(if backend == DatabaseBackend::Postgres {
                ") AS r WHERE TRUE ORDER BY r.psid"
            } else {
                ") AS r WHERE r.first_expiry IS NOT NULL ORDER BY r.psid"
            });
        } else {
            sql.push(
                ", s.psid, 'window', CAST(NULL AS BIGINT), 'in_flight', 1, 1, FALSE, FALSE, 0, ",
            )
            .bind(now)
            .push(" FROM subscribers s WHERE ");
            audience_condition(&mut sql, send, false, now, after, Some(through));
            sql.push(" ORDER BY s.psid");
        }
        // A user who already has this send's token delivery is skipped by the unique key.
        sql.push(" ON CONFLICT (send_id, psid) DO NOTHING RETURNING id, psid, optin_id");
        let inserted = Inserted::find_by_statement(sql.statement())
            .all(txn)
            .await?;
        let mut tokens = HashMap::new();
        if token_phase && !inserted.is_empty() {
            // The rows just inserted are exactly the send's deliveries in this id range: only
            // this page's actor adds deliveries to the send, and its earlier ones are older.
            let first = inserted.iter().map(|row| row.id).min().unwrap_or_default();
            let last = inserted.iter().map(|row| row.id).max().unwrap_or_default();
            let event = OptInEvent::Reserve;
            let mut sql = Sql::new(backend);
            sql.push("UPDATE optins SET state = ")
                .bind(event.target())
                .push(" WHERE id IN (SELECT d.optin_id FROM deliveries d WHERE d.send_id = ")
                .bind(send.id.as_str())
                .push(" AND d.id BETWEEN ")
                .bind(first)
                .push(" AND ")
                .bind(last)
                .push(")");
            crate::store::optins::guard(&mut sql, event, "state");
            sql.push(" RETURNING id, token, expires_at");
            let reserved = Reserved::find_by_statement(sql.statement())
                .all(txn)
                .await?;
            if reserved.len() != inserted.len() {
                // Only this page's actor reserves opt-ins: another writer is at work.
                return Err(StoreError::Conflict);
            }
            tokens = reserved
                .into_iter()
                .map(|row| (row.id, (row.token, row.expires_at)))
                .collect();
        }
        claimed.reserve(inserted.len());
        for row in inserted {
            let (token, expires_at) = match row.optin_id.and_then(|id| tokens.remove(&id)) {
                Some((token, expires_at)) => (Some(token), Some(expires_at)),
                None if token_phase => return Err(StoreError::Conflict),
                None => (None, None),
            };
            claimed.push(Claimed {
                id: row.id,
                psid: row.psid,
                route,
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
    Ok((claimed, next_phase, cursor))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
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
        t.txn(async |txn| materialize(txn, send, now_ms(), limit).await)
            .await
            .unwrap()
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
