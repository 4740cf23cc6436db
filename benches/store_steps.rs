//! The store's share of a send, alone: one page's send of N recipients on SQLite driven step by
//! step as the page actor drives it (claim and materialise a step, then record its answers as
//! sent, in two batches), with no Graph API and no actor in between. It prints the time and the
//! CPU time (every thread, SQLite's own included) the steps and recordings took, so that a change
//! to the store's statements can be measured without the rest of the engine. Under
//! `valgrind --tool=callgrind --separate-threads=yes` its instruction counts repeat exactly.
//!
//!     cargo bench --bench store_steps [-- RECIPIENTS [RUNS]]

use std::time::Instant;

use otnd::{
    crypto::{MasterKey, SecretCipher},
    domain::{ContentInput, NewPage, OptInToken, PageId, Psid, SendEvent, StoryContent, Topic},
    store::{
        Store, in_transaction, leases, now_ms, optins,
        sends::{self, Answer, NewSend, Outcome, Started},
        stories,
    },
};

const STEP: u64 = 1000;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let recipients: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..runs.max(1) {
        let (wall, cpu) = runtime.block_on(run(recipients))?;
        walls.push(wall);
        cpus.push(cpu);
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let list = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "store steps for {recipients} recipients: wall {} ms (median {:.1} ms, {:.0} deliveries/s); \
         CPU {} ms (median {:.1} ms)",
        list(&walls),
        median(&walls),
        recipients as f64 / (median(&walls) / 1000.0),
        list(&cpus),
        median(&cpus)
    );
    Ok(())
}

/// One send: its wall and CPU milliseconds.
async fn run(recipients: usize) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("otnd.db").display());
    let settings = otnd::config::Settings::load_from(
        None,
        &[("OTN_DATABASE_URL".to_string(), url)]
            .into_iter()
            .collect(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::connect(&settings.database_url).await?;
    store.migrate().await?;
    let db = &store.db;
    let cipher = SecretCipher::new(&MasterKey::generate());
    let page = PageId::parse("1234567890").map_err(anyhow::Error::msg)?;
    let new_page = NewPage::parse("1234567890", "Bench", "EAAB-bench", "secret", "", Some(300))
        .map_err(|v| anyhow::anyhow!("{v}"))?;
    otnd::store::pages::create(db, &cipher, &new_page).await?;
    let topic = Topic::parse("Bench topic").map_err(anyhow::Error::msg)?;
    let now = now_ms();
    for start in (0..recipients).step_by(10_000) {
        let events = (start..(start + 10_000).min(recipients))
            .map(|n| otnd::domain::IncomingEvent {
                psid: Psid::parse(&format!("psid-{n:07}")).unwrap(),
                at_ms: now,
                kind: otnd::domain::EventKind::OptIn {
                    topic: topic.clone(),
                    token: OptInToken::parse(&format!("token-{n:09}")).unwrap(),
                    recurring: None,
                },
            })
            .collect();
        optins::ingest(db, &cipher, &[(page.clone(), events)]).await?;
    }
    let content = StoryContent::parse("content", ContentInput::Text("Hello".into()))
        .map_err(|v| anyhow::anyhow!("{v}"))?;
    let story = stories::create(
        db,
        stories::NewStory {
            page_id: &page,
            topic: topic.as_str(),
            content: &content,
            include_window_users: false,
            token_kinds: &[],
            segment_id: None,
        },
        now,
    )
    .await?;
    let new = NewSend {
        story: &story,
        request_id: "bench",
        segment: None,
        max_active: 10,
        expected: 0,
        recurring_cooldown_ms: 48 * 3_600_000,
    };
    let Started::Created(send) =
        in_transaction(db, async |txn| sends::start(txn, new, now).await).await?
    else {
        anyhow::bail!("no new send");
    };
    sends::apply(db, &send.id, SendEvent::Run, None, now).await?;
    let fence = leases::acquire(db, page.as_str(), "bench", 60_000)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no lease"))?;

    let began = Instant::now();
    let cpu_began = cpu_seconds();
    let mut sent = 0;
    loop {
        let step = in_transaction(db, async |txn| {
            sends::step(txn, &fence, &send.id, now_ms(), STEP, false).await
        })
        .await?;
        if step.claimed.is_empty() {
            break;
        }
        let answers: Vec<Answer> = step
            .claimed
            .iter()
            .map(|c| Answer {
                send_id: send.id.clone(),
                id: c.id,
                claim: c.claim,
                outcome: Outcome::Sent {
                    message_id: Some(format!("m_{}", c.id)),
                    confirmed_by_token: false,
                },
            })
            .collect();
        // The engine records answers in batches of about half a step.
        for half in answers.chunks(answers.len().div_ceil(2)) {
            in_transaction(db, async |txn| {
                sends::record(txn, &fence, half, None, now_ms()).await
            })
            .await?;
        }
        sent += answers.len();
    }
    let wall = began.elapsed().as_secs_f64() * 1000.0;
    let cpu = (cpu_seconds() - cpu_began) * 1000.0;
    anyhow::ensure!(sent == recipients, "sent {sent} of {recipients}");
    store.close().await;
    Ok((wall, cpu))
}

/// CPU seconds this process has used, all threads (the database's own included).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given and reads nothing else.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
