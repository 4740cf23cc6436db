use sea_orm_migration::prelude::*;

/// Erased subscribers, remembered without who they were: a keyed digest of the psid per page
/// (see `SecretCipher::digest`) and when the erasure happened, so that a late webhook (a
/// redelivery, a read receipt of an old message) does not bring the user back.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Erasures::Table)
                    .col(ColumnDef::new(Erasures::PageId).string().not_null())
                    .col(ColumnDef::new(Erasures::PsidDigest).string().not_null())
                    .col(ColumnDef::new(Erasures::ErasedAt).big_integer().not_null())
                    .primary_key(
                        Index::create()
                            .col(Erasures::PageId)
                            .col(Erasures::PsidDigest),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_erasures_page")
                            .from(Erasures::Table, Erasures::PageId)
                            .to(Alias::new("pages"), Alias::new("id"))
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Erasures::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Erasures {
    Table,
    PageId,
    PsidDigest,
    ErasedAt,
}
