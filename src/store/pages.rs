//! The `pages` table: a page's settings and its sealed secrets.

use sea_orm::{
    ActiveValue::{NotSet, Set},
    QueryOrder, QuerySelect, TryIntoModel,
    entity::prelude::*,
};
use secrecy::SecretString;

use super::{StoreError, now_ms};
use crate::{
    crypto::SecretCipher,
    domain::{NewPage, PageChanges, PageCredentials, PageId, PageSecret, SendState},
};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "pages")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub name: String,
    pub access_token_enc: Vec<u8>,
    pub app_secret_enc: Vec<u8>,
    pub verify_token_enc: Option<Vec<u8>>,
    pub send_rate_per_second: i32,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// A page as the rest of the service sees it: settings, and only whether each secret is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRecord {
    pub id: PageId,
    pub name: String,
    pub send_rate_per_second: u32,
    pub has_access_token: bool,
    pub has_app_secret: bool,
    pub has_verify_token: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl From<Model> for PageRecord {
    fn from(m: Model) -> Self {
        PageRecord {
            id: PageId::from_trusted(m.id),
            name: m.name,
            send_rate_per_second: u32::try_from(m.send_rate_per_second).unwrap_or(0),
            has_access_token: !m.access_token_enc.is_empty(),
            has_app_secret: !m.app_secret_enc.is_empty(),
            has_verify_token: m.verify_token_enc.is_some(),
            created_at_ms: m.created_at,
            updated_at_ms: m.updated_at,
        }
    }
}

/// Where a sealed secret belongs; sealing binds the value to it.
fn seal_context(page_id: &PageId, column: &str) -> String {
    format!("pages/{page_id}/{column}")
}

fn seal(cipher: &SecretCipher, page_id: &PageId, column: &str, secret: &PageSecret) -> Vec<u8> {
    cipher.seal(secret.expose(), &seal_context(page_id, column))
}

pub async fn create(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    page: &NewPage,
) -> Result<PageRecord, StoreError> {
    let now = now_ms();
    let model = ActiveModel {
        id: Set(page.id.as_str().to_string()),
        name: Set(page.name.as_str().to_string()),
        access_token_enc: Set(seal(cipher, &page.id, "access_token", &page.access_token)),
        app_secret_enc: Set(seal(cipher, &page.id, "app_secret", &page.app_secret)),
        verify_token_enc: Set(page
            .verify_token
            .as_ref()
            .map(|token| seal(cipher, &page.id, "verify_token", token))),
        send_rate_per_second: Set(page.send_rate.get() as i32),
        created_at: Set(now),
        updated_at: Set(now),
    };
    Entity::insert(model.clone())
        .exec_without_returning(db)
        .await?;
    Ok(PageRecord::from(
        model.try_into_model().map_err(StoreError::from)?,
    ))
}

pub async fn get(db: &impl ConnectionTrait, id: &PageId) -> Result<PageRecord, StoreError> {
    Entity::find_by_id(id.as_str().to_string())
        .one(db)
        .await?
        .map(PageRecord::from)
        .ok_or(StoreError::NotFound)
}

/// Up to `limit` pages ordered by id, starting after `after`.
pub async fn list(
    db: &impl ConnectionTrait,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<PageRecord>, StoreError> {
    let mut query = Entity::find().order_by_asc(Column::Id).limit(limit);
    if let Some(after) = after {
        query = query.filter(Column::Id.gt(after));
    }
    Ok(query
        .all(db)
        .await?
        .into_iter()
        .map(PageRecord::from)
        .collect())
}

pub async fn update(
    db: &DatabaseConnection,
    cipher: &SecretCipher,
    id: &PageId,
    changes: &PageChanges,
) -> Result<PageRecord, StoreError> {
    let txn = super::begin_write(db).await?;
    let exists = Entity::find_by_id(id.as_str().to_string())
        .select_only()
        .column(Column::Id)
        .into_tuple::<String>()
        .one(&txn)
        .await?;
    if exists.is_none() {
        return Err(StoreError::NotFound);
    }
    let set_or_keep = |value: Option<Vec<u8>>| value.map_or(NotSet, Set);
    let model = ActiveModel {
        id: Set(id.as_str().to_string()),
        name: changes
            .name
            .as_ref()
            .map_or(NotSet, |name| Set(name.as_str().to_string())),
        access_token_enc: set_or_keep(
            changes
                .access_token
                .as_ref()
                .map(|s| seal(cipher, id, "access_token", s)),
        ),
        app_secret_enc: set_or_keep(
            changes
                .app_secret
                .as_ref()
                .map(|s| seal(cipher, id, "app_secret", s)),
        ),
        verify_token_enc: changes.verify_token.as_ref().map_or(NotSet, |token| {
            Set(token
                .as_ref()
                .map(|token| seal(cipher, id, "verify_token", token)))
        }),
        send_rate_per_second: changes
            .send_rate
            .map_or(NotSet, |rate| Set(rate.get() as i32)),
        created_at: NotSet,
        updated_at: Set(now_ms()),
    };
    let updated = model.update(&txn).await?;
    txn.commit().await?;
    Ok(PageRecord::from(updated))
}

/// Locks the page's row for the rest of the transaction (PostgreSQL; SQLite's writers are
/// serialised anyway); `false` when there is no such page. A send being started holds a share
/// lock on the row through its foreign key, which this waits for.
async fn lock(db: &impl ConnectionTrait, id: &PageId) -> Result<bool, StoreError> {
    let backend = db.get_database_backend();
    let mut sql = super::sql::Sql::new(backend);
    sql.push("SELECT id FROM pages WHERE id = ")
        .bind(id.as_str());
    if backend == sea_orm::DatabaseBackend::Postgres {
        sql.push(" FOR UPDATE");
    }
    Ok(db.query_one_raw(sql.statement()).await?.is_some())
}

/// Why a page cannot be deleted yet.
#[derive(Debug, PartialEq, Eq)]
pub enum Deletion {
    Deleted,
    /// These sends are not finished (or have deliveries in flight): id and state.
    SendsUnfinished(Vec<(String, SendState)>),
}

/// Deletes the page and everything of it, in one transaction, children first (sends hold their
/// stories, stories their segments, so the order matters where a cascade's would not), unless a
/// send of the page may still call Facebook: then nothing changes. The page's row is locked
/// first, and StartSend shares that lock: no send starts while the page is being deleted.
pub async fn delete(db: &DatabaseConnection, id: &PageId) -> Result<Deletion, StoreError> {
    use super::sends::send;
    let txn = super::begin_write(db).await?;
    if !lock(&txn, id).await? {
        return Err(StoreError::NotFound);
    }
    let unfinished: Vec<(String, SendState)> = send::Entity::find()
        .filter(send::Column::PageId.eq(id.as_str()))
        .all(&txn)
        .await?
        .into_iter()
        .filter(|s| !s.state.is_finished() || s.in_flight > 0)
        .map(|s| (s.id, s.state))
        .collect();
    if !unfinished.is_empty() {
        return Ok(Deletion::SendsUnfinished(unfinished));
    }
    let page = id.as_str();
    for statement in [
        "DELETE FROM deliveries WHERE send_id IN (SELECT id FROM sends WHERE page_id = $1)",
        "DELETE FROM sends WHERE page_id = $1",
        "DELETE FROM stories WHERE page_id = $1",
        "DELETE FROM segments WHERE page_id = $1",
        "DELETE FROM optins WHERE page_id = $1",
        "DELETE FROM optin_requests WHERE page_id = $1",
        "DELETE FROM subscriber_tags WHERE page_id = $1",
        "DELETE FROM subscribers WHERE page_id = $1",
        "DELETE FROM erasures WHERE page_id = $1",
        "DELETE FROM page_leases WHERE page_id = $1",
        "DELETE FROM pages WHERE id = $1",
    ] {
        let mut sql = super::sql::Sql::new(txn.get_database_backend());
        let (head, tail) = statement.split_once("$1").expect("one placeholder");
        sql.push(head).bind(page).push(tail);
        txn.execute_raw(sql.statement()).await?;
    }
    txn.commit().await?;
    Ok(Deletion::Deleted)
}

/// Opens the page's secrets.
pub async fn credentials(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    id: &PageId,
) -> Result<PageCredentials, StoreError> {
    let model = Entity::find_by_id(id.as_str().to_string())
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)?;
    let open = |sealed: &[u8], column: &str| cipher.open(sealed, &seal_context(id, column));
    Ok(PageCredentials {
        access_token: open(&model.access_token_enc, "access_token")?,
        app_secret: open(&model.app_secret_enc, "app_secret")?,
        verify_token: model
            .verify_token_enc
            .as_deref()
            .map(|sealed| open(sealed, "verify_token"))
            .transpose()?,
    })
}

/// The app secrets of those of `ids` that are registered (webhook signature checks).
pub async fn app_secrets(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    ids: impl IntoIterator<Item = &PageId>,
) -> Result<Vec<(PageId, SecretString)>, StoreError> {
    let ids: Vec<String> = ids.into_iter().map(|id| id.as_str().to_string()).collect();
    let rows = Entity::find()
        .select_only()
        .column(Column::Id)
        .column(Column::AppSecretEnc)
        .filter(Column::Id.is_in(ids))
        .into_tuple::<(String, Vec<u8>)>()
        .all(db)
        .await?;
    rows.into_iter()
        .map(|(id, sealed)| {
            let id = PageId::from_trusted(id);
            let secret = cipher.open(&sealed, &seal_context(&id, "app_secret"))?;
            Ok((id, secret))
        })
        .collect()
}

/// Every page's verify token (webhook subscription checks name no page).
pub async fn verify_tokens(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
) -> Result<Vec<SecretString>, StoreError> {
    let rows = Entity::find()
        .select_only()
        .column(Column::Id)
        .column(Column::VerifyTokenEnc)
        .filter(Column::VerifyTokenEnc.is_not_null())
        .into_tuple::<(String, Option<Vec<u8>>)>()
        .all(db)
        .await?;
    rows.into_iter()
        .filter_map(|(id, sealed)| Some((PageId::from_trusted(id), sealed?)))
        .map(|(id, sealed)| Ok(cipher.open(&sealed, &seal_context(&id, "verify_token"))?))
        .collect()
}

/// Whether the page is registered.
pub async fn exists(db: &impl ConnectionTrait, id: &PageId) -> Result<bool, StoreError> {
    Ok(Entity::find_by_id(id.as_str().to_string())
        .select_only()
        .column(Column::Id)
        .into_tuple::<String>()
        .one(db)
        .await?
        .is_some())
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::{
        domain::NewPage,
        store::{
            erasures, sends,
            sql::Sql,
            testing::{TestStore, cipher, store_tests},
        },
    };

    fn changes(name: Option<&str>, verify_token: Option<&str>) -> PageChanges {
        PageChanges::parse(name, None, None, verify_token, None).unwrap()
    }

    async fn rows_of(t: &TestStore, table: &str, column: &str, page: &PageId) -> i64 {
        let mut sql = Sql::new(t.backend());
        sql.push(&format!(
            "SELECT COUNT(*) AS n FROM {table} WHERE {column} = "
        ))
        .bind(page.as_str());
        let row = t
            .db()
            .query_one_raw(sql.statement())
            .await
            .unwrap()
            .unwrap();
        row.try_get::<i64>("", "n").unwrap()
    }

    store_tests! {
        /// A page is created once: a second create is refused and leaves the first as it was.
        async fn creating_a_page_twice_is_refused_and_keeps_the_first(t) {
            let page = t.page("1").await;
            let again = NewPage::parse("1", "Another", "at", "as", "", None).unwrap();
            let refused = create(t.db(), &cipher(), &again).await;
            assert!(
                matches!(refused, Err(StoreError::AlreadyExists)),
                "{refused:?}"
            );
            let stored = get(t.db(), &page).await.unwrap();
            assert_eq!(
                (stored.name.as_str(), stored.has_verify_token),
                ("A page", true)
            );
        }

        async fn an_update_changes_only_the_fields_it_names(t) {
            let page = t.page("1").await;
            let updated = update(t.db(), &cipher(), &page, &changes(Some("Renamed"), None))
                .await
                .unwrap();
            assert_eq!(
                (updated.name.as_str(), updated.has_verify_token),
                ("Renamed", true)
            );
            let credentials = credentials(t.db(), &cipher(), &page).await.unwrap();
            assert_eq!(credentials.access_token.expose_secret(), "access-token");
            // An empty verify token removes it (and only it).
            let updated = update(t.db(), &cipher(), &page, &changes(None, Some("")))
                .await
                .unwrap();
            assert_eq!(
                (updated.name.as_str(), updated.has_verify_token),
                ("Renamed", false)
            );
            assert_eq!(get(t.db(), &page).await.unwrap(), updated);
        }

        async fn updating_a_page_that_does_not_exist_creates_nothing(t) {
            let page = PageId::from_trusted("9".into());
            let missing = update(t.db(), &cipher(), &page, &changes(Some("X"), None)).await;
            assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
            assert!(!exists(t.db(), &page).await.unwrap());
        }

        /// A queued send may still call Facebook: the page stays, with everything of it.
        async fn a_page_with_an_unfinished_send_is_not_deleted(t) {
            let page = t.page("1").await;
            let send = t.send(&page, "news").await;
            let refused = delete(t.db(), &page).await.unwrap();
            assert_eq!(
                refused,
                Deletion::SendsUnfinished(vec![(send.id.clone(), SendState::Queued)])
            );
            assert!(exists(t.db(), &page).await.unwrap());
            assert_eq!(t.send_row(&send.id).await, send);
        }

        /// A cancelled send is finished, but its deliveries in flight are still to be answered.
        async fn a_cancelled_send_with_deliveries_in_flight_still_holds_its_page(t) {
            let page = t.page("1").await;
            let (send, _, _) = t.claimed_send(&page, "news", &["u1"]).await;
            sends::cancel(t.db(), &send.id, now_ms()).await.unwrap();
            let refused = delete(t.db(), &page).await.unwrap();
            assert_eq!(
                refused,
                Deletion::SendsUnfinished(vec![(send.id.clone(), SendState::Cancelled)])
            );
            assert_eq!(t.deliveries(&send.id).await.len(), 1);
        }

        async fn deleting_a_page_removes_everything_of_it_once_and_nothing_of_another(t) {
            let (page, other) = (t.page("1").await, t.page("2").await);
            let send = t.send_in(&page, "news", SendState::Completed).await;
            t.opt_in(&page, "u1", "sport", "t1", now_ms()).await;
            t.opt_in(&other, "u1", "sport", "t2", now_ms()).await;
            erasures::remember(t.db(), page.as_str(), "d", 1)
                .await
                .unwrap();
            t.fence(&page).await;
            assert_eq!(delete(t.db(), &page).await.unwrap(), Deletion::Deleted);
            assert!(!exists(t.db(), &page).await.unwrap());
            assert!(matches!(
                sends::get(t.db(), &send.id).await,
                Err(StoreError::NotFound)
            ));
            for (table, column) in [
                ("stories", "page_id"),
                ("optins", "page_id"),
                ("subscribers", "page_id"),
                ("erasures", "page_id"),
                ("page_leases", "page_id"),
            ] {
                assert_eq!(rows_of(&t, table, column, &page).await, 0, "{table}");
            }
            let again = delete(t.db(), &page).await;
            assert!(matches!(again, Err(StoreError::NotFound)), "{again:?}");
            assert_eq!(rows_of(&t, "optins", "page_id", &other).await, 1);
        }

        /// Secrets open only for the page they were sealed for; pages without a verify token
        /// give none, and an unknown page no app secret.
        async fn secrets_open_for_their_own_page_only(t) {
            let page = t.page("1").await;
            let bare = NewPage::parse("2", "Bare", "at", "as", "", None).unwrap();
            create(t.db(), &cipher(), &bare).await.unwrap();
            let unknown = PageId::from_trusted("3".into());
            let secrets = app_secrets(t.db(), &cipher(), [&page, &unknown])
                .await
                .unwrap();
            assert_eq!(secrets.len(), 1);
            assert_eq!(
                (&secrets[0].0, secrets[0].1.expose_secret()),
                (&page, "app-secret")
            );
            let tokens = verify_tokens(t.db(), &cipher()).await.unwrap();
            let tokens: Vec<&str> = tokens.iter().map(|s| s.expose_secret()).collect();
            assert_eq!(tokens, ["verify"]);
            assert!(matches!(
                credentials(t.db(), &cipher(), &unknown).await,
                Err(StoreError::NotFound)
            ));
        }

        async fn pages_are_listed_by_id_after_the_one_given(t) {
            for id in ["3", "1", "2"] {
                t.page(id).await;
            }
            let ids = |pages: Vec<PageRecord>| {
                pages
                    .into_iter()
                    .map(|p| p.id.to_string())
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(list(t.db(), None, 2).await.unwrap()), ["1", "2"]);
            assert_eq!(ids(list(t.db(), Some("2"), 2).await.unwrap()), ["3"]);
        }
    }
}
