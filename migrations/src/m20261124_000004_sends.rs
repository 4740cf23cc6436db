use sea_orm_migration::prelude::*;

/// Sends and their deliveries: the engine's queue and its record. Every guarantee the engine
/// gives rests on a constraint here as well as on the page actor's discipline.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Sends::Table)
                    .col(ColumnDef::new(Sends::Id).string().not_null().primary_key())
                    .col(ColumnDef::new(Sends::StoryId).string().not_null())
                    .col(ColumnDef::new(Sends::PageId).string().not_null())
                    // The client's idempotency key: one send per request id, ever.
                    .col(ColumnDef::new(Sends::RequestId).string().not_null())
                    // queued | running | paused | completed | cancelled | halted
                    .col(ColumnDef::new(Sends::State).string().not_null())
                    // What is sent and to whom, frozen at StartSend so that a send is
                    // reproducible whatever happens to the story or the segment later.
                    .col(ColumnDef::new(Sends::Topic).string().not_null())
                    .col(ColumnDef::new(Sends::Message).text().not_null())
                    .col(
                        ColumnDef::new(Sends::IncludeWindowUsers)
                            .boolean()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Sends::SegmentRule).text().null())
                    // Materialisation: `audience_phase` token -> window -> done, resuming after
                    // `audience_cursor` (the last psid materialised in the current phase).
                    .col(ColumnDef::new(Sends::AudiencePhase).string().not_null())
                    .col(ColumnDef::new(Sends::AudienceCursor).string().not_null())
                    // Counters, moved in the same transaction as the deliveries they count.
                    .col(ColumnDef::new(Sends::Total).big_integer().not_null())
                    .col(ColumnDef::new(Sends::InFlight).big_integer().not_null())
                    .col(ColumnDef::new(Sends::Sent).big_integer().not_null())
                    .col(ColumnDef::new(Sends::Failed).big_integer().not_null())
                    .col(ColumnDef::new(Sends::Skipped).big_integer().not_null())
                    .col(ColumnDef::new(Sends::Unknown).big_integer().not_null())
                    .col(ColumnDef::new(Sends::LastError).text().not_null())
                    .col(ColumnDef::new(Sends::CreatedAt).big_integer().not_null())
                    .col(ColumnDef::new(Sends::StartedAt).big_integer().null())
                    .col(ColumnDef::new(Sends::FinishedAt).big_integer().null())
                    .col(ColumnDef::new(Sends::UpdatedAt).big_integer().not_null())
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_sends_story")
                            .from(Sends::Table, Sends::StoryId)
                            .to(Alias::new("stories"), Alias::new("id"))
                            .on_delete(ForeignKeyAction::Restrict),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_sends_page")
                            .from(Sends::Table, Sends::PageId)
                            .to(Alias::new("pages"), Alias::new("id"))
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_sends_request_id")
                    .table(Sends::Table)
                    .col(Sends::RequestId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sends_page_created")
                    .table(Sends::Table)
                    .col(Sends::PageId)
                    .col(Sends::CreatedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_sends_state")
                    .table(Sends::Table)
                    .col(Sends::State)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Deliveries::Table)
                    .col(
                        ColumnDef::new(Deliveries::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Deliveries::SendId).string().not_null())
                    .col(ColumnDef::new(Deliveries::PageId).string().not_null())
                    .col(ColumnDef::new(Deliveries::Psid).string().not_null())
                    // token | window
                    .col(ColumnDef::new(Deliveries::Route).string().not_null())
                    .col(ColumnDef::new(Deliveries::OptinId).big_integer().null())
                    // pending | in_flight | sent | failed | skipped | unknown
                    .col(ColumnDef::new(Deliveries::State).string().not_null())
                    .col(ColumnDef::new(Deliveries::Attempts).integer().not_null())
                    // An earlier attempt may have landed (timeout, reset, 5xx, crash in flight):
                    // on a token, Facebook's "already used" then proves it did.
                    .col(ColumnDef::new(Deliveries::Ambiguous).boolean().not_null())
                    .col(
                        ColumnDef::new(Deliveries::ConfirmedByToken)
                            .boolean()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Deliveries::NextAttemptAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(Deliveries::MessageId).string().null())
                    .col(ColumnDef::new(Deliveries::ErrorCode).integer().null())
                    .col(ColumnDef::new(Deliveries::ErrorSubcode).integer().null())
                    .col(ColumnDef::new(Deliveries::ErrorMessage).text().null())
                    .col(
                        ColumnDef::new(Deliveries::UpdatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_deliveries_send")
                            .from(Deliveries::Table, Deliveries::SendId)
                            .to(Sends::Table, Sends::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Nobody twice: one delivery per recipient and send.
        manager
            .create_index(
                Index::create()
                    .name("uq_deliveries_send_psid")
                    .table(Deliveries::Table)
                    .col(Deliveries::SendId)
                    .col(Deliveries::Psid)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // A token is bound to at most one delivery, ever (NULLs, the window route, are distinct).
        manager
            .create_index(
                Index::create()
                    .name("uq_deliveries_optin")
                    .table(Deliveries::Table)
                    .col(Deliveries::OptinId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // Listing a send's deliveries in order.
        manager
            .create_index(
                Index::create()
                    .name("idx_deliveries_send_id")
                    .table(Deliveries::Table)
                    .col(Deliveries::SendId)
                    .col(Deliveries::Id)
                    .to_owned(),
            )
            .await?;
        // Claiming pending deliveries in order. Partial: a delivery is pending only before its
        // first attempt and between retries, so the in_flight -> sent writes that make up most
        // of a send never touch this index (same syntax on SQLite and PostgreSQL).
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX idx_deliveries_pending ON deliveries (send_id, id) \
                 WHERE state = 'pending'",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Deliveries::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Sends::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Sends {
    Table,
    Id,
    StoryId,
    PageId,
    RequestId,
    State,
    Topic,
    Message,
    IncludeWindowUsers,
    SegmentRule,
    AudiencePhase,
    AudienceCursor,
    Total,
    InFlight,
    Sent,
    Failed,
    Skipped,
    Unknown,
    LastError,
    CreatedAt,
    StartedAt,
    FinishedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    Id,
    SendId,
    PageId,
    Psid,
    Route,
    OptinId,
    State,
    Attempts,
    Ambiguous,
    ConfirmedByToken,
    NextAttemptAt,
    MessageId,
    ErrorCode,
    ErrorSubcode,
    ErrorMessage,
    UpdatedAt,
}
