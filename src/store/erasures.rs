//! Erased subscribers. An erasure removes every row about the user; what remains is a
//! tombstone: the page, a keyed digest of the psid (nobody without the master key can tell whose
//! it is) and when it happened, so that events from before it, which Facebook may still deliver
//! late (a redelivered opt-in, a read receipt of an old message), do not bring the user back.

use std::collections::HashMap;

use sea_orm::{ConnectionTrait, FromQueryResult};

use super::{StoreError, sql::Sql};
use crate::crypto::SecretCipher;

/// The tombstone key of a page's user.
pub fn digest(cipher: &SecretCipher, page_id: &str, psid: &str) -> String {
    cipher.digest(&format!("erasures/{page_id}"), psid)
}

/// Serialises, for the rest of the transaction, the page's ingestion of events with its
/// erasures (PostgreSQL: a transaction-scoped advisory lock per page, taken in page order so that
/// two ingestions never wait for each other crosswise; SQLite's writers are serialised anyway).
/// Without it, under READ COMMITTED, an ingestion that read no tombstone could insert the user's
/// opt-in after an erasure that began later had deleted their rows and committed: the erased
/// user would be back, with a token a send could use.
pub async fn serialize_with_erasures<'a>(
    db: &impl ConnectionTrait,
    page_ids: impl IntoIterator<Item = &'a str>,
) -> Result<(), StoreError> {
    if db.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
        return Ok(());
    }
    let pages: std::collections::BTreeSet<&str> = page_ids.into_iter().collect();
    for page_id in pages {
        let mut sql = Sql::new(db.get_database_backend());
        sql.push("SELECT pg_advisory_xact_lock(hashtextextended(")
            .bind(format!("otnd/erasures/{page_id}"))
            .push(", 0))");
        db.execute_raw(sql.statement()).await?;
    }
    Ok(())
}

/// Remembers that the page's user (by digest) was erased at `now` (the latest erasure counts).
pub async fn remember(
    db: &impl ConnectionTrait,
    page_id: &str,
    digest: &str,
    now: i64,
) -> Result<(), StoreError> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("INSERT INTO erasures (page_id, psid_digest, erased_at) VALUES (")
        .bind(page_id)
        .push(", ")
        .bind(digest)
        .push(", ")
        .bind(now)
        .push(") ON CONFLICT (page_id, psid_digest) DO UPDATE SET erased_at = excluded.erased_at");
    db.execute_raw(sql.statement()).await?;
    Ok(())
}

/// When each of these users of the page was erased, for those who were.
pub async fn erased_at(
    db: &impl ConnectionTrait,
    page_id: &str,
    digests: &[&str],
) -> Result<HashMap<String, i64>, StoreError> {
    #[derive(FromQueryResult)]
    struct Row {
        psid_digest: String,
        erased_at: i64,
    }
    let mut erased = HashMap::new();
    for chunk in digests.chunks(500) {
        let mut sql = Sql::new(db.get_database_backend());
        sql.push("SELECT psid_digest, erased_at FROM erasures WHERE page_id = ")
            .bind(page_id)
            .push(" AND psid_digest IN (");
        for (i, digest) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(*digest);
        }
        sql.push(")");
        for row in Row::find_by_statement(sql.statement()).all(db).await? {
            erased.insert(row.psid_digest, row.erased_at);
        }
    }
    Ok(erased)
}

/// Whether an event about an erased user is to be dropped: anything that only says the user is
/// there (a read, a delivery receipt), and anything from before the erasure. A message or an
/// opt-in from after it is the user coming back.
pub fn is_late(event_at: i64, acts: bool, erased_at: i64) -> bool {
    !acts || event_at <= erased_at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{cipher, store_tests};

    #[test]
    fn only_a_new_act_after_the_erasure_brings_a_user_back() {
        assert!(is_late(100, false, 50), "a read receipt, even a later one");
        assert!(is_late(40, true, 50), "a message from before the erasure");
        assert!(is_late(50, true, 50));
        assert!(
            !is_late(51, true, 50),
            "the user wrote again after the erasure"
        );
    }

    /// A digest names a user of one page: the same psid on another page is another tombstone.
    #[test]
    fn a_digest_is_stable_and_bound_to_its_page() {
        let cipher = cipher();
        assert_eq!(digest(&cipher, "1", "u"), digest(&cipher, "1", "u"));
        assert_ne!(digest(&cipher, "1", "u"), digest(&cipher, "2", "u"));
        assert_ne!(digest(&cipher, "1", "u"), digest(&cipher, "1", "v"));
    }

    store_tests! {
        async fn remembering_an_erasure_twice_keeps_one_tombstone(t) {
            let page = t.page("1").await;
            remember(t.db(), page.as_str(), "d1", 100).await.unwrap();
            remember(t.db(), page.as_str(), "d1", 100).await.unwrap();
            let found = erased_at(t.db(), page.as_str(), &["d1"]).await.unwrap();
            assert_eq!(found, HashMap::from([("d1".to_string(), 100)]));
        }

        /// The user came back and asked again: events between the two erasures are late too.
        async fn a_later_erasure_moves_the_tombstone_to_it(t) {
            let page = t.page("1").await;
            remember(t.db(), page.as_str(), "d1", 100).await.unwrap();
            remember(t.db(), page.as_str(), "d1", 200).await.unwrap();
            let found = erased_at(t.db(), page.as_str(), &["d1"]).await.unwrap();
            assert_eq!(found["d1"], 200);
        }

        async fn a_tombstone_is_found_only_on_its_page_and_only_for_its_digest(t) {
            let (one, two) = (t.page("1").await, t.page("2").await);
            remember(t.db(), one.as_str(), "d1", 100).await.unwrap();
            assert!(
                erased_at(t.db(), two.as_str(), &["d1"])
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert!(
                erased_at(t.db(), one.as_str(), &["d2"])
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert!(
                erased_at(t.db(), one.as_str(), &[])
                    .await
                    .unwrap()
                    .is_empty()
            );
        }

        /// Looked up 500 digests a statement: one on each side of the cut is found.
        async fn digests_past_one_statement_are_all_looked_up(t) {
            let page = t.page("1").await;
            let digests: Vec<String> = (0..501).map(|i| format!("d{i:03}")).collect();
            remember(t.db(), page.as_str(), "d000", 1).await.unwrap();
            remember(t.db(), page.as_str(), "d500", 2).await.unwrap();
            let keys: Vec<&str> = digests.iter().map(String::as_str).collect();
            let found = erased_at(t.db(), page.as_str(), &keys).await.unwrap();
            assert_eq!(found.len(), 2);
            assert_eq!((found["d000"], found["d500"]), (1, 2));
        }
    }
}
