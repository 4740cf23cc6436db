use sea_orm_migration::prelude::*;

/// Stories: the one message sent on a topic, and its review.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Stories::Table)
                    .col(
                        ColumnDef::new(Stories::Id)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Stories::PageId).string().not_null())
                    .col(ColumnDef::new(Stories::Topic).string().not_null())
                    // The exact Graph `message` object the send will use, as JSON.
                    .col(ColumnDef::new(Stories::Content).text().not_null())
                    // SHA-256 of `content`; a review holds while it equals `reviewed_hash`.
                    .col(ColumnDef::new(Stories::ContentHash).string().not_null())
                    .col(
                        ColumnDef::new(Stories::IncludeWindowUsers)
                            .boolean()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Stories::SegmentId).string().null())
                    .col(ColumnDef::new(Stories::ReviewedHash).string().null())
                    .col(ColumnDef::new(Stories::ReviewedAt).big_integer().null())
                    .col(ColumnDef::new(Stories::ReviewerPsid).string().null())
                    // draft | sent
                    .col(ColumnDef::new(Stories::State).string().not_null())
                    .col(ColumnDef::new(Stories::Version).big_integer().not_null())
                    .col(ColumnDef::new(Stories::CreatedAt).big_integer().not_null())
                    .col(ColumnDef::new(Stories::UpdatedAt).big_integer().not_null())
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_stories_page")
                            .from(Stories::Table, Stories::PageId)
                            .to(Alias::new("pages"), Alias::new("id"))
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    // A segment in use cannot be deleted from under a story.
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_stories_segment")
                            .from(Stories::Table, Stories::SegmentId)
                            .to(Alias::new("segments"), Alias::new("id"))
                            .on_delete(ForeignKeyAction::Restrict),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_stories_page_topic")
                    .table(Stories::Table)
                    .col(Stories::PageId)
                    .col(Stories::Topic)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Stories::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Stories {
    Table,
    Id,
    PageId,
    Topic,
    Content,
    ContentHash,
    IncludeWindowUsers,
    SegmentId,
    ReviewedHash,
    ReviewedAt,
    ReviewerPsid,
    State,
    Version,
    CreatedAt,
    UpdatedAt,
}
