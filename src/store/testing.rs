//! Fixtures for the store's unit tests: a migrated [`Store`] on a database of the test's own (a
//! SQLite file in a temporary directory always; a fresh PostgreSQL database when
//! `OTN_TEST_DATABASE_URL` or `DATABASE_URL` names a server), a way to run one test body on
//! both ([`store_tests!`]), and seeds made through the store's own functions, so that a test
//! starts from rows the service itself could have written.

use sea_orm::{
    DatabaseBackend, DatabaseConnection, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    entity::prelude::ColumnTrait,
};

use super::{
    Store, StoreError, in_transaction, leases, now_ms, optins, pages,
    scratch::ScratchDatabase,
    sends::{self, Answer, Claimed, NewSend, Outcome, Send, Started, Step, delivery},
    stories,
};
use crate::{
    config::DatabaseUrl,
    crypto::{MasterKey, SecretCipher},
    domain::{
        EventKind, IncomingEvent, NewPage, OptInToken, PageId, Psid, SendEvent, SendState,
        StoryContent, Topic,
    },
};

/// Runs each test body once per backend, as `<name>::sqlite` and `<name>::postgres`; the
/// PostgreSQL one says it skipped (and passes) when no server is configured, so that a plain
/// `cargo test` works anywhere.
macro_rules! store_tests {
    ($($(#[$meta:meta])* async fn $name:ident($t:ident) $body:block)*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                let $t = $crate::store::testing::TestStore::sqlite().await;
                $body
            }

            #[tokio::test]
            async fn postgres() {
                let Some($t) = $crate::store::testing::TestStore::postgres().await else {
                    eprintln!("skipped: no PostgreSQL in OTN_TEST_DATABASE_URL or DATABASE_URL");
                    return;
                };
                $body
            }
        }
    )*};
}

/// As [`store_tests!`], for what only PostgreSQL has (row locks held across sessions, lease
/// fences that can fail, notifications between instances).
macro_rules! postgres_tests {
    ($($(#[$meta:meta])* async fn $name:ident($t:ident) $body:block)*) => {$(
        $(#[$meta])*
        #[tokio::test]
        async fn $name() {
            let Some($t) = $crate::store::testing::TestStore::postgres().await else {
                eprintln!("skipped: no PostgreSQL in OTN_TEST_DATABASE_URL or DATABASE_URL");
                return;
            };
            $body
        }
    )*};
}

pub(crate) use {postgres_tests, store_tests};

/// The owner every fixture lease is taken for.
pub const OWNER: &str = "unit-test";

/// The cipher every fixture seals with (a fixed key: tests compare digests).
pub fn cipher() -> SecretCipher {
    SecretCipher::new(&MasterKey::from_bytes(&[42; 32]).expect("32 bytes"))
}

/// A store on a database of its own, removed when dropped.
pub struct TestStore {
    pub store: Store,
    url: DatabaseUrl,
    /// After the store: its database outlives its connections.
    _database: ScratchDatabase,
}

impl TestStore {
    pub async fn sqlite() -> Self {
        Self::on(ScratchDatabase::sqlite()).await
    }

    /// A new database on the configured server, or `None` when none is configured.
    pub async fn postgres() -> Option<Self> {
        Some(Self::on(ScratchDatabase::postgres("otnd_unit").await?).await)
    }

    async fn on(database: ScratchDatabase) -> Self {
        TestStore {
            store: database.store().await,
            url: database.database_url(),
            _database: database,
        }
    }

    /// Another store on the same database, as the serving instance `instance` opens it (on
    /// PostgreSQL its sessions carry the instance's name).
    pub async fn instance(&self, instance: &str) -> Store {
        Store::connect_serving(&self.url, instance)
            .await
            .expect("the instance connects")
    }

    pub fn backend(&self) -> DatabaseBackend {
        self.store.db.get_database_backend()
    }

    pub fn is_postgres(&self) -> bool {
        self.backend() == DatabaseBackend::Postgres
    }

    /// The writer's connection: where tests write, and read what they wrote.
    pub fn db(&self) -> &DatabaseConnection {
        &self.store.db
    }

    /// Runs `work` in a write transaction of its own, committed if it succeeds.
    pub async fn txn<T>(
        &self,
        work: impl AsyncFnOnce(&DatabaseTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        in_transaction(&self.store.db, work).await
    }

    /// A registered page (`id`: digits), with every secret set.
    pub async fn page(&self, id: &str) -> PageId {
        let page = NewPage::parse(id, "A page", "access-token", "app-secret", "verify", None)
            .expect("a valid page");
        pages::create(self.db(), &cipher(), &page)
            .await
            .expect("the page is created");
        page.id
    }

    /// An opt-in of the page's user on `topic` with `token`, as the webhook would store it had
    /// it arrived at `at` (it stays usable for a year from then). Also makes the user a
    /// subscriber whose last interaction is `at`.
    pub async fn opt_in(
        &self,
        page: &PageId,
        psid: &str,
        topic: &str,
        token: &str,
        at: i64,
    ) -> optins::Model {
        let event = IncomingEvent {
            psid: Psid::parse(psid).expect("a psid"),
            at_ms: at,
            kind: EventKind::OptIn {
                topic: Topic::parse(topic).expect("a topic"),
                token: OptInToken::parse(token).expect("a token"),
                recurring: None,
            },
        };
        optins::ingest(self.db(), &cipher(), &[(page.clone(), vec![event])])
            .await
            .expect("the opt-in is ingested");
        self.opt_in_by_token(page, token).await
    }

    /// A recurring opt-in (a `notification_messages_token` without an expiry) of the page's
    /// user on `topic`, as the webhook would store it now, with `change` (a STOP or RESUME) if
    /// given, at `at`.
    pub async fn recurring_opt_in(
        &self,
        page: &PageId,
        psid: &str,
        topic: &str,
        token: &str,
        change: Option<(crate::domain::SubscriptionChange, i64)>,
    ) -> optins::Model {
        let event = IncomingEvent {
            psid: Psid::parse(psid).expect("a psid"),
            at_ms: change.map_or_else(now_ms, |(_, at)| at),
            kind: EventKind::OptIn {
                topic: Topic::parse(topic).expect("a topic"),
                token: OptInToken::parse(token).expect("a token"),
                recurring: Some(crate::domain::RecurringTerms {
                    title: Some("Deals".into()),
                    timezone: Some("Europe/London".into()),
                    change: change.map(|(c, _)| c),
                    ..Default::default()
                }),
            },
        };
        optins::ingest(self.db(), &cipher(), &[(page.clone(), vec![event])])
            .await
            .expect("the opt-in is ingested");
        self.opt_in_by_token(page, token).await
    }

    /// A user of the page who wrote (a message, a postback) at `at`.
    pub async fn interaction(&self, page: &PageId, psid: &str, at: i64) {
        let event = IncomingEvent {
            psid: Psid::parse(psid).expect("a psid"),
            at_ms: at,
            kind: EventKind::Interaction,
        };
        optins::ingest(self.db(), &cipher(), &[(page.clone(), vec![event])])
            .await
            .expect("the interaction is ingested");
    }

    pub async fn opt_in_by_token(&self, page: &PageId, token: &str) -> optins::Model {
        let token = OptInToken::parse(token).expect("a token");
        optins::find_by_token(self.db(), page, &token)
            .await
            .expect("the opt-in is stored")
    }

    /// A draft story of the page on `topic`, not reviewed.
    pub async fn draft(
        &self,
        page: &PageId,
        topic: &str,
        include_window_users: bool,
    ) -> stories::Model {
        let content = StoryContent::Text(format!("News on {topic}"));
        let story = stories::NewStory {
            page_id: page,
            topic,
            content: &content,
            include_window_users,
            segment_id: None,
            token_kinds: &[],
        };
        stories::create(self.db(), story, now_ms())
            .await
            .expect("the story is created")
    }

    /// A draft story of the page on `topic`, reviewed (so it can be sent).
    pub async fn story(
        &self,
        page: &PageId,
        topic: &str,
        include_window_users: bool,
    ) -> stories::Model {
        let draft = self.draft(page, topic, include_window_users).await;
        stories::record_review(
            self.db(),
            &draft.id,
            &draft.content_hash,
            "reviewer",
            now_ms(),
        )
        .await
        .expect("the review is recorded")
    }

    /// Starts a send of `story` for `request_id` (at most 100 active sends).
    pub async fn start(
        &self,
        story: &stories::Model,
        request_id: &str,
    ) -> Result<Started, StoreError> {
        self.txn(async |txn| {
            let new = NewSend {
                story,
                request_id,
                segment: None,
                max_active: 100,
                expected: 0,
                recurring_cooldown_ms: 48 * 3_600_000,
            };
            sends::start(txn, new, now_ms()).await
        })
        .await
    }

    /// A queued send of a new reviewed story of the page on `topic` (token users only).
    pub async fn send(&self, page: &PageId, topic: &str) -> Send {
        let story = self.story(page, topic, false).await;
        match self.start(&story, &uuid::Uuid::new_v4().to_string()).await {
            Ok(Started::Created(send)) => send,
            _ => panic!("the send is created"),
        }
    }

    /// A send of the page in `state`, moved there by the store's own transitions. A completed
    /// one had nobody to reach (the page's `topic` must have no usable opt-in).
    pub async fn send_in(&self, page: &PageId, topic: &str, state: SendState) -> Send {
        let send = self.send(page, topic).await;
        let apply = async |event| {
            sends::apply(self.db(), &send.id, event, None, now_ms())
                .await
                .expect("the send moves")
        };
        let moved = match state {
            SendState::Queued => send.clone(),
            SendState::Running => apply(SendEvent::Run).await,
            SendState::Paused => apply(SendEvent::Pause).await,
            SendState::Halted => apply(SendEvent::Halt).await,
            SendState::Cancelled => sends::cancel(self.db(), &send.id, now_ms())
                .await
                .expect("the send is cancelled"),
            SendState::Completed => {
                let fence = self.fence(page).await;
                let step = self.step(&fence, &send.id, 10).await;
                assert!(step.claimed.is_empty(), "a send to complete reaches nobody");
                sends::complete_if_done(self.db(), &send.id, now_ms())
                    .await
                    .expect("the send completes")
                    .expect("the send was done")
            }
        };
        assert_eq!(moved.state, state);
        moved
    }

    /// The page's lease, for [`OWNER`].
    pub async fn fence(&self, page: &PageId) -> leases::Fence {
        leases::acquire(self.db(), page.as_str(), OWNER, 60_000)
            .await
            .expect("the lease is written")
            .expect("the page is free")
    }

    /// One step of the send (running it if queued), committed.
    pub async fn step(&self, fence: &leases::Fence, send_id: &str, limit: u64) -> Step {
        self.txn(async |txn| sends::step(txn, fence, send_id, now_ms(), limit, true).await)
            .await
            .expect("the step commits")
    }

    /// A running send of the page on `topic`, to one opt-in of each of `users`, each claimed
    /// (in flight) by its first step; with the fence it was claimed under.
    pub async fn claimed_send(
        &self,
        page: &PageId,
        topic: &str,
        users: &[&str],
    ) -> (Send, Vec<Claimed>, leases::Fence) {
        let now = now_ms();
        for user in users {
            self.opt_in(page, user, topic, &format!("{topic}-{user}"), now)
                .await;
        }
        let send = self.send(page, topic).await;
        let fence = self.fence(page).await;
        let step = self.step(&fence, &send.id, users.len() as u64 + 1).await;
        assert_eq!(step.claimed.len(), users.len(), "every user is claimed");
        (step.send, step.claimed, fence)
    }

    /// A send on `topic` that reached every one of `users` (Facebook took each message): its row.
    pub async fn delivered_send(&self, page: &PageId, topic: &str, users: &[&str]) -> Send {
        let (send, claimed, fence) = self.claimed_send(page, topic, users).await;
        let answers: Vec<_> = claimed
            .iter()
            .map(|c| answer(&send.id, c, sent()))
            .collect();
        self.record(&fence, &answers).await;
        self.send_row(&send.id).await
    }

    /// Records `answers` under `fence`, committed; the sends' rows after.
    pub async fn record(&self, fence: &leases::Fence, answers: &[Answer]) -> Vec<Send> {
        self.txn(async |txn| sends::record(txn, fence, answers, None, now_ms()).await)
            .await
            .expect("the answers are recorded")
    }

    pub async fn send_row(&self, id: &str) -> Send {
        sends::get(self.db(), id).await.expect("the send exists")
    }

    /// The send's deliveries, by id.
    pub async fn deliveries(&self, send_id: &str) -> Vec<delivery::Model> {
        delivery::Entity::find()
            .filter(delivery::Column::SendId.eq(send_id))
            .order_by_asc(delivery::Column::Id)
            .all(self.db())
            .await
            .expect("the deliveries are read")
    }

    /// The psids of the send's deliveries, by delivery id.
    pub async fn recipients(&self, send_id: &str) -> Vec<String> {
        let deliveries = self.deliveries(send_id).await;
        deliveries.into_iter().map(|d| d.psid).collect()
    }

    pub async fn delivery(&self, id: i64) -> delivery::Model {
        delivery::Entity::find_by_id(id)
            .one(self.db())
            .await
            .expect("the delivery is read")
            .expect("the delivery exists")
    }

    pub async fn opt_in_row(&self, id: i64) -> optins::Model {
        optins::Entity::find_by_id(id)
            .one(self.db())
            .await
            .expect("the opt-in is read")
            .expect("the opt-in exists")
    }
}

/// A send's row without its `updated_at`: a statement that moves nothing else (answers recorded
/// again, a recovery that found nothing) still stamps the row it touched.
pub fn unstamped(send: Send) -> Send {
    Send {
        updated_at: 0,
        ..send
    }
}

/// The answer `outcome` to a claimed delivery of `send_id`.
pub fn answer(send_id: &str, claimed: &Claimed, outcome: Outcome) -> Answer {
    Answer {
        send_id: send_id.to_string(),
        id: claimed.id,
        claim: claimed.claim,
        outcome,
    }
}

/// Facebook took the message.
pub fn sent() -> Outcome {
    Outcome::Sent {
        message_id: Some("m_1".into()),
        confirmed_by_token: false,
    }
}

/// Not sent; to be tried again at `at`.
pub fn retry(at: i64, ambiguous: bool) -> Outcome {
    Outcome::Retry {
        at,
        ambiguous,
        refund_attempt: false,
        error: sends::DeliveryError {
            code: Some(2),
            subcode: None,
            message: "temporary".into(),
        },
    }
}
