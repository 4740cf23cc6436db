//! The progress hub: one `watch` channel per send that someone watches or a page actor runs.
//! A watch channel keeps only the newest snapshot, so a slow or vanished watcher never holds the
//! send back, and any number of watchers share one channel.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use crate::{domain::SendState, store::sends::Send};

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

    /// The stored counters; rate and ETA are the page actor's to add.
    pub fn from_send(send: &Send) -> Self {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Progress {
            send_id: send.id.clone(),
            state: send.state,
            total: n(send.total),
            pending: n(send.pending()),
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

#[derive(Clone, Default)]
pub struct ProgressHub {
    channels: Arc<Mutex<HashMap<String, watch::Sender<Progress>>>>,
}

impl ProgressHub {
    /// Publishes a snapshot. A finished send's channel is dropped after its last snapshot, which
    /// ends every watcher's stream once they have read it.
    pub fn publish(&self, progress: Progress) {
        let mut channels = self
            .channels
            .lock()
            .expect("the progress hub lock is never poisoned");
        let finished = progress.is_finished();
        match channels.get(&progress.send_id) {
            Some(channel) => {
                channel.send_if_modified(|current| {
                    let changed = *current != progress;
                    if changed {
                        *current = progress.clone();
                    }
                    changed
                });
            }
            None if !finished => {
                let (channel, _) = watch::channel(progress.clone());
                channels.insert(progress.send_id.clone(), channel);
            }
            None => {}
        }
        if finished {
            channels.remove(&progress.send_id);
        }
    }

    /// A receiver for the send's snapshots, starting from `current` (read from the database)
    /// unless the hub already holds a newer one.
    pub fn subscribe(&self, current: Progress) -> watch::Receiver<Progress> {
        let mut channels = self
            .channels
            .lock()
            .expect("the progress hub lock is never poisoned");
        if current.is_finished() {
            // Nobody will publish again: a channel of its own, closed at once.
            let (_, receiver) = watch::channel(current);
            return receiver;
        }
        channels
            .entry(current.send_id.clone())
            .or_insert_with(|| watch::channel(current).0)
            .subscribe()
    }
}
