//! The webhook endpoint, running.

use super::*;

/// Pages of the webhook run: forged POSTs aim at the first; the second gets genuine ones; the
/// third genuine ones mutated then signed; the fourth signs bodies that also name the first.
pub(super) const FORGED: &str = "901";
pub(super) const GENUINE: &str = "902";
pub(super) const MUTATED: &str = "903";
pub(super) const OTHER_TENANT: &str = "904";
pub(super) const WEBHOOK_PAGES: [&str; 4] = [FORGED, GENUINE, MUTATED, OTHER_TENANT];

pub(super) fn sign(secret: &str, body: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
    .into_bytes()
}

#[derive(Clone, Debug)]
pub(super) struct GenOptIn {
    psid: String,
    topic: String,
    token: String,
    age_ms: i64,
}

pub(super) fn gen_optin() -> impl Strategy<Value = GenOptIn> {
    let topic = prop_oneof![
        6 => "\\PC{1,40}",
        2 => "[ -~]{1,40}",
        // A NUL is a character like any other in a payload.
        1 => ("[a-z]{1,5}", "[a-z]{1,5}").prop_map(|(a, b)| format!("{a}\u{0}{b}")),
    ];
    (
        "fan-[0-9]{1,3}",
        topic,
        "[A-Za-z0-9_-]{12,40}",
        0..300 * 24 * 3600 * 1000_i64,
    )
        .prop_map(|(psid, topic, token, age_ms)| GenOptIn {
            psid,
            topic,
            token,
            age_ms,
        })
}

/// 1 to 5 opt-ins for `page`, with a message and a read beside them, as Facebook posts them.
pub(super) fn entry_for(page: &str, optins: &[GenOptIn], now: i64) -> Value {
    let mut messaging: Vec<Value> = optins
        .iter()
        .map(|o| {
            json!({"sender": {"id": o.psid}, "recipient": {"id": page}, "timestamp": now - o.age_ms,
                   "optin": {"type": "one_time_notif_req", "payload": o.topic,
                             "one_time_notif_token": o.token}})
        })
        .collect();
    messaging.push(
        json!({"sender": {"id": optins[0].psid}, "recipient": {"id": page},
        "timestamp": now, "message": {"mid": "m", "text": "hi"}}),
    );
    messaging.push(
        json!({"sender": {"id": optins[0].psid}, "recipient": {"id": page},
        "timestamp": now, "read": {"watermark": now}}),
    );
    json!({"id": page, "time": now, "messaging": messaging})
}

pub(super) fn envelope_for(page: &'static str, now: i64) -> impl Strategy<Value = Value> {
    prop::collection::vec(gen_optin(), 1..=5)
        .prop_map(move |optins| json!({"object": "page", "entry": [entry_for(page, &optins, now)]}))
}

/// Pre-order count of a JSON tree's nodes.
pub(super) fn nodes(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(nodes).sum(),
        Value::Object(fields) => fields.values().map(nodes).sum(),
        _ => 0,
    }
}

/// Replaces the `n`th node (pre-order); returns how many nodes were passed.
pub(super) fn replace_node(value: &mut Value, n: usize, with: &Value) -> usize {
    if n == 0 {
        *value = with.clone();
        return 1;
    }
    let mut seen = 1;
    let children: Vec<&mut Value> = match value {
        Value::Array(items) => items.iter_mut().collect(),
        Value::Object(fields) => fields.values_mut().collect(),
        _ => Vec::new(),
    };
    for child in children {
        if seen > n {
            break;
        }
        seen += replace_node(child, n - seen, with);
    }
    seen
}

/// Sets every `time` and `timestamp` in the tree.
pub(super) fn set_times(value: &mut Value, to: &Value) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(|v| set_times(v, to)),
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                if key == "time" || key == "timestamp" {
                    *field = to.clone();
                } else {
                    set_times(field, to);
                }
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
pub(super) enum JsonMutation {
    None,
    Replace(prop::sample::Index, Value),
    Times(Value),
    Nest(prop::sample::Index, usize),
}

#[derive(Clone, Debug)]
pub(super) enum ByteMutation {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index, usize),
    Duplicate(prop::sample::Index, usize),
}

pub(super) fn json_mutation() -> impl Strategy<Value = JsonMutation> {
    prop_oneof![
        2 => Just(JsonMutation::None),
        3 => (any::<prop::sample::Index>(), any_json())
            .prop_map(|(at, with)| JsonMutation::Replace(at, with)),
        2 => prop_oneof![
            3 => prop::sample::select(vec![
                json!(i64::MAX),
                json!(i64::MIN),
                json!(i64::MAX - 1000),
                json!(i64::MIN + 1000),
                json!(u64::MAX),
                json!(253_402_300_800_000_i64),
                json!(-62_135_596_800_001_i64),
                json!(-1),
            ]),
            1 => json_number(),
        ]
        .prop_map(JsonMutation::Times),
        1 => (any::<prop::sample::Index>(), 1..400_usize)
            .prop_map(|(at, depth)| JsonMutation::Nest(at, depth)),
    ]
}

/// Often none, so that the JSON mutation reaches the service intact.
pub(super) fn byte_mutations() -> impl Strategy<Value = Vec<ByteMutation>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => prop::collection::vec(byte_mutation(), 1..3),
    ]
}

pub(super) fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    let at = any::<prop::sample::Index>;
    prop_oneof![
        (at(), 0..8_u8).prop_map(|(at, bit)| ByteMutation::Flip(at, bit)),
        at().prop_map(ByteMutation::Truncate),
        (at(), any::<u8>()).prop_map(|(at, byte)| ByteMutation::Insert(at, byte)),
        (at(), 1..16_usize).prop_map(|(at, len)| ByteMutation::Delete(at, len)),
        (at(), 1..64_usize).prop_map(|(at, len)| ByteMutation::Duplicate(at, len)),
    ]
}

pub(super) fn mutate(
    mut value: Value,
    json_mutation: &JsonMutation,
    byte_mutations: &[ByteMutation],
) -> Vec<u8> {
    match json_mutation {
        JsonMutation::None => {}
        JsonMutation::Replace(at, with) => {
            let n = at.index(nodes(&value));
            replace_node(&mut value, n, with);
        }
        JsonMutation::Times(to) => set_times(&mut value, to),
        JsonMutation::Nest(at, depth) => {
            let n = at.index(nodes(&value));
            let deep: Value = (0..*depth).fold(json!(1), |inner, _| json!([inner]));
            replace_node(&mut value, n, &deep);
        }
    }
    let mut bytes = serde_json::to_vec(&value).expect("a JSON value serialises");
    for mutation in byte_mutations {
        let len = bytes.len().max(1);
        match mutation {
            ByteMutation::Flip(at, bit) => {
                if !bytes.is_empty() {
                    let i = at.index(len);
                    bytes[i] ^= 1 << bit;
                }
            }
            ByteMutation::Truncate(at) => bytes.truncate(at.index(len)),
            ByteMutation::Insert(at, byte) => {
                bytes.insert(at.index(len + 1).min(bytes.len()), *byte)
            }
            ByteMutation::Delete(at, n) => {
                let start = at.index(len).min(bytes.len());
                let end = (start + n).min(bytes.len());
                bytes.drain(start..end);
            }
            ByteMutation::Duplicate(at, n) => {
                let start = at.index(len).min(bytes.len());
                let end = (start + n).min(bytes.len());
                let copy = bytes[start..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
    }
    bytes
}

/// A signature header that is not the right one for the body it goes with.
#[derive(Clone, Debug)]
pub(super) enum BadHeader {
    Missing,
    RandomHex(String),
    WrongSecret(String),
    /// Signed with the page's secret, over the body as it was before it was altered.
    OverTheOriginal,
    /// Signed with another registered page's secret (a tenant forging for its neighbour).
    OtherTenant,
    Text(String),
    Malformed(prop::sample::Index, u8),
}

pub(super) fn bad_header() -> impl Strategy<Value = BadHeader> {
    prop_oneof![
        Just(BadHeader::Missing),
        "[0-9a-f]{64}".prop_map(BadHeader::RandomHex),
        "[!-~]{1,40}".prop_map(BadHeader::WrongSecret),
        Just(BadHeader::OverTheOriginal),
        Just(BadHeader::OtherTenant),
        "[ -~]{0,80}".prop_map(BadHeader::Text),
        (any::<prop::sample::Index>(), 0..4_u8).prop_map(|(at, how)| BadHeader::Malformed(at, how)),
    ]
}

#[derive(Clone)]
pub(super) struct Post {
    class: &'static str,
    body: Vec<u8>,
    header: Option<Vec<u8>>,
}

impl std::fmt::Debug for Post {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Post")
            .field("class", &self.class)
            .field("body", &String::from_utf8_lossy(&self.body))
            .field(
                "header",
                &self.header.as_deref().map(String::from_utf8_lossy),
            )
            .finish()
    }
}

pub(super) fn forged_post(now: i64) -> impl Strategy<Value = Post> {
    let body = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..2048).prop_map(|b| (b.clone(), b)),
        3 => (
            envelope_for(FORGED, now),
            json_mutation(),
            byte_mutations(),
        )
            .prop_map(|(envelope, json_mutation, byte_mutations)| {
                let original = envelope.to_string().into_bytes();
                (original, mutate(envelope, &json_mutation, &byte_mutations))
            }),
    ];
    (body, bad_header()).prop_map(|((original, body), header)| {
        let right = sign(&page_app_secret(FORGED), &body);
        let header = match header {
            BadHeader::Missing => None,
            BadHeader::RandomHex(hex) => Some(format!("sha256={hex}").into_bytes()),
            BadHeader::WrongSecret(secret) => Some(sign(&secret, &body)),
            BadHeader::OverTheOriginal => Some(sign(&page_app_secret(FORGED), &original)),
            BadHeader::OtherTenant => Some(sign(&page_app_secret(OTHER_TENANT), &body)),
            BadHeader::Text(text) => Some(text.into_bytes()),
            BadHeader::Malformed(at, how) => {
                let hex = &right[7..];
                Some(match how {
                    0 => hex.to_vec(),
                    1 => right[..7 + at.index(hex.len())].to_vec(),
                    2 => [right.as_slice(), b"0"].concat(),
                    _ => [b"sha1=".as_slice(), hex].concat(),
                })
            }
        };
        // A mutation that changed nothing leaves the original signature right: not a forgery.
        let header = header.map(|h| {
            if h == right {
                sign("not-the-secret", &body)
            } else {
                h
            }
        });
        Post {
            class: "forged",
            body,
            header,
        }
    })
}

pub(super) fn genuine_post(now: i64) -> impl Strategy<Value = Post> {
    envelope_for(GENUINE, now).prop_map(|envelope| {
        let body = envelope.to_string().into_bytes();
        Post {
            class: "genuine",
            header: Some(sign(&page_app_secret(GENUINE), &body)),
            body,
        }
    })
}

pub(super) fn mutated_post(now: i64) -> impl Strategy<Value = Post> {
    (
        envelope_for(MUTATED, now),
        json_mutation(),
        byte_mutations(),
    )
        .prop_map(|(envelope, json_mutation, byte_mutations)| {
            let body = mutate(envelope, &json_mutation, &byte_mutations);
            Post {
                class: "mutated-signed",
                header: Some(sign(&page_app_secret(MUTATED), &body)),
                body,
            }
        })
}

/// A body naming the forged page and the other tenant, signed by the other tenant.
pub(super) fn cross_tenant_post(now: i64) -> impl Strategy<Value = Post> {
    (
        prop::collection::vec(gen_optin(), 1..=3),
        prop::collection::vec(gen_optin(), 1..=3),
    )
        .prop_map(move |(victim, own)| {
            let body = json!({"object": "page", "entry": [
                entry_for(FORGED, &victim, now), entry_for(OTHER_TENANT, &own, now)]})
            .to_string()
            .into_bytes();
            Post {
                class: "cross-tenant",
                header: Some(sign(&page_app_secret(OTHER_TENANT), &body)),
                body,
            }
        })
}

pub(super) fn webhook_post(now: i64) -> impl Strategy<Value = Post> {
    prop_oneof![
        5 => forged_post(now),
        2 => genuine_post(now),
        3 => mutated_post(now),
        1 => cross_tenant_post(now),
    ]
}

/// Every stored opt-in of `page`: token fingerprint -> (psid, topic).
pub(super) async fn stored_opt_ins(
    app: &mut TestApp,
    page: &str,
) -> BTreeMap<String, (String, String)> {
    let mut stored = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let response = app
            .optins
            .list_opt_ins(ListOptInsRequest {
                page_id: page.into(),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("ListOptIns")
            .into_inner();
        for o in response.opt_ins {
            stored.insert(o.token_fingerprint, (o.psid, o.topic));
        }
        if response.next_page_token.is_empty() {
            return stored;
        }
        page_token = response.next_page_token;
    }
}

backend_tests! {
    async fn webhook_posts_never_fail_and_store_only_what_a_page_signed(db) {
        let mut app = spawn_app(&db).await;
        for page in WEBHOOK_PAGES {
            app.register_page(page).await;
        }
        let now = chrono::Utc::now().timestamp_millis();
        let mut runner = TestRunner::new(Config { failure_persistence: None, ..Config::default() });
        let strategy = webhook_post(now);
        let posts: Vec<Post> = (0..WEBHOOK_POSTS)
            .map(|_| strategy.new_tree(&mut runner).expect("a case").current())
            .collect();

        let client = otnd::graph::http_client_builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let secrets: Vec<(&str, String)> =
            WEBHOOK_PAGES.iter().map(|p| (*p, page_app_secret(p))).collect();
        // Per page, token -> (psid, topic) of the opt-ins its own signed bodies carried.
        let mut expected: BTreeMap<&str, BTreeMap<String, (String, String)>> = BTreeMap::new();
        let mut tally: BTreeMap<(&str, u16), usize> = BTreeMap::new();
        let mut psids_named_for_forged = BTreeSet::new();
        let mut failures = Vec::new();
        for post in &posts {
            let signer = secrets
                .iter()
                .find(|(_, secret)| post.header.as_deref() == Some(sign(secret, &post.body).as_slice()))
                .map(|(page, _)| *page);
            if let Ok(parsed) = parse(&post.body, now) {
                for (page, events) in &parsed.pages {
                    if page.as_str() == FORGED {
                        psids_named_for_forged.extend(events.iter().map(|e| e.psid.as_str().to_string()));
                    }
                }
            }
            let mut request = client
                .post(app.http_url("/webhook"))
                .header("Content-Type", "application/json")
                .body(post.body.clone());
            if let Some(header) = &post.header {
                match reqwest::header::HeaderValue::from_bytes(header) {
                    Ok(value) => request = request.header("X-Hub-Signature-256", value),
                    Err(_) => continue,
                }
            }
            let (status, text) = match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    (status, response.text().await.unwrap_or_default())
                }
                Err(err) => {
                    failures.push(format!("no answer ({err}) to {post:?}"));
                    continue;
                }
            };
            *tally.entry((post.class, status)).or_default() += 1;
            let ok = match (signer, status) {
                (_, 500..) => false,
                (_, 400..=499) => !matches!(post.class, "genuine" | "cross-tenant"),
                (None, 200) => text == "ignored",
                (Some(_), 200) => text == "EVENT_RECEIVED" || text == "ignored",
                _ => false,
            };
            if !ok {
                failures.push(format!("{status} {text:?} (signed by {signer:?}) for {post:?}"));
            }
            if let (Some(page), 200, "EVENT_RECEIVED") = (signer, status, text.as_str()) {
                let parsed = parse(&post.body, now).expect("a body the webhook took parses");
                let mine = expected.entry(page).or_default();
                for event in parsed.pages.iter().filter(|(p, _)| p.as_str() == page).flat_map(|(_, e)| e) {
                    if let EventKind::OptIn { topic, token, .. } = &event.kind {
                        mine.entry(token.as_str().to_string()).or_insert_with(|| {
                            (event.psid.as_str().to_string(), topic.as_str().to_string())
                        });
                    }
                }
            }
        }
        println!("webhook fuzz: {} POSTs; (class, status) -> count: {tally:?}", posts.len());
        assert!(failures.is_empty(), "{} bad answers:\n{}", failures.len(), failures.join("\n"));

        assert!(!expected.contains_key(FORGED), "the forged page's secret signed nothing");
        for page in WEBHOOK_PAGES {
            let stored = stored_opt_ins(&mut app, page).await;
            let want: BTreeMap<String, (String, String)> = expected
                .get(page)
                .map(|m| m.iter().map(|(token, v)| (fingerprint(token), v.clone())).collect())
                .unwrap_or_default();
            println!("webhook fuzz: page {page}: {} opt-ins stored, {} expected", stored.len(), want.len());
            assert_eq!(stored, want, "page {page}: the opt-ins stored are those of its signed bodies");
        }
        assert!(
            expected.get(GENUINE).is_some_and(|m| !m.is_empty()),
            "genuine opt-ins were generated and stored"
        );
        for psid in psids_named_for_forged.iter().take(200) {
            let answer = app.audience.get_subscriber(GetSubscriberRequest {
                page_id: FORGED.into(), psid: psid.clone() }).await;
            assert_eq!(answer.map(|_| ()).unwrap_err().code(), tonic::Code::NotFound,
                "a forged POST made {psid} a subscriber of {FORGED}");
        }
    }
}
