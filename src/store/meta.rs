//! Facts the service keeps about its own database.

use sea_orm::{ActiveValue::Set, entity::prelude::*, sea_query::OnConflict};

use super::StoreError;
use crate::crypto::SecretCipher;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "service_meta")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    pub value: Vec<u8>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

const KEY_CHECK: &str = "master_key_check";
const KEY_CHECK_PLAINTEXT: &str = "otnd master key check";

#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// First start on this database: the check value was written.
    Recorded,
    /// The key opens the value sealed on an earlier start.
    Matches,
    /// The key differs from the one that sealed this database's secrets.
    Mismatch,
}

/// Seals a known value on the first start and opens it on every later one, so that a service
/// started with another master key stops at once instead of failing on every page later.
pub async fn check_master_key(
    db: &DatabaseConnection,
    cipher: &SecretCipher,
) -> Result<KeyCheck, StoreError> {
    let sealed = cipher.seal(KEY_CHECK_PLAINTEXT, KEY_CHECK);
    let inserted = Entity::insert(ActiveModel {
        name: Set(KEY_CHECK.to_string()),
        value: Set(sealed),
    })
    .on_conflict(OnConflict::column(Column::Name).do_nothing().to_owned())
    .exec_without_returning(db)
    .await?;
    if inserted == 1 {
        return Ok(KeyCheck::Recorded);
    }
    let stored = Entity::find_by_id(KEY_CHECK.to_string())
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(match cipher.open(&stored.value, KEY_CHECK) {
        Ok(_) => KeyCheck::Matches,
        Err(_) => KeyCheck::Mismatch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crypto::MasterKey,
        store::testing::{cipher, store_tests},
    };

    async fn stored(db: &DatabaseConnection) -> Vec<Model> {
        Entity::find().all(db).await.unwrap()
    }

    store_tests! {
        /// The check value is inserted only where none is: a second start with the same key
        /// writes nothing and finds it opens.
        async fn the_first_start_records_the_check_and_the_next_finds_it_matches(t) {
            assert_eq!(
                check_master_key(t.db(), &cipher()).await.unwrap(),
                KeyCheck::Recorded
            );
            let recorded = stored(t.db()).await;
            assert_eq!(recorded.len(), 1);
            assert_eq!(
                check_master_key(t.db(), &cipher()).await.unwrap(),
                KeyCheck::Matches
            );
            assert_eq!(
                stored(t.db()).await,
                recorded,
                "the second start wrote nothing"
            );
        }

        /// Another key must not replace the check value (the secrets stay sealed under the
        /// first): it is told apart, and the value stays the one the first key opens.
        async fn another_key_is_a_mismatch_and_leaves_the_check_as_it_was(t) {
            check_master_key(t.db(), &cipher()).await.unwrap();
            let recorded = stored(t.db()).await;
            let other = SecretCipher::new(&MasterKey::from_bytes(&[7; 32]).unwrap());
            assert_eq!(
                check_master_key(t.db(), &other).await.unwrap(),
                KeyCheck::Mismatch
            );
            assert_eq!(stored(t.db()).await, recorded);
            assert_eq!(
                check_master_key(t.db(), &cipher()).await.unwrap(),
                KeyCheck::Matches
            );
        }
    }
}
