use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Pages::Table)
                    .col(ColumnDef::new(Pages::Id).string().not_null().primary_key())
                    .col(ColumnDef::new(Pages::Name).string().not_null())
                    .col(ColumnDef::new(Pages::AccessTokenEnc).blob().not_null())
                    .col(ColumnDef::new(Pages::AppSecretEnc).blob().not_null())
                    .col(ColumnDef::new(Pages::VerifyTokenEnc).blob().null())
                    .col(
                        ColumnDef::new(Pages::SendRatePerSecond)
                            .integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Pages::CreatedAt).big_integer().not_null())
                    .col(ColumnDef::new(Pages::UpdatedAt).big_integer().not_null())
                    .to_owned(),
            )
            .await?;

        // Facts about the database itself, e.g. a value sealed with the master key, so that a
        // start with the wrong key is refused before it writes anything.
        manager
            .create_table(
                Table::create()
                    .table(ServiceMeta::Table)
                    .col(
                        ColumnDef::new(ServiceMeta::Name)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(ServiceMeta::Value).blob().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ServiceMeta::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Pages::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Pages {
    Table,
    Id,
    Name,
    AccessTokenEnc,
    AppSecretEnc,
    VerifyTokenEnc,
    SendRatePerSecond,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ServiceMeta {
    Table,
    Name,
    Value,
}
