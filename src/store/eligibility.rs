//! Who a send can reach, defined once. A send materialises exactly these users, and
//! EstimateAudience counts exactly these users: a user the estimate promises is a user the send
//! reaches, by the same route.
//!
//! - By token: a user with a usable opt-in on the topic: `active`, and valid for at least
//!   [`MIN_TOKEN_LIFE_MS`] more (a token about to lapse is never presented).
//! - In the window (when the story asks for it): a user of the page whose last interaction is
//!   less than 24 hours old and who has no usable opt-in on the topic.
//! - The segment, when there is one, applies to both.
//!
//! Each condition is a fixed number of clauses whatever the segment's size: a rule's tags are
//! one `IN` list per kind of condition, never one clause per tag (SQLite refuses an expression
//! deeper than 1,000 and a compound select of more than 500 terms).

use super::sql::Sql;
use crate::domain::{MIN_TOKEN_LIFE_MS, SegmentRule, WINDOW_MS};

/// The cut-off a usable opt-in's expiry must be after, judged at `now`.
pub fn token_cutoff(now: i64) -> i64 {
    now + MIN_TOKEN_LIFE_MS
}

/// True for a usable opt-in row `alias` on the page's topic.
pub fn usable_optin(sql: &mut Sql, alias: &str, page_id: &str, topic: &str, now: i64) {
    sql.push(&format!("{alias}.page_id = "))
        .bind(page_id)
        .push(&format!(" AND {alias}.topic = "))
        .bind(topic)
        .push(&format!(
            " AND {alias}.state = 'active' AND {alias}.expires_at > "
        ))
        .bind(token_cutoff(now));
}

/// True for a subscriber row `alias` whom a send reaches in the window (when it asks for it).
pub fn window_user(sql: &mut Sql, alias: &str, page_id: &str, topic: &str, now: i64) {
    sql.push(&format!("{alias}.page_id = "))
        .bind(page_id)
        .push(&format!(" AND {alias}.last_interaction_at > "))
        .bind(now - WINDOW_MS)
        .push(&format!(
            " AND NOT EXISTS (SELECT 1 FROM optins u WHERE u.psid = {alias}.psid AND "
        ));
    usable_optin(sql, "u", page_id, topic, now);
    sql.push(")");
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
