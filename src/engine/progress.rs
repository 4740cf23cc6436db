//! The progress hub: one `watch` channel per send that someone watches or a page actor runs.
//! A watch channel keeps only the newest snapshot, so a slow or vanished watcher never holds the
//! send back, and any number of watchers share one channel.
//!
//! Watchers are bounded: at most so many open streams on this instance (WatchSend and health
//! Watch alike, see [`StreamSlots`]) and so many per send. A send watched here whose page runs
//! elsewhere (another instance, or nobody yet) is read from the database by one poller per send,
//! however many watch it, and only while no page actor of this instance publishes it.
//!
//! The hub also keeps the row a page actor of this instance last committed for each send it
//! drives (and for a while, each that finished), so that GetSend is answered from memory (see
//! [`ProgressHub::row`]) instead of waiting for a database reader while the engine writes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::{
    domain::SendState,
    store::{Store, sends, sends::Send},
};

/// A watched send with no snapshot from this instance's page actor for this long is read from
/// the database.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// A running send's row published here is answered from memory for this long after it was
/// published. Every change to a running send goes through its page actor or is told to the hub,
/// so this bounds only what nobody foresaw. It must outlast the gap between a page's commits on
/// a busy instance: with a thousand pages stepping, each waits most of a second for the writer
/// (S5), and a bound of half a second sent most reads to the database.
const ROW_FRESH_FOR: Duration = Duration::from_secs(10);

/// After a command or an erasure, the sends concerned are read from the database for this long:
/// their page actor may still publish a row it committed before, and has read them again by
/// then.
const SETTLE_FOR: Duration = POLL_EVERY;

/// At most so many finished sends' rows are kept (a bound on memory: a few hundred bytes each).
const FINISHED_KEPT: usize = 10_000;

/// What a watcher sees of a send.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub send_id: String,
    pub state: SendState,
    pub total: u64,
    pub pending: u64,
    pub in_flight: u64,
    pub sent: u64,
    pub failed: u64,
    pub skipped: u64,
    pub unknown: u64,
    pub rate_per_second: f64,
    pub eta_seconds: f64,
    pub last_error: String,
}

impl Progress {
    /// The same state and counters (rate and ETA aside).
    pub fn same_counts(&self, other: &Progress) -> bool {
        (
            &self.state,
            self.total,
            self.pending,
            self.in_flight,
            self.sent,
            self.failed,
            self.skipped,
            self.unknown,
        ) == (
            &other.state,
            other.total,
            other.pending,
            other.in_flight,
            other.sent,
            other.failed,
            other.skipped,
            other.unknown,
        )
    }

    /// The stored counters; rate and ETA are the page actor's to add. Until the audience is
    /// all materialised, the total is the audience counted at the start when that is larger,
    /// and what is not yet materialised counts as pending: the deliveries made so far are only
    /// the first batches, and a bar or an ETA over them would read nearly done from the start.
    pub fn from_send(send: &Send) -> Self {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        // A finished send (a cancel may come before the audience is all in) is what it did.
        let not_materialised = if send.audience_done() || send.state.is_finished() {
            0
        } else {
            (send.expected_total - send.total).max(0)
        };
        Progress {
            send_id: send.id.clone(),
            state: send.state,
            total: n(send.total + not_materialised),
            pending: n(send.pending() + not_materialised),
            in_flight: n(send.in_flight),
            sent: n(send.sent),
            failed: n(send.failed),
            skipped: n(send.skipped),
            unknown: n(send.unknown),
            rate_per_second: 0.0,
            eta_seconds: 0.0,
            last_error: send.last_error.clone(),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }
}

/// The instance's open long-lived streams, bounded: WatchSend's and health Watch's share it.
#[derive(Clone)]
pub struct StreamSlots {
    slots: Arc<Semaphore>,
    max: usize,
}

impl StreamSlots {
    pub fn new(max: usize) -> Self {
        StreamSlots {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot for one stream, held as long as the stream is open.
    pub fn take(&self) -> Result<OwnedSemaphorePermit, WatchRefused> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| WatchRefused::Instance { limit: self.max })
    }
}

/// Why a watch was refused.
#[derive(Debug, thiserror::Error)]
pub enum WatchRefused {
    #[error(
        "this instance serves its limit of {limit} open streams (OTN_MAX_WATCHERS); retry later"
    )]
    Instance { limit: usize },
    #[error(
        "the send has its limit of {limit} watchers on this instance (OTN_MAX_WATCHERS_PER_SEND); \
         share one stream, or retry later"
    )]
    Send { limit: usize },
}

struct Channel {
    sender: watch::Sender<Progress>,
    watchers: usize,
    /// When this instance's page actor last published the send.
    published_here: Option<Instant>,
    /// A poller reads the send from the database for its watchers.
    polled: bool,
    /// The row this instance's page actor committed last, while it drives the send; cleared by
    /// any snapshot from elsewhere (a poller's read, a command applied without the actor).
    row: Option<Arc<Send>>,
}

struct Inner {
    channels: Mutex<HashMap<String, Channel>>,
    /// Sends steered (paused, resumed, cancelled) lately: a page actor may still publish a row
    /// its step committed before the command, so their rows are not answered from memory until
    /// the actor has read the send again.
    steered: Lately,
    /// Pages whose sends something other than their actor changed lately (an erasure): likewise.
    changed_elsewhere: Lately,
    /// Sends that finished lately, as the page actor here committed their last row: a finished
    /// send changes only with an erasure (told to the hub), and a dashboard reads it again
    /// right after its end. Kept for [`ROW_FRESH_FOR`], at most [`FINISHED_KEPT`].
    finished: Mutex<HashMap<String, (Arc<Send>, Instant)>>,
    slots: StreamSlots,
    per_send: usize,
    /// Where pollers read sends run elsewhere; `None` for a hub that never polls (tests).
    store: Option<Store>,
}

/// Keys marked within the last [`SETTLE_FOR`].
#[derive(Default)]
struct Lately(Mutex<HashMap<String, Instant>>);

impl Lately {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0
            .lock()
            .expect("the progress hub lock is never poisoned")
    }

    fn mark(&self, key: &str) {
        let mut marked = self.lock();
        let now = Instant::now();
        marked.retain(|_, at| now.duration_since(*at) < SETTLE_FOR);
        marked.insert(key.to_string(), now);
    }

    fn lately(&self, key: &str) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|at| at.elapsed() < SETTLE_FOR)
    }

    #[cfg(test)]
    fn age(&self, key: &str) {
        if let Some(at) = self.lock().get_mut(key) {
            *at = Instant::now().checked_sub(SETTLE_FOR).unwrap_or(*at);
        }
    }
}

#[derive(Clone)]
pub struct ProgressHub {
    inner: Arc<Inner>,
}

/// A watcher's view of a send. Dropping it gives its place back.
pub struct Subscription {
    pub snapshots: watch::Receiver<Progress>,
    _watcher: Watcher,
}

struct Watcher {
    hub: Option<ProgressHub>,
    send_id: String,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(hub) = &self.hub {
            let mut channels = hub.lock();
            if let Some(channel) = channels.get_mut(&self.send_id) {
                channel.watchers = channel.watchers.saturating_sub(1);
            }
        }
    }
}

impl ProgressHub {
    pub fn new(store: Option<Store>, slots: StreamSlots, per_send: usize) -> Self {
        ProgressHub {
            inner: Arc::new(Inner {
                channels: Mutex::new(HashMap::new()),
                steered: Lately::default(),
                changed_elsewhere: Lately::default(),
                finished: Mutex::new(HashMap::new()),
                slots,
                per_send,
                store,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.inner
            .channels
            .lock()
            .expect("the progress hub lock is never poisoned")
    }

    /// Publishes a snapshot from this instance's page actor, with the row it was taken from
    /// (the row as the actor's last transaction left it).
    pub fn publish(&self, progress: Progress, row: &Send) {
        self.put(progress, Some(row));
    }

    /// Publishes a row of a send this instance's page actor does not drive (not running here):
    /// progress for its watchers, not a row to answer reads with.
    pub fn publish_undriven(&self, row: &Send) {
        self.put(Progress::from_send(row), None);
    }

    /// The send is no longer driven here: its row is the database's to answer.
    pub fn forget_running_row(&self, send_id: &str) {
        if let Some(channel) = self.lock().get_mut(send_id) {
            channel.row = None;
        }
    }

    /// Publishes the row a command (pause, resume, cancel) left. The row is the database's to
    /// answer until the send's actor commits again (see [`ProgressHub::row`]).
    pub fn publish_steered(&self, row: &Send) {
        self.inner.steered.mark(&row.id);
        self.put(Progress::from_send(row), None);
    }

    /// The send's row as this instance's page actor last committed it: a running send's while
    /// the actor drives it (and committed within [`ROW_FRESH_FOR`]), a finished send's for
    /// [`ROW_FRESH_FOR`] after its end. A paused or halted send is the database's to answer, as
    /// is any send lately steered or on a page lately erased from. Only meaningful where every
    /// change to a send goes through its page actor here or is told to the hub (one instance:
    /// SQLite); the caller decides.
    pub fn row(&self, send_id: &str) -> Option<Arc<Send>> {
        if self.inner.steered.lately(send_id) {
            return None;
        }
        let running = {
            let channels = self.lock();
            channels.get(send_id).and_then(|channel| {
                let fresh = channel
                    .published_here
                    .is_some_and(|at| at.elapsed() < ROW_FRESH_FOR);
                fresh.then(|| channel.row.clone()).flatten()
            })
        };
        let row = match running {
            Some(row) if row.state == SendState::Running => row,
            // Paused or halted: no longer driven, the database's to answer.
            Some(_) => return None,
            None => {
                let finished = self.finished();
                let (row, at) = finished.get(send_id)?;
                if at.elapsed() >= ROW_FRESH_FOR {
                    return None;
                }
                row.clone()
            }
        };
        (!self.inner.changed_elsewhere.lately(&row.page_id)).then_some(row)
    }

    /// Forgets the rows of the page's sends: something other than their page actor changed
    /// them (an erasure moved their counters), or the actor restarts or stops. They are read from the database until the actor
    /// publishes again.
    pub fn forget_rows_of_page(&self, page_id: &str) {
        self.inner.changed_elsewhere.mark(page_id);
        self.forget_running_rows_of_page(page_id);
        self.finished().retain(|_, (row, _)| row.page_id != page_id);
    }

    /// The page's actor restarts or stops: nobody here drives its running sends any more, and
    /// the database answers for them. Finished sends keep their rows (only an erasure moves
    /// them).
    pub fn forget_running_rows_of_page(&self, page_id: &str) {
        for channel in self.lock().values_mut() {
            if channel.row.as_ref().is_some_and(|r| r.page_id == page_id) {
                channel.row = None;
            }
        }
    }

    fn finished(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Send>, Instant)>> {
        self.inner
            .finished
            .lock()
            .expect("the progress hub lock is never poisoned")
    }

    /// Keeps a finished send's last row from its page actor here.
    fn keep_finished(&self, row: Arc<Send>, now: Instant) {
        let mut finished = self.finished();
        finished.retain(|_, (_, at)| now.duration_since(*at) < ROW_FRESH_FOR);
        if finished.len() >= FINISHED_KEPT {
            // Sends finishing faster than this for ten seconds: the database answers.
            finished.clear();
        }
        finished.insert(row.id.clone(), (row, now));
    }

    /// A finished send's channel is dropped after its last snapshot, which ends every watcher's
    /// stream once they have read it. `row` is the committed row a snapshot from this
    /// instance's page actor was taken from; `None` for a snapshot from elsewhere.
    fn put(&self, progress: Progress, row: Option<&Send>) {
        let finished = progress.is_finished();
        let from_here = row.is_some();
        // Copied before the lock is taken: the API's reads wait on it, and a page actor's thread
        // runs below their priority (a copy made inside could hold them up while it waits for
        // a core).
        let row = row.map(|r| Arc::new(r.clone()));
        let now = Instant::now();
        let replaced;
        let mut channels = self.lock();
        match channels.get_mut(&progress.send_id) {
            Some(channel) => {
                if from_here {
                    channel.published_here = Some(now);
                }
                replaced = std::mem::replace(&mut channel.row, row);
                channel.sender.send_if_modified(|current| {
                    let changed = *current != progress;
                    if changed {
                        *current = progress.clone();
                    }
                    changed
                });
            }
            None if !finished => {
                let (sender, _) = watch::channel(progress.clone());
                channels.insert(
                    progress.send_id.clone(),
                    Channel {
                        sender,
                        watchers: 0,
                        published_here: from_here.then_some(now),
                        polled: false,
                        row,
                    },
                );
                replaced = None;
            }
            None => replaced = row,
        }
        let removed = if finished {
            channels.remove(&progress.send_id)
        } else {
            None
        };
        drop(channels);
        if finished && from_here {
            let row = removed
                .as_ref()
                .and_then(|channel| channel.row.clone())
                .or_else(|| replaced.clone());
            if let Some(row) = row {
                self.keep_finished(row, now);
            }
        }
        // Freed after the lock is given back, for the same reason.
        drop((replaced, removed));
    }

    /// A watcher of the send, starting from `current` (read from the database) unless the hub
    /// holds a newer snapshot; refused beyond the instance's and the send's limits.
    pub fn subscribe(&self, current: Progress) -> Result<Subscription, WatchRefused> {
        let slot = self.inner.slots.take()?;
        let send_id = current.send_id.clone();
        if current.is_finished() {
            // Nobody will publish again: a channel of its own, closed at once.
            let (_, snapshots) = watch::channel(current);
            return Ok(Subscription {
                snapshots,
                _watcher: Watcher {
                    hub: None,
                    send_id,
                    _slot: slot,
                },
            });
        }
        let mut channels = self.lock();
        let channel = channels.entry(send_id.clone()).or_insert_with(|| Channel {
            sender: watch::channel(current).0,
            watchers: 0,
            published_here: None,
            polled: false,
            row: None,
        });
        if channel.watchers >= self.inner.per_send {
            return Err(WatchRefused::Send {
                limit: self.inner.per_send,
            });
        }
        channel.watchers += 1;
        let snapshots = channel.sender.subscribe();
        if !channel.polled
            && let Some(store) = &self.inner.store
        {
            channel.polled = true;
            tokio::spawn(poll(self.clone(), store.clone(), send_id.clone()));
        }
        drop(channels);
        Ok(Subscription {
            snapshots,
            _watcher: Watcher {
                hub: Some(self.clone()),
                send_id,
                _slot: slot,
            },
        })
    }
}

/// Reads the send from the database for its watchers here while nobody publishes it here: one
/// poller per watched send, ending with its last watcher or with the send.
async fn poll(hub: ProgressHub, store: Store, send_id: String) {
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let current = {
            let mut channels = hub.lock();
            let Some(channel) = channels.get_mut(&send_id) else {
                return;
            };
            if channel.watchers == 0 {
                channel.polled = false;
                return;
            }
            if channel
                .published_here
                .is_some_and(|at| at.elapsed() < POLL_EVERY)
            {
                continue;
            }
            channel.sender.borrow().clone()
        };
        if let Ok(row) = sends::get(&store.read, &send_id).await {
            let fresh = Progress::from_send(&row);
            if !fresh.same_counts(&current) || fresh.last_error != current.last_error {
                hub.put(fresh, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(id: &str, state: SendState, sent: u64) -> Progress {
        Progress {
            send_id: id.into(),
            state,
            total: 10,
            pending: 10 - sent,
            in_flight: 0,
            sent,
            failed: 0,
            skipped: 0,
            unknown: 0,
            rate_per_second: 0.0,
            eta_seconds: 0.0,
            last_error: String::new(),
        }
    }

    #[test]
    fn until_the_audience_is_all_in_the_total_is_the_audience_counted_at_the_start() {
        let materialising = Send {
            audience_phase: "token".into(),
            expected_total: 100,
            total: 10,
            in_flight: 2,
            sent: 3,
            ..row("a", "p", SendState::Running, 3)
        };
        let p = Progress::from_send(&materialising);
        assert_eq!((p.total, p.pending, p.in_flight, p.sent), (100, 95, 2, 3));

        // More opt-ins came in than were counted: the deliveries made are the total.
        let grown = Send {
            total: 120,
            ..materialising.clone()
        };
        assert_eq!(Progress::from_send(&grown).total, 120);

        // Materialised, or finished (cancelled before it was all in): the rows are the truth.
        let done = Send {
            audience_phase: "done".into(),
            total: 90,
            ..materialising.clone()
        };
        assert_eq!(Progress::from_send(&done).total, 90);
        let cancelled = Send {
            state: SendState::Cancelled,
            ..materialising.clone()
        };
        let p = Progress::from_send(&cancelled);
        assert_eq!((p.total, p.pending), (10, 5));

        // Sends from before the count have none.
        let older = Send {
            expected_total: 0,
            ..materialising
        };
        assert_eq!(Progress::from_send(&older).total, 10);
    }

    #[test]
    fn watchers_are_bounded_per_send_and_per_instance_and_give_their_place_back() {
        let hub = ProgressHub::new(None, StreamSlots::new(3), 2);
        let a = hub.subscribe(progress("a", SendState::Running, 0)).unwrap();
        let _b = hub.subscribe(progress("a", SendState::Running, 0)).unwrap();
        assert!(matches!(
            hub.subscribe(progress("a", SendState::Running, 0)),
            Err(WatchRefused::Send { limit: 2 })
        ));
        let _c = hub.subscribe(progress("c", SendState::Running, 0)).unwrap();
        assert!(matches!(
            hub.subscribe(progress("d", SendState::Running, 0)),
            Err(WatchRefused::Instance { limit: 3 })
        ));
        drop(a);
        hub.subscribe(progress("a", SendState::Running, 0))
            .expect("a place was given back");
    }

    fn row(id: &str, page_id: &str, state: SendState, sent: i64) -> Send {
        Send {
            id: id.into(),
            story_id: "story".into(),
            page_id: page_id.into(),
            request_id: format!("request-{id}"),
            state,
            topic: "topic".into(),
            message: "{}".into(),
            include_window_users: false,
            segment_rule: None,
            audience_phase: "done".into(),
            audience_cursor: String::new(),
            total: 10,
            expected_total: 0,
            in_flight: 0,
            sent,
            failed: 0,
            skipped: 0,
            unknown: 0,
            last_error: String::new(),
            created_at: 1,
            started_at: Some(2),
            finished_at: None,
            updated_at: 3,
            token_kinds: String::new(),
            recurring_cooldown_ms: 48 * 3_600_000,
        }
    }

    fn publish(hub: &ProgressHub, row: &Send) {
        hub.publish(Progress::from_send(row), row);
    }

    #[test]
    fn every_watcher_sees_the_newest_snapshot_and_the_end() {
        let hub = ProgressHub::new(None, StreamSlots::new(10), 10);
        let mut one = hub.subscribe(progress("s", SendState::Running, 0)).unwrap();
        let mut two = hub.subscribe(progress("s", SendState::Running, 0)).unwrap();
        publish(&hub, &row("s", "p", SendState::Running, 3));
        publish(&hub, &row("s", "p", SendState::Running, 5));
        assert_eq!(one.snapshots.borrow_and_update().sent, 5);
        assert_eq!(two.snapshots.borrow_and_update().sent, 5);
        publish(&hub, &row("s", "p", SendState::Completed, 10));
        assert_eq!(
            one.snapshots.borrow_and_update().state,
            SendState::Completed
        );
        // The channel is gone: the stream's end.
        assert!(one.snapshots.has_changed().is_err());
    }

    #[test]
    fn the_row_a_page_actor_published_is_answered_until_something_else_moves_the_send() {
        let hub = ProgressHub::new(None, StreamSlots::new(10), 10);
        assert!(hub.row("s").is_none(), "nothing published: none");
        publish(&hub, &row("s", "p", SendState::Running, 3));
        publish(&hub, &row("t", "q", SendState::Running, 4));
        assert_eq!(hub.row("s").unwrap().sent, 3);
        publish(&hub, &row("s", "p", SendState::Running, 5));
        assert_eq!(hub.row("s").unwrap().sent, 5, "the newest row");

        // An erasure on page p: its sends are read from the database again, q's are not, even
        // if the actor publishes a row it committed before the erasure.
        hub.forget_rows_of_page("p");
        assert!(hub.row("s").is_none());
        assert_eq!(hub.row("t").unwrap().sent, 4);
        publish(&hub, &row("s", "p", SendState::Running, 5));
        assert!(hub.row("s").is_none());
        hub.inner.changed_elsewhere.age("p");

        // A command: the actor may still publish a row its step committed before, so no row
        // is answered for a while.
        publish(&hub, &row("s", "p", SendState::Running, 6));
        hub.publish_steered(&row("s", "p", SendState::Paused, 6));
        publish(&hub, &row("s", "p", SendState::Running, 6));
        assert!(hub.row("s").is_none());
        hub.inner.steered.age("s");
        assert_eq!(hub.row("s").unwrap().sent, 6, "answered again later");
        hub.publish_steered(&row("s", "p", SendState::Paused, 6));
        hub.inner.steered.age("s");
        assert!(
            hub.row("s").is_none(),
            "the row a command left is the database's to answer"
        );

        // A send its actor no longer drives, or that it publishes undriven, is the database's.
        publish(&hub, &row("t", "q", SendState::Running, 5));
        hub.forget_running_row("t");
        assert!(hub.row("t").is_none());
        publish(&hub, &row("t", "q", SendState::Running, 5));
        hub.publish_undriven(&row("t", "q", SendState::Running, 5));
        assert!(hub.row("t").is_none());
    }

    #[test]
    fn a_finished_sends_last_row_is_kept_until_an_erasure_on_its_page() {
        let hub = ProgressHub::new(None, StreamSlots::new(10), 10);
        publish(&hub, &row("s", "p", SendState::Running, 5));
        publish(&hub, &row("s", "p", SendState::Completed, 10));
        publish(&hub, &row("t", "q", SendState::Cancelled, 4));
        assert_eq!(hub.row("s").unwrap().state, SendState::Completed);
        assert_eq!(hub.row("t").unwrap().sent, 4, "finished without a channel");

        // The actor stops: its running sends go to the database, its finished ones stay.
        hub.forget_running_rows_of_page("p");
        assert_eq!(hub.row("s").unwrap().sent, 10);

        // An erasure moves the counters of finished sends too.
        hub.forget_rows_of_page("p");
        assert!(hub.row("s").is_none());
        hub.inner.changed_elsewhere.age("p");
        assert!(hub.row("s").is_none(), "forgotten, not only hidden");
        assert_eq!(hub.row("t").unwrap().sent, 4, "another page's stays");

        // The row a command left (a cancel) is not kept.
        hub.publish_steered(&row("u", "q", SendState::Cancelled, 0));
        hub.inner.steered.age("u");
        assert!(hub.row("u").is_none());

        // Kept for as long as a running row is answered.
        hub.finished().get_mut("t").unwrap().1 = Instant::now().checked_sub(ROW_FRESH_FOR).unwrap();
        assert!(hub.row("t").is_none());
    }

    #[test]
    fn a_row_published_longer_ago_than_it_stays_fresh_is_not_answered() {
        let hub = ProgressHub::new(None, StreamSlots::new(10), 10);
        publish(&hub, &row("s", "p", SendState::Running, 3));
        hub.lock().get_mut("s").unwrap().published_here = Instant::now().checked_sub(ROW_FRESH_FOR);
        assert!(hub.row("s").is_none());
    }
}
