use sea_orm_migration::prelude::*;

/// Subscribers, their tags, opt-in requests, opt-ins and segments. Everything cascades from the
/// page: deleting a page erases its audience.
#[derive(DeriveMigrationName)]
pub struct Migration;

fn page_fk(table: impl IntoIden, name: &str) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(name)
        .from(table, Alias::new("page_id"))
        .to(Alias::new("pages"), Alias::new("id"))
        .on_delete(ForeignKeyAction::Cascade)
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Subscribers::Table)
                    .col(ColumnDef::new(Subscribers::PageId).string().not_null())
                    .col(ColumnDef::new(Subscribers::Psid).string().not_null())
                    .col(
                        ColumnDef::new(Subscribers::FirstSeenAt)
                            .big_integer()
                            .not_null(),
                    )
                    // NULL until the user writes, posts back or opts in.
                    .col(
                        ColumnDef::new(Subscribers::LastInteractionAt)
                            .big_integer()
                            .null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(Subscribers::PageId)
                            .col(Subscribers::Psid),
                    )
                    .foreign_key(&mut page_fk(Subscribers::Table, "fk_subscribers_page"))
                    .to_owned(),
            )
            .await?;

        // Who is inside the 24-hour window.
        manager
            .create_index(
                Index::create()
                    .name("idx_subscribers_page_interaction")
                    .table(Subscribers::Table)
                    .col(Subscribers::PageId)
                    .col(Subscribers::LastInteractionAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(SubscriberTags::Table)
                    .col(ColumnDef::new(SubscriberTags::PageId).string().not_null())
                    .col(ColumnDef::new(SubscriberTags::Psid).string().not_null())
                    .col(ColumnDef::new(SubscriberTags::Tag).string().not_null())
                    .primary_key(
                        Index::create()
                            .col(SubscriberTags::PageId)
                            .col(SubscriberTags::Psid)
                            .col(SubscriberTags::Tag),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_subscriber_tags_subscriber")
                            .from(
                                SubscriberTags::Table,
                                (SubscriberTags::PageId, SubscriberTags::Psid),
                            )
                            .to(Subscribers::Table, (Subscribers::PageId, Subscribers::Psid))
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Segment rules ask "who on this page has tag T": answered from the index alone.
        manager
            .create_index(
                Index::create()
                    .name("idx_subscriber_tags_page_tag")
                    .table(SubscriberTags::Table)
                    .col(SubscriberTags::PageId)
                    .col(SubscriberTags::Tag)
                    .col(SubscriberTags::Psid)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(OptinRequests::Table)
                    .col(
                        ColumnDef::new(OptinRequests::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(OptinRequests::PageId).string().not_null())
                    .col(ColumnDef::new(OptinRequests::Psid).string().not_null())
                    .col(ColumnDef::new(OptinRequests::Topic).string().not_null())
                    .col(ColumnDef::new(OptinRequests::Title).string().not_null())
                    .col(
                        ColumnDef::new(OptinRequests::SentAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(OptinRequests::MessageId).string().not_null())
                    .foreign_key(&mut page_fk(OptinRequests::Table, "fk_optin_requests_page"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_optin_requests_page_topic")
                    .table(OptinRequests::Table)
                    .col(OptinRequests::PageId)
                    .col(OptinRequests::Topic)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Optins::Table)
                    .col(
                        ColumnDef::new(Optins::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Optins::PageId).string().not_null())
                    .col(ColumnDef::new(Optins::Psid).string().not_null())
                    .col(ColumnDef::new(Optins::Topic).string().not_null())
                    .col(ColumnDef::new(Optins::Token).string().not_null())
                    .col(ColumnDef::new(Optins::OptedInAt).big_integer().not_null())
                    .col(ColumnDef::new(Optins::ExpiresAt).big_integer().not_null())
                    // active | reserved | used | rejected | expired
                    .col(ColumnDef::new(Optins::State).string().not_null())
                    .col(ColumnDef::new(Optins::UsedAt).big_integer().null())
                    .col(ColumnDef::new(Optins::DeliveryId).string().null())
                    .foreign_key(&mut page_fk(Optins::Table, "fk_optins_page"))
                    .to_owned(),
            )
            .await?;
        // A token is one opt-in, however often Facebook redelivers it.
        manager
            .create_index(
                Index::create()
                    .name("uq_optins_page_token")
                    .table(Optins::Table)
                    .col(Optins::PageId)
                    .col(Optins::Token)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // A topic's opt-ins user by user (a send's audience: each user's first-expiring usable
        // opt-in; the estimate: one streaming pass grouped by user), covering state and expiry.
        manager
            .create_index(
                Index::create()
                    .name("idx_optins_page_topic_psid")
                    .table(Optins::Table)
                    .col(Optins::PageId)
                    .col(Optins::Topic)
                    .col(Optins::Psid)
                    .col(Optins::State)
                    .col(Optins::ExpiresAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_optins_page_psid")
                    .table(Optins::Table)
                    .col(Optins::PageId)
                    .col(Optins::Psid)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Segments::Table)
                    .col(
                        ColumnDef::new(Segments::Id)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Segments::PageId).string().not_null())
                    .col(ColumnDef::new(Segments::Name).string().not_null())
                    // JSON: {"all_tags": [...], "any_tags": [...], "none_tags": [...]}
                    .col(ColumnDef::new(Segments::Rule).text().not_null())
                    .col(ColumnDef::new(Segments::CreatedAt).big_integer().not_null())
                    .foreign_key(&mut page_fk(Segments::Table, "fk_segments_page"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_segments_page_name")
                    .table(Segments::Table)
                    .col(Segments::PageId)
                    .col(Segments::Name)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Segments::Table.into_iden(),
            Optins::Table.into_iden(),
            OptinRequests::Table.into_iden(),
            SubscriberTags::Table.into_iden(),
            Subscribers::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Subscribers {
    Table,
    PageId,
    Psid,
    FirstSeenAt,
    LastInteractionAt,
}

#[derive(DeriveIden)]
enum SubscriberTags {
    Table,
    PageId,
    Psid,
    Tag,
}

#[derive(DeriveIden)]
enum OptinRequests {
    Table,
    Id,
    PageId,
    Psid,
    Topic,
    Title,
    SentAt,
    MessageId,
}

#[derive(DeriveIden)]
enum Optins {
    Table,
    Id,
    PageId,
    Psid,
    Topic,
    Token,
    OptedInAt,
    ExpiresAt,
    State,
    UsedAt,
    DeliveryId,
}

#[derive(DeriveIden)]
enum Segments {
    Table,
    Id,
    PageId,
    Name,
    Rule,
    CreatedAt,
}
