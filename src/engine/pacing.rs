//! Pacing: how fast each page, and the whole app, may call the Send API.
//!
//! Facebook counts a page's calls per second. GCRA (governor) paces them: a page at rate `r`
//! gets one cell every `1 / (0.99 r)` seconds with a burst of at most 1% of `r` (the largest
//! batch it may send at once), so that no wall-clock second ever sees more than `r` calls, batch
//! items counted one by one. Pages have rates of their own, so each has its own direct limiter
//! (a keyed limiter has one quota for all keys); a throttled answer halves a page's pace, and
//! it climbs back while the page stays clean.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Jitter, Quota, RateLimiter, clock::Clock};

/// Share of the page's rate that is used: the rest absorbs the burst and timer jitter.
const RATE_SHARE: f64 = 0.99;
/// Largest share of a second's calls sent at once (one batch, or a burst after idling).
const BURST_SHARE: f64 = 0.01;
/// After a throttled answer, the page's pace is multiplied by this...
const THROTTLE_SLOWDOWN: f64 = 0.5;
/// ...and recovers by this factor for every clean interval.
const RECOVERY_STEP: f64 = 1.25;
const RECOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// Spreads calls of pages that wake together on the app-wide limit.
const JITTER: Duration = Duration::from_millis(2);

/// Per-page pacing settings that do not depend on the page.
#[derive(Clone, Debug)]
pub struct PacingSettings {
    /// When false, pages are not paced (benchmarks against an unthrottled sandbox).
    pub enforce_page_rate: bool,
    /// Largest Graph batch request (1 turns batching off).
    pub max_batch: usize,
    /// App-wide calls per second across all pages; `None`: unlimited.
    pub app_rate: Option<u32>,
    /// Deliveries in flight per page for an unpaced page (paced pages derive theirs).
    pub unpaced_in_flight: usize,
}

struct PageLimiter {
    configured_rate: u32,
    factor: f64,
    last_change: Instant,
    limiter: Arc<DefaultDirectRateLimiter>,
    /// One waiter at a time polls the limiter, the others queue here in order: many jobs
    /// sleeping on one limiter would all wake for every cell (a thundering herd that costs
    /// more CPU than the sends).
    turn: Arc<tokio::sync::Mutex<()>>,
}

/// Calls per second the limiter lets through for a page at `rate`: 99% of it, and at least one
/// call a second below it, so that a call delayed on its way (a new connection, a busy core)
/// cannot squeeze one call too many into a second at low rates either.
fn effective_rate(rate: u32, factor: f64) -> f64 {
    let r = f64::from(rate) * factor;
    (r * RATE_SHARE).min(r - 1.0).max(0.5)
}

fn page_limiter(rate: u32, factor: f64) -> (DefaultDirectRateLimiter, u32) {
    let effective = effective_rate(rate, factor);
    let burst = burst_for(rate, factor);
    let quota = Quota::with_period(Duration::from_secs_f64(1.0 / effective))
        .expect("a positive rate has a positive period")
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
    (RateLimiter::direct(quota), burst)
}

fn burst_for(rate: u32, factor: f64) -> u32 {
    ((f64::from(rate) * factor * BURST_SHARE).floor() as u32).max(1)
}

#[derive(Clone)]
pub struct Pacer {
    settings: PacingSettings,
    pages: Arc<Mutex<HashMap<String, PageLimiter>>>,
    app: Option<Arc<DefaultDirectRateLimiter>>,
    /// Until when the whole app holds off (an app-level throttle answer).
    app_hold: Arc<Mutex<Option<Instant>>>,
}

impl Pacer {
    pub fn new(settings: PacingSettings) -> Self {
        let app = settings.app_rate.map(|rate| {
            let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
            Arc::new(RateLimiter::direct(Quota::per_second(rate).allow_burst(
                NonZeroU32::new((rate.get() / 100).max(1)).unwrap_or(NonZeroU32::MIN),
            )))
        });
        Pacer {
            settings,
            pages: Arc::default(),
            app,
            app_hold: Arc::default(),
        }
    }

    /// Items per Graph request for a page at `rate`: one cell less than the burst where the
    /// burst allows it, so that a job that wakes a little late can still take its cells on the
    /// schedule (with a batch as large as the burst, every late wake-up is a slot lost).
    pub fn batch_size(&self, rate: u32) -> usize {
        if !self.settings.enforce_page_rate {
            return self.settings.max_batch.max(1);
        }
        let burst = burst_for(rate, 1.0) as usize;
        burst
            .saturating_sub(1)
            .clamp(1, self.settings.max_batch.max(1))
    }

    /// Whether pages are paced at their rate (otherwise only the app-wide limit applies).
    pub fn is_paced(&self) -> bool {
        self.settings.enforce_page_rate
    }

    /// Deliveries a page keeps in flight: about what its rate sends in half a second (Graph's
    /// usual latency and the limiter's queue), so that a crash leaves a bounded set unsettled.
    pub fn in_flight_cap(&self, rate: u32) -> usize {
        if !self.settings.enforce_page_rate {
            return self.settings.unpaced_in_flight.max(1);
        }
        let batch = self.batch_size(rate);
        ((rate as usize).div_ceil(2)).max(batch * 2)
    }

    fn limiter(
        &self,
        page_id: &str,
        rate: u32,
    ) -> (Arc<DefaultDirectRateLimiter>, Arc<tokio::sync::Mutex<()>>) {
        let mut pages = self.pages.lock().expect("the pacer lock is never poisoned");
        let entry = pages.entry(page_id.to_string()).or_insert_with(|| {
            let (limiter, _) = page_limiter(rate, 1.0);
            PageLimiter {
                configured_rate: rate,
                factor: 1.0,
                last_change: Instant::now(),
                limiter: Arc::new(limiter),
                turn: Arc::default(),
            }
        });
        let mut rebuild = false;
        if entry.configured_rate != rate {
            entry.configured_rate = rate;
            rebuild = true;
        }
        if entry.factor < 1.0 && entry.last_change.elapsed() >= RECOVERY_INTERVAL {
            entry.factor = (entry.factor * RECOVERY_STEP).min(1.0);
            entry.last_change = Instant::now();
            rebuild = true;
        }
        if rebuild {
            entry.limiter = Arc::new(page_limiter(rate, entry.factor).0);
        }
        (entry.limiter.clone(), entry.turn.clone())
    }

    /// Waits until `n` calls of the page (at `rate`) may go out.
    pub async fn acquire(&self, page_id: &str, rate: u32, n: usize) {
        let hold = *self
            .app_hold
            .lock()
            .expect("the pacer lock is never poisoned");
        if let Some(until) = hold {
            let now = Instant::now();
            if until > now {
                tokio::time::sleep(until - now).await;
            }
        }
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        if self.settings.enforce_page_rate {
            // No jitter here: a late wake-up is a slot lost for good (GCRA does not lend it
            // back), and the page's waiters take their turns in order anyway.
            let (limiter, turn) = self.limiter(page_id, rate);
            let _turn = turn.lock().await;
            take(&limiter, n, Jitter::up_to(Duration::ZERO)).await;
        }
        if let Some(app) = &self.app {
            // Pages waiting on the app-wide limit wake together: spread them.
            take(app, n, Jitter::up_to(JITTER)).await;
        }
    }

    /// A throttled answer: the page slows down (and, for an app-level limit, every page holds
    /// off for `app_wait`).
    pub fn throttled(&self, page_id: &str, app_wait: Option<Duration>) {
        if let Some(wait) = app_wait {
            let mut hold = self
                .app_hold
                .lock()
                .expect("the pacer lock is never poisoned");
            let until = Instant::now() + wait;
            if hold.is_none_or(|current| current < until) {
                *hold = Some(until);
            }
        }
        let mut pages = self.pages.lock().expect("the pacer lock is never poisoned");
        if let Some(entry) = pages.get_mut(page_id) {
            // One slowdown per interval: a burst of throttled answers is one event.
            if entry.factor >= 1.0 || entry.last_change.elapsed() >= RECOVERY_INTERVAL / 5 {
                entry.factor = (entry.factor * THROTTLE_SLOWDOWN).max(0.05);
                entry.last_change = Instant::now();
                entry.limiter = Arc::new(page_limiter(entry.configured_rate, entry.factor).0);
            }
        }
    }
}

/// Takes `n` cells, in pieces no larger than the limiter's burst. Waits on the calling thread's
/// own timer (tokio's, 1 ms granularity, which the spare cell of `batch_size` absorbs):
/// governor's `until_ready` sleeps on futures-timer's global thread, which then wakes the
/// sender's thread for every paced call, two thread switches a call that an instance held to a
/// fraction of a core pays for (8% of its samples went to that thread in a profile).
async fn take(limiter: &DefaultDirectRateLimiter, n: u32, jitter: Jitter) {
    let pause = |not_until: governor::NotUntil<_>| {
        tokio::time::sleep(jitter + not_until.wait_time_from(limiter.clock().now()))
    };
    let mut left = n;
    while left > 0 {
        let piece = NonZeroU32::new(left).unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(piece) {
            Ok(Ok(())) => left = 0,
            Ok(Err(not_until)) => pause(not_until).await,
            // More than the burst can never pass at once: one cell at a time.
            Err(_) => {
                while let Err(not_until) = limiter.check() {
                    pause(not_until).await;
                }
                left -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(enforce: bool) -> Pacer {
        Pacer::new(PacingSettings {
            enforce_page_rate: enforce,
            max_batch: 50,
            app_rate: None,
            unpaced_in_flight: 2000,
        })
    }

    #[test]
    fn batches_never_exceed_a_hundredth_of_the_rate() {
        let paced = pacer(true);
        assert_eq!(paced.batch_size(300), 2);
        assert_eq!(paced.batch_size(200), 1);
        assert_eq!(paced.batch_size(40), 1);
        assert_eq!(paced.batch_size(1), 1);
        assert_eq!(pacer(false).batch_size(300), 50);
    }

    #[test]
    fn in_flight_is_capped_near_half_a_second_of_sending() {
        let paced = pacer(true);
        assert_eq!(paced.in_flight_cap(300), 150);
        assert_eq!(paced.in_flight_cap(1), 2);
        assert_eq!(paced.in_flight_cap(40), 20);
        assert_eq!(pacer(false).in_flight_cap(300), 2000);
    }

    #[test]
    fn the_pace_keeps_a_call_of_margin_at_low_rates() {
        assert!((effective_rate(300, 1.0) - 297.0).abs() < 1e-9);
        assert!((effective_rate(40, 1.0) - 39.0).abs() < 1e-9);
        assert!((effective_rate(1, 1.0) - 0.5).abs() < 1e-9);
    }

    #[tokio::test]
    async fn a_page_is_paced_below_its_rate_in_every_second() {
        // 20 calls at 10/s: the 20th may start no earlier than ~1.9 s after the first burst.
        let pacer = pacer(true);
        let started = Instant::now();
        for _ in 0..20 {
            pacer.acquire("p", 10, 1).await;
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(1800), "{elapsed:?}");
    }
}
