use sea_orm_migration::prelude::*;

/// A send's audience as counted when it started (`expected_total`). Deliveries are materialised
/// in batches as the send goes, so `total` grows with them; until the audience is all
/// materialised, progress reports this count as the total, so that a watcher's bar and ETA
/// mean something from the first second. Sends started before this column existed have 0 and
/// report `total` as before.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Sends::Table)
                    .add_column(
                        ColumnDef::new(Sends::ExpectedTotal)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Sends::Table)
                    .drop_column(Sends::ExpectedTotal)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum Sends {
    Table,
    ExpectedTotal,
}
