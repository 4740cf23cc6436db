//! Pacing: how fast each page, and the whole app, may call the Send API.
//!
//! Facebook counts a page's calls per second, batch items one by one, and says in every
//! answer's usage header what share of the page's budget is used. Each page has its own pace:
//! - GCRA (governor) spreads its calls at 99% of the page's configured rate, in batches of up to
//!   a sixth of a second's calls, and a rolling second of the page's own calls never holds more
//!   than the configured rate;
//! - the budget: the usage header's share against the calls the page made in the second before
//!   the call gives the page's true budget (calls ÷ share). Where that is below the configured
//!   rate (Facebook gives the page less than it was configured for), the page paces at 95% of
//!   it, its rolling second holds at most 96% of it, and its requests carry no more than the
//!   rest, so that it slows down *before* a refusal;
//! - AIMD on refusals: a throttle the page's own pace explains (no budget known, or a budget
//!   below the configured rate, or a regain time) halves the page's pace, at most once per half
//!   second (the answers of calls already in flight are one event), and the pace climbs back by
//!   half the configured rate each second; a throttle the header contradicts (the page is well
//!   within its budget: another app's or a random refusal) is retried without slowing down.
//!   A regain time holds the page until then. Code 4 (the app's own limit) does the same for the
//!   app as a whole: every page slows down and holds.

use std::{
    collections::{HashMap, VecDeque},
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Jitter, Quota, RateLimiter, clock::Clock};

use crate::graph::{Usage, classify::DEFAULT_THROTTLE_WAIT};

/// Share of the page's rate that is used: the rest absorbs timer jitter.
const RATE_SHARE: f64 = 0.99;
/// Largest share of a second's calls in one request: a 300/s page sends 50 every 1/6 s.
const BATCH_SHARE: f64 = 1.0 / 6.0;
/// The span over which Facebook counts a page's calls, and the page counts its own.
const WINDOW: Duration = Duration::from_secs(1);
/// A call counts against the page's rolling second this much longer: a request that left on
/// time may reach Facebook a little late (a busy core, a new connection), and would then still
/// be in Facebook's second when the next ones arrive.
const WINDOW_SLACK: Duration = Duration::from_millis(20);
/// A throttled answer the pace explains multiplies the pace by this...
const THROTTLE_SLOWDOWN: f64 = 0.5;
/// ...at most once per this interval...
const SLOWDOWN_EVERY: Duration = Duration::from_millis(500);
/// ...down to this share of the configured rate...
const SLOWEST: f64 = 0.05;
/// ...and the pace climbs back by this share of the configured rate per second.
const RECOVERY_PER_SECOND: f64 = 0.5;
/// With a budget below the configured rate, the page paces at this share of it...
const BUDGET_SHARE: f64 = 0.95;
/// ...its rolling second holds at most this share of it, and a request carries no more items
/// than the rest: one request that reaches Facebook late cannot take the page over.
const BUDGET_GUARD: f64 = 0.96;
/// A budget estimated at this share of the configured rate or more is the configured rate.
const BUDGET_BELOW_CONFIGURED: f64 = 0.98;
/// Shares (percent) below this are too coarse, in whole percents, to estimate a budget from.
const MIN_PERCENT_FOR_BUDGET: u32 = 20;
/// Weight of a new estimate in the budget's moving average.
const BUDGET_WEIGHT: f64 = 0.2;
/// The pace's governor is rebuilt when the pace moves by more than this share.
const REBUILD_AT: f64 = 0.02;
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

/// The additive-increase, multiplicative-decrease share of a rate (a page's or the app's).
#[derive(Clone, Copy, Debug)]
struct Aimd {
    share: f64,
    updated: Instant,
    slowed: Option<Instant>,
}

impl Aimd {
    fn new(now: Instant) -> Self {
        Aimd {
            share: 1.0,
            updated: now,
            slowed: None,
        }
    }

    /// The share now, after climbing since the last update.
    fn climb(&mut self, now: Instant) -> f64 {
        if self.share < 1.0 {
            let climbed = RECOVERY_PER_SECOND * now.duration_since(self.updated).as_secs_f64();
            self.share = (self.share + climbed).min(1.0);
        }
        // Never back: after a hold, `updated` is its end.
        self.updated = self.updated.max(now);
        self.share
    }

    /// Slows down, unless it did so within `SLOWDOWN_EVERY`; whether it did. Held until
    /// `held_until`, it starts climbing back only then: a hold is not a clean interval.
    fn slow_down(&mut self, now: Instant, held_until: Option<Instant>) -> bool {
        self.climb(now);
        if let Some(until) = held_until {
            // `climb` measures from here; an instant later than now counts as no time.
            self.updated = self.updated.max(until);
        }
        if self
            .slowed
            .is_some_and(|at| now.duration_since(at) < SLOWDOWN_EVERY)
        {
            return false;
        }
        self.share = (self.share * THROTTLE_SLOWDOWN).max(SLOWEST);
        self.slowed = Some(now);
        true
    }
}

/// One page's pace.
struct PageState {
    configured_rate: u32,
    aimd: Aimd,
    /// Calls per second Facebook gives the page, as its usage header tells.
    budget: Option<f64>,
    /// The page's own calls in the last `WINDOW` and `WINDOW_SLACK`: when, and how many items.
    recent: VecDeque<(Instant, u32)>,
    recent_calls: u32,
    /// No call before then (a regain time).
    hold_until: Option<Instant>,
    /// Calls per second the governor was built for.
    pace: f64,
    limiter: Arc<DefaultDirectRateLimiter>,
    /// One waiter at a time polls the limiter, the others queue here in order: many jobs
    /// sleeping on one limiter would all wake for every cell (a thundering herd that costs
    /// more CPU than the sends).
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl PageState {
    fn new(rate: u32, now: Instant, max_batch: usize) -> Self {
        let pace = effective_rate(rate);
        PageState {
            configured_rate: rate,
            aimd: Aimd::new(now),
            budget: None,
            recent: VecDeque::new(),
            recent_calls: 0,
            hold_until: None,
            pace,
            limiter: Arc::new(governor_for(pace, batch_for(pace, max_batch))),
            turn: Arc::default(),
        }
    }

    /// The budget, where it is below the configured rate (else the configured rate binds).
    fn binding_budget(&self) -> Option<f64> {
        self.budget
            .filter(|b| *b < f64::from(self.configured_rate) * BUDGET_BELOW_CONFIGURED)
    }

    /// Calls per second now: the configured rate's, times the AIMD shares, within the budget.
    fn target_pace(&mut self, now: Instant, app_share: f64) -> f64 {
        let mut pace = effective_rate(self.configured_rate) * self.aimd.climb(now) * app_share;
        if let Some(budget) = self.binding_budget() {
            pace = pace.min(budget * BUDGET_SHARE);
        }
        pace.max(0.5)
    }

    /// Items per request now.
    fn batch(&self, max_batch: usize) -> usize {
        let batch = batch_for(self.pace, max_batch);
        match self.binding_budget() {
            Some(budget) => batch.min(((budget * (1.0 - BUDGET_GUARD)).floor() as usize).max(1)),
            None => batch,
        }
    }

    /// The most calls a rolling second of the page's may hold.
    fn window_limit(&self) -> u32 {
        let configured = f64::from(self.configured_rate);
        let limit = match self.binding_budget() {
            Some(budget) => (budget * BUDGET_GUARD).min(configured),
            None => configured,
        };
        (limit.floor() as u32).max(1)
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some((at, n)) = self.recent.front().copied() {
            if now.duration_since(at) < WINDOW + WINDOW_SLACK {
                break;
            }
            self.recent.pop_front();
            self.recent_calls -= n;
        }
    }

    /// The calls of the last `WINDOW` exactly (what Facebook's usage share is of).
    fn calls_in_window(&self, now: Instant) -> u32 {
        self.recent
            .iter()
            .rev()
            .take_while(|(at, _)| now.duration_since(*at) < WINDOW)
            .map(|(_, n)| n)
            .sum()
    }

    /// Rebuilds the governor when the pace has moved enough to matter (or `force`).
    fn repace(&mut self, now: Instant, app_share: f64, max_batch: usize, force: bool) {
        let pace = self.target_pace(now, app_share);
        let moved = (pace - self.pace).abs() / self.pace;
        let back_to_full = pace != self.pace && pace >= effective_rate(self.configured_rate);
        if force || moved > REBUILD_AT || back_to_full {
            self.pace = pace;
            self.limiter = Arc::new(governor_for(pace, self.batch(max_batch)));
        }
    }
}

/// Calls per second the governor lets through for a page at `rate`: 99% of it, and at least
/// one call a second below it, so that a call delayed on its way (a new connection, a busy
/// core) cannot squeeze one call too many into a second at low rates either.
fn effective_rate(rate: u32) -> f64 {
    let r = f64::from(rate);
    (r * RATE_SHARE).min(r - 1.0).max(0.5)
}

/// Items per request at `pace`: a sixth of a second's calls at the rate the pace stands for
/// (50 for a page at 300/s), within Graph's batch limit.
fn batch_for(pace: f64, max_batch: usize) -> usize {
    ((pace / RATE_SHARE * BATCH_SHARE + 1e-9).floor() as usize).clamp(1, max_batch.max(1))
}

/// A governor at `pace` whose burst is one batch and one spare cell: a job that wakes a little
/// late still takes its cells on the schedule (with no spare, every late wake-up is a slot lost).
fn governor_for(pace: f64, batch: usize) -> DefaultDirectRateLimiter {
    let burst = u32::try_from(batch + 1).unwrap_or(u32::MAX);
    let quota = Quota::with_period(Duration::from_secs_f64(1.0 / pace))
        .expect("a positive pace has a positive period")
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
    RateLimiter::direct(quota)
}

/// What a call's pacing knew when it went out: read back with the call's answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ticket {
    /// The page's calls in the rolling second up to and including this request's items (0 for
    /// an unpaced page, which learns nothing from usage).
    pub recent_calls: u32,
}

/// What the app as a whole is allowed.
struct AppState {
    aimd: Aimd,
    hold_until: Option<Instant>,
}

#[derive(Clone)]
pub struct Pacer {
    settings: PacingSettings,
    pages: Arc<Mutex<HashMap<String, PageState>>>,
    app: Option<Arc<DefaultDirectRateLimiter>>,
    app_state: Arc<Mutex<AppState>>,
}

/// What a page's pace is now, for metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PaceView {
    pub pace: f64,
    pub budget: Option<f64>,
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
            app_state: Arc::new(Mutex::new(AppState {
                aimd: Aimd::new(Instant::now()),
                hold_until: None,
            })),
        }
    }

    fn lock_pages(&self) -> std::sync::MutexGuard<'_, HashMap<String, PageState>> {
        self.pages.lock().expect("the pacer lock is never poisoned")
    }

    fn lock_app(&self) -> std::sync::MutexGuard<'_, AppState> {
        self.app_state
            .lock()
            .expect("the pacer lock is never poisoned")
    }

    /// The page's state, made on its first call.
    fn page_state<'a>(
        pages: &'a mut HashMap<String, PageState>,
        page_id: &str,
        rate: u32,
        now: Instant,
        max_batch: usize,
    ) -> &'a mut PageState {
        pages
            .entry(page_id.to_string())
            .or_insert_with(|| PageState::new(rate, now, max_batch))
    }

    /// The app-wide share now, and until when the app holds.
    fn app_now(&self, now: Instant) -> (f64, Option<Instant>) {
        let mut app = self.lock_app();
        let share = app.aimd.climb(now);
        (share, app.hold_until.filter(|until| *until > now))
    }

    /// Items per Graph request for the page at `rate`, at its pace now.
    pub fn batch_size(&self, page_id: &str, rate: u32) -> usize {
        if !self.settings.enforce_page_rate {
            return self.settings.max_batch.max(1);
        }
        let max_batch = self.settings.max_batch;
        self.lock_pages().get(page_id).map_or_else(
            || batch_for(effective_rate(rate), max_batch),
            |page| page.batch(max_batch),
        )
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
        let batch = batch_for(effective_rate(rate), self.settings.max_batch);
        ((rate as usize).div_ceil(2)).max(batch * 2)
    }

    /// The page's pace and budget as they stand, if it has called.
    pub fn view(&self, page_id: &str) -> Option<PaceView> {
        self.lock_pages().get(page_id).map(|page| PaceView {
            pace: page.pace,
            budget: page.budget,
        })
    }

    /// Waits until `n` calls of the page (at `rate`) may go out, and counts them as gone.
    pub async fn acquire(&self, page_id: &str, rate: u32, n: usize) -> Ticket {
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        let mut ticket = Ticket::default();
        if self.settings.enforce_page_rate {
            let turn = {
                let mut pages = self.lock_pages();
                let max_batch = self.settings.max_batch;
                Self::page_state(&mut pages, page_id, rate, Instant::now(), max_batch)
                    .turn
                    .clone()
            };
            // Waiters take their turns in order; no jitter here: a late wake-up is a slot lost
            // for good (GCRA does not lend it back).
            let _turn = turn.lock().await;
            let limiter = self.page_limiter(page_id, rate);
            take(&limiter, n, Jitter::up_to(Duration::ZERO)).await;
            ticket.recent_calls = self.enter_window(page_id, rate, n).await;
        }
        if let Some(app) = &self.app {
            // Pages waiting on the app-wide limit wake together: spread them.
            take(app, n, Jitter::up_to(JITTER)).await;
        }
        if !self.settings.enforce_page_rate {
            self.wait_out_app_hold().await;
        }
        ticket
    }

    /// Waits while the app is held (code 4).
    async fn wait_out_app_hold(&self) {
        while let (_, Some(until)) = self.app_now(Instant::now()) {
            tokio::time::sleep_until(until.into()).await;
        }
    }

    /// The page's governor at its pace now, once any hold has passed.
    fn page_limiter(&self, page_id: &str, rate: u32) -> Arc<DefaultDirectRateLimiter> {
        let now = Instant::now();
        let (app_share, _) = self.app_now(now);
        let mut pages = self.lock_pages();
        let max_batch = self.settings.max_batch;
        let page = Self::page_state(&mut pages, page_id, rate, now, max_batch);
        let rate_changed = page.configured_rate != rate;
        page.configured_rate = rate;
        page.repace(now, app_share, max_batch, rate_changed);
        page.limiter.clone()
    }

    /// Waits until the page's rolling second has room for `n` more calls (and any hold of the
    /// page or the app has passed), then counts them; the calls in the rolling second, these
    /// included.
    async fn enter_window(&self, page_id: &str, rate: u32, n: u32) -> u32 {
        loop {
            // Checked last, right before the call: calls that queued before the hold began
            // wait it out too.
            self.wait_out_app_hold().await;
            let now = Instant::now();
            let wait = {
                let mut pages = self.lock_pages();
                let max_batch = self.settings.max_batch;
                let page = Self::page_state(&mut pages, page_id, rate, now, max_batch);
                page.forget_before(now);
                match page.hold_until.filter(|until| *until > now) {
                    Some(until) => until - now,
                    // An empty second takes any request, however large: a batch made before
                    // the budget fell can never wait forever.
                    None if page.recent_calls == 0
                        || page.recent_calls + n <= page.window_limit() =>
                    {
                        page.recent.push_back((now, n));
                        page.recent_calls += n;
                        return page.calls_in_window(now);
                    }
                    None => {
                        let oldest = page.recent.front().map_or(now, |(at, _)| *at);
                        (oldest + WINDOW + WINDOW_SLACK).saturating_duration_since(now)
                    }
                }
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }

    /// What an answer's usage header said about the page's budget, for the call `ticket` was
    /// taken for.
    pub fn observe(&self, page_id: &str, ticket: Ticket, usage: &Usage) {
        let Some(percent) = usage.page_percent else {
            return;
        };
        // A full share says the budget is used up, not how large it is.
        if ticket.recent_calls == 0 || !(MIN_PERCENT_FOR_BUDGET..100).contains(&percent) {
            return;
        }
        // Whole percents, rounded down by Facebook: the middle of the percent.
        let estimate = f64::from(ticket.recent_calls) * 100.0 / (f64::from(percent) + 0.5);
        let now = Instant::now();
        let (app_share, _) = self.app_now(now);
        let mut pages = self.lock_pages();
        if let Some(page) = pages.get_mut(page_id) {
            page.budget = Some(match page.budget {
                Some(budget) => budget + BUDGET_WEIGHT * (estimate - budget),
                None => estimate,
            });
            page.repace(now, app_share, self.settings.max_batch, false);
        }
    }

    /// A throttled answer: see the module's comment for what slows down and what holds.
    pub fn throttled(&self, page_id: &str, regain: Option<Duration>, app_wide: bool) {
        let now = Instant::now();
        if app_wide {
            let mut app = self.lock_app();
            let until = now + regain.unwrap_or(DEFAULT_THROTTLE_WAIT);
            if app.hold_until.is_none_or(|held| held < until) {
                app.hold_until = Some(until);
            }
            let held_until = app.hold_until;
            app.aimd.slow_down(now, held_until);
            return;
        }
        let (app_share, _) = self.app_now(now);
        let mut pages = self.lock_pages();
        let Some(page) = pages.get_mut(page_id) else {
            return;
        };
        if let Some(regain) = regain {
            let until = now + regain;
            if page.hold_until.is_none_or(|held| held < until) {
                page.hold_until = Some(until);
            }
        }
        // Well within the budget the header reports: not this page's pace.
        let within_budget = page.budget.is_some() && page.binding_budget().is_none();
        let held_until = page.hold_until;
        if (regain.is_some() || !within_budget) && page.aimd.slow_down(now, held_until) {
            page.repace(now, app_share, self.settings.max_batch, false);
        }
    }
}

/// Takes `n` cells, in pieces no larger than the limiter's burst. Waits on the calling thread's
/// own timer (tokio's, 1 ms granularity, which the spare cell of the burst absorbs): governor's
/// `until_ready` sleeps on futures-timer's global thread, which then wakes the sender's thread
/// for every paced call, two thread switches a call that an instance held to a fraction of a
/// core pays for (8% of its samples went to that thread in a profile).
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

    fn usage(percent: u32) -> Usage {
        Usage {
            page_percent: Some(percent),
            ..Usage::default()
        }
    }

    #[test]
    fn a_batch_is_a_sixth_of_a_seconds_calls_within_graphs_limit() {
        let paced = pacer(true);
        assert_eq!(paced.batch_size("p", 300), 50);
        assert_eq!(paced.batch_size("p", 1000), 50);
        assert_eq!(paced.batch_size("p", 40), 6);
        assert_eq!(paced.batch_size("p", 1), 1);
        assert_eq!(pacer(false).batch_size("p", 300), 50);
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
        assert!((effective_rate(300) - 297.0).abs() < 1e-9);
        assert!((effective_rate(40) - 39.0).abs() < 1e-9);
        assert!((effective_rate(1) - 0.5).abs() < 1e-9);
    }

    #[tokio::test]
    async fn a_page_is_paced_below_its_rate_in_every_second() {
        // 40 calls at 20/s: the last may start no earlier than ~1.8 s after the first burst,
        // and no rolling second holds more than 20.
        let pacer = pacer(true);
        let started = Instant::now();
        let mut tickets = Vec::new();
        for _ in 0..40 {
            tickets.push(pacer.acquire("p", 20, 1).await);
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(1800), "{elapsed:?}");
        assert!(tickets.iter().all(|t| t.recent_calls <= 20), "{tickets:?}");
    }

    #[tokio::test]
    async fn a_rolling_second_never_holds_more_than_the_rate_even_in_whole_batches() {
        let pacer = pacer(true);
        let mut sent: Vec<(Instant, u32)> = Vec::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2500) {
            let n = pacer.batch_size("p", 60);
            pacer.acquire("p", 60, n).await;
            sent.push((Instant::now(), n as u32));
        }
        for (i, (at, _)) in sent.iter().enumerate() {
            let in_second: u32 = sent[i..]
                .iter()
                .take_while(|(t, _)| t.duration_since(*at) < WINDOW)
                .map(|(_, n)| n)
                .sum();
            assert!(in_second <= 60, "{in_second} calls in a second");
        }
    }

    #[tokio::test]
    async fn the_usage_header_reveals_a_budget_below_the_rate_and_the_pace_follows() {
        let pacer = pacer(true);
        let ticket = pacer.acquire("p", 300, 1).await;
        // 60 calls in the second came to 30% of the budget: a budget of ~200/s.
        assert_eq!(ticket.recent_calls, 1);
        pacer.observe("p", Ticket { recent_calls: 60 }, &usage(30));
        let view = pacer.view("p").unwrap();
        let budget = view.budget.unwrap();
        assert!((195.0..=200.0).contains(&budget), "{budget}");
        assert!((view.pace - budget * BUDGET_SHARE).abs() < 1e-6, "{view:?}");
        // Coarse shares, full shares and calls the page did not count teach nothing.
        for (calls, percent) in [(60, 10), (60, 100), (0, 50)] {
            pacer.observe(
                "p",
                Ticket {
                    recent_calls: calls,
                },
                &usage(percent),
            );
        }
        assert_eq!(pacer.view("p").unwrap().budget, Some(budget));
    }

    #[tokio::test]
    async fn a_budget_at_the_configured_rate_leaves_the_pace_alone() {
        let pacer = pacer(true);
        pacer.acquire("p", 300, 1).await;
        // A fixed-second count late in its second: 297 calls at 99%.
        pacer.observe("p", Ticket { recent_calls: 297 }, &usage(99));
        let view = pacer.view("p").unwrap();
        assert!((view.pace - 297.0).abs() < 1e-6, "{view:?}");
    }

    #[tokio::test]
    async fn throttles_the_pace_explains_halve_it_once_per_interval_and_it_climbs_back() {
        let pacer = pacer(true);
        pacer.acquire("p", 300, 1).await;
        pacer.throttled("p", None, false);
        pacer.throttled("p", None, false);
        let slowed = pacer.view("p").unwrap().pace;
        assert!((slowed - 148.5).abs() < 1.0, "{slowed}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        pacer.acquire("p", 300, 1).await;
        let climbing = pacer.view("p").unwrap().pace;
        assert!(climbing > slowed + 40.0, "{climbing}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        pacer.acquire("p", 300, 1).await;
        assert!((pacer.view("p").unwrap().pace - 297.0).abs() < 1e-6);
    }

    #[tokio::test]
    async fn a_throttle_the_header_contradicts_does_not_slow_the_page() {
        let pacer = pacer(true);
        pacer.acquire("p", 300, 1).await;
        pacer.observe("p", Ticket { recent_calls: 150 }, &usage(40));
        pacer.throttled("p", None, false);
        assert!((pacer.view("p").unwrap().pace - 297.0).abs() < 1e-6);
    }

    #[tokio::test]
    async fn a_regain_time_holds_the_page_and_code_4_holds_the_app() {
        let pacer = pacer(true);
        pacer.acquire("p", 300, 1).await;
        pacer.throttled("p", Some(Duration::from_millis(300)), false);
        let started = Instant::now();
        pacer.acquire("p", 300, 1).await;
        assert!(started.elapsed() >= Duration::from_millis(280));
        pacer.acquire("q", 300, 1).await;
        pacer.throttled("q", Some(Duration::from_millis(300)), true);
        let started = Instant::now();
        pacer.acquire("other", 300, 1).await;
        assert!(started.elapsed() >= Duration::from_millis(280));
        let pace = pacer.view("other").unwrap().pace;
        assert!(pace < 297.0 * 0.75, "every page slows with the app: {pace}");
    }
}
