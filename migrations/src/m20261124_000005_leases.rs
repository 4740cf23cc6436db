use sea_orm_migration::prelude::*;

/// Page leases: with several instances on one PostgreSQL, an instance runs a page's actor only
/// while it holds the page's unexpired lease; the generation, raised by every change of owner,
/// fences every write of the page's deliveries so that an owner that lost the page (paused, cut
/// off) cannot record anything after. Instances' heartbeats tell how many share the pages.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(PageLeases::Table)
                    .col(
                        ColumnDef::new(PageLeases::PageId)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(PageLeases::Owner).string().not_null())
                    .col(
                        ColumnDef::new(PageLeases::Generation)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(PageLeases::ExpiresAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Instances::Table)
                    .col(
                        ColumnDef::new(Instances::Id)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(Instances::StartedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Instances::HeartbeatAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Instances::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(PageLeases::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum PageLeases {
    Table,
    PageId,
    Owner,
    Generation,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum Instances {
    Table,
    Id,
    StartedAt,
    HeartbeatAt,
}
