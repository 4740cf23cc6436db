//! Who a send can reach, defined once. A send materialises exactly these users, and
//! EstimateAudience counts exactly these users: a user the estimate promises is a user the send
//! reaches, by the same route.
//!
//! - By token: a user with a usable opt-in on the topic, of a kind the send takes: `active`
//!   (not reserved, spent, refused or stopped), and valid for at least [`MIN_TOKEN_LIFE_MS`] more
//!   (a token about to lapse is never presented).
//! - Held back by the recurring cooldown: a user otnd sent a recurring notification (or has one
//!   under way) less than the cooldown ago. A send still makes them a delivery, skipped with the
//!   reason, when its token for them is recurring.
//! - In the window (when the story asks for it): a user of the page whose last interaction is
//!   less than 24 hours old and who has no usable opt-in on the topic.
//! - The segment, when there is one, applies to both.
//!
//! Each condition is a fixed number of clauses whatever the segment's size: a rule's tags are
//! one `IN` list per kind of condition, never one clause per tag (SQLite refuses an expression
//! deeper than 1,000 and a compound select of more than 500 terms).

use super::sql::Sql;
use crate::domain::{MIN_TOKEN_LIFE_MS, SegmentRule, TokenKind, WINDOW_MS};

/// The cut-off a usable opt-in's expiry must be after, judged at `now`.
pub fn token_cutoff(now: i64) -> i64 {
    now + MIN_TOKEN_LIFE_MS
}

/// Who a send (or an estimate) is for: the page, the topic, and the kinds of token it takes.
#[derive(Clone, Copy, Debug)]
pub struct Aim<'a> {
    pub page_id: &'a str,
    pub topic: &'a str,
    pub kinds: &'a [TokenKind],
}

/// True for a usable opt-in row `alias` on the page's topic, of a kind the aim takes.
pub fn usable_optin(sql: &mut Sql, alias: &str, aim: Aim<'_>, now: i64) {
    sql.push(&format!("{alias}.page_id = "))
        .bind(aim.page_id)
        .push(&format!(" AND {alias}.topic = "))
        .bind(aim.topic)
        .push(&format!(
            " AND {alias}.state = 'active' AND {alias}.expires_at > "
        ))
        .bind(token_cutoff(now));
    // Written into the text (a kind is a fixed name), as the state is: one kind narrows the
    // rows, both need no clause.
    if let [kind] = aim.kinds {
        sql.push(&format!(" AND {alias}.kind = '{}'", kind.as_str()));
    }
}

/// True for a subscriber row `alias` whom a send reaches in the window (when it asks for it).
pub fn window_user(sql: &mut Sql, alias: &str, aim: Aim<'_>, now: i64) {
    sql.push(&format!("{alias}.page_id = "))
        .bind(aim.page_id)
        .push(&format!(" AND {alias}.last_interaction_at > "))
        .bind(now - WINDOW_MS)
        .push(&format!(
            " AND NOT EXISTS (SELECT 1 FROM optins u WHERE u.psid = {alias}.psid AND "
        ));
    usable_optin(sql, "u", aim, now);
    sql.push(")");
}

/// True for a user (`psid_column`) of the page whom otnd sent a recurring notification less
/// than `cooldown_ms` ago, or has one pending or in flight: Facebook takes one per subscriber
/// per cooldown, and a second would be refused (4/2018354) or, worse, delivered. The time is
/// the delivery's last change: its claim while it is out, its answer once it ended.
pub fn in_cooldown(sql: &mut Sql, psid_column: &str, page_id: &str, cooldown_ms: i64, now: i64) {
    // `route = 'recurring'` as a literal: SQLite then uses the partial index of recurring
    // deliveries.
    sql.push(&format!(
        "EXISTS (SELECT 1 FROM deliveries c WHERE c.route = 'recurring' AND c.psid = {psid_column} \
         AND c.page_id = "
    ))
    .bind(page_id)
    .push(" AND c.updated_at > ")
    .bind(now.saturating_sub(cooldown_ms))
    .push(" AND c.state IN ('pending', 'in_flight', 'sent', 'unknown'))");
}

/// True for users (`column`, a psid) in the segment: at most three uncorrelated sets, each
/// built once per query.
pub fn in_segment(sql: &mut Sql, column: &str, page_id: &str, rule: &SegmentRule) {
    let tags = |sql: &mut Sql, tags: &mut dyn Iterator<Item = &String>| {
        sql.push("SELECT t.psid FROM subscriber_tags t WHERE t.page_id = ")
            .bind(page_id)
            .push(" AND t.tag IN (");
        for (i, tag) in tags.enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(tag.as_str());
        }
        sql.push(")");
    };
    sql.push("(1 = 1");
    if !rule.all_tags.is_empty() {
        // Holding every one of the tags: as many (distinct) matching rows as tags.
        sql.push(&format!(" AND {column} IN ("));
        tags(sql, &mut rule.all_tags.iter());
        sql.push(" GROUP BY t.psid HAVING COUNT(*) = ")
            .bind(rule.all_tags.len() as i64)
            .push(")");
    }
    if !rule.any_tags.is_empty() {
        sql.push(&format!(" AND {column} IN ("));
        tags(sql, &mut rule.any_tags.iter());
        sql.push(")");
    }
    if !rule.none_tags.is_empty() {
        sql.push(&format!(" AND {column} NOT IN ("));
        tags(sql, &mut rule.none_tags.iter());
        sql.push(")");
    }
    sql.push(")");
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use sea_orm::FromQueryResult;

    use super::*;
    use crate::{
        domain::{OPT_IN_LIFETIME_MS, OptInEvent, PageId, Psid, Tag},
        store::{
            audience, now_ms, optins,
            testing::{TestStore, store_tests},
        },
    };

    /// The psids a `SELECT … AS psid` finds, in order.
    async fn psids(t: &TestStore, sql: Sql) -> Vec<String> {
        #[derive(FromQueryResult)]
        struct Row {
            psid: String,
        }
        Row::find_by_statement(sql.statement())
            .all(t.db())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.psid)
            .collect()
    }

    fn aim<'a>(page: &'a PageId, topic: &'a str) -> Aim<'a> {
        Aim {
            page_id: page.as_str(),
            topic,
            kinds: TokenKind::ALL,
        }
    }

    async fn usable(t: &TestStore, page: &PageId, topic: &str, now: i64) -> Vec<String> {
        let mut sql = Sql::new(t.backend());
        sql.push("SELECT o.psid AS psid FROM optins o WHERE ");
        usable_optin(&mut sql, "o", aim(page, topic), now);
        sql.push(" ORDER BY o.psid");
        psids(t, sql).await
    }

    async fn in_window(t: &TestStore, page: &PageId, topic: &str, now: i64) -> Vec<String> {
        let mut sql = Sql::new(t.backend());
        sql.push("SELECT s.psid AS psid FROM subscribers s WHERE ");
        window_user(&mut sql, "s", aim(page, topic), now);
        sql.push(" ORDER BY s.psid");
        psids(t, sql).await
    }

    async fn segment(t: &TestStore, page: &PageId, rule: &SegmentRule) -> Vec<String> {
        let mut sql = Sql::new(t.backend());
        sql.push("SELECT s.psid AS psid FROM subscribers s WHERE s.page_id = ")
            .bind(page.as_str())
            .push(" AND ");
        in_segment(&mut sql, "s.psid", page.as_str(), rule);
        sql.push(" ORDER BY s.psid");
        psids(t, sql).await
    }

    async fn tag(t: &TestStore, page: &PageId, psid: &str, tags: &[&str]) {
        let psids = BTreeSet::from([Psid::parse(psid).unwrap()]);
        let add = tags.iter().map(|tag| Tag::parse(tag).unwrap()).collect();
        audience::tag_subscribers(t.db(), page, &psids, &add, &BTreeSet::new(), now_ms())
            .await
            .unwrap();
    }

    fn rule(all: &[&str], any: &[&str], none: &[&str]) -> SegmentRule {
        let set = |tags: &[&str]| tags.iter().map(|t| t.to_string()).collect();
        SegmentRule {
            all_tags: set(all),
            any_tags: set(any),
            none_tags: set(none),
        }
    }

    #[test]
    fn a_token_must_outlive_the_step_by_the_minimum_life() {
        assert_eq!(token_cutoff(1_000), 1_000 + MIN_TOKEN_LIFE_MS);
    }

    store_tests! {
        /// Active, on the page's topic, and valid past the cut-off: nothing else is presented.
        async fn a_usable_opt_in_is_active_on_the_topic_and_outlives_the_cutoff(t) {
            let now = now_ms();
            let (page, other) = (t.page("1").await, t.page("2").await);
            t.opt_in(&page, "a", "news", "t-a", now).await;
            t.opt_in(&page, "b", "sport", "t-b", now).await;
            // Expires 30 s from now: inside the minimum life.
            t.opt_in(&page, "c", "news", "t-c", now - OPT_IN_LIFETIME_MS + 30_000)
                .await;
            let reserved = t.opt_in(&page, "d", "news", "t-d", now).await;
            optins::apply(t.db(), OptInEvent::Reserve, &[reserved.id], now)
                .await
                .unwrap();
            t.opt_in(&other, "e", "news", "t-e", now).await;
            assert_eq!(usable(&t, &page, "news", now).await, ["a"]);
        }

        /// Inside the window (a day since they wrote), and not reachable by token on the topic.
        async fn a_window_user_wrote_within_a_day_and_has_no_usable_opt_in_on_the_topic(t) {
            let now = now_ms();
            let page = t.page("1").await;
            t.interaction(&page, "a", now - 3_600_000).await;
            t.interaction(&page, "b", now - WINDOW_MS - 1).await;
            t.opt_in(&page, "c", "news", "t-c", now).await;
            t.opt_in(&page, "d", "sport", "t-d", now).await;
            t.opt_in(&page, "e", "news", "t-e", now - OPT_IN_LIFETIME_MS)
                .await;
            t.interaction(&page, "e", now).await;
            // Tagged by a CRM, never wrote: no interaction at all.
            tag(&t, &page, "f", &["x"]).await;
            assert_eq!(in_window(&t, &page, "news", now).await, ["a", "d", "e"]);
        }

        /// All, any and none each narrow the page's users; tags of another page count for
        /// nothing.
        async fn a_segment_holds_the_users_every_condition_of_its_rule_holds_for(t) {
            let (page, other) = (t.page("1").await, t.page("2").await);
            tag(&t, &page, "a", &["x", "y"]).await;
            tag(&t, &page, "b", &["x"]).await;
            tag(&t, &page, "c", &["y"]).await;
            tag(&t, &page, "d", &[]).await;
            tag(&t, &other, "b", &["y"]).await;
            assert_eq!(
                segment(&t, &page, &rule(&[], &[], &[])).await,
                ["a", "b", "c", "d"]
            );
            assert_eq!(
                segment(&t, &page, &rule(&["x", "y"], &[], &[])).await,
                ["a"]
            );
            assert_eq!(
                segment(&t, &page, &rule(&[], &["x", "z"], &[])).await,
                ["a", "b"]
            );
            assert_eq!(
                segment(&t, &page, &rule(&[], &[], &["y"])).await,
                ["b", "d"]
            );
            assert_eq!(segment(&t, &page, &rule(&["x"], &["y"], &[])).await, ["a"]);
            assert_eq!(segment(&t, &page, &rule(&["x"], &[], &["y"])).await, ["b"]);
        }
    }
}
