//! Story content.

use super::*;

pub(super) const URLS: &[(&str, bool)] = &[
    ("https://example.com", true),
    ("http://example.com/path?q=1#frag", true),
    ("https://例え.jp/パス", true),
    ("https://xn--r8jz45g.jp", true),
    ("http://127.0.0.1:8080/x", true),
    ("https://[::1]/", true),
    ("https://user:pw@example.com/", true),
    ("HTTPS://EXAMPLE.COM/UPPER", true),
    ("https://example.com/é🎉?q=✓", true),
    ("", false),
    ("example.com", false),
    ("ftp://example.com", false),
    ("javascript:alert(1)", false),
    ("mailto:a@example.com", false),
    ("tel:+15105551234", false),
    ("data:text/plain,hi", false),
    ("file:///etc/passwd", false),
    ("https://", false),
    ("//example.com", false),
    ("/relative/path", false),
    ("not a url", false),
    ("https://exa mple.com", false),
];

pub(super) fn labelled_url() -> impl Strategy<Value = (String, bool)> {
    prop_oneof![
        prop::sample::select(URLS).prop_map(|(url, ok)| (url.to_string(), ok)),
        // Long, still valid.
        (1..3000_usize).prop_map(|n| (format!("https://example.com/{}", "a".repeat(n)), true)),
    ]
}

/// A phone number as the documented rule reads: `+` then 7 to 15 ASCII digits.
pub(super) fn is_phone(value: &str) -> bool {
    match value.as_bytes() {
        [b'+', digits @ ..] => {
            (7..=15).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit)
        }
        _ => false,
    }
}

pub(super) fn phone_payload() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "\\+[0-9]{7,15}",
        2 => "\\+[0-9]{0,20}",
        1 => "[0-9]{7,15}",
        1 => "\\+[0-9０-９ a-z+\\-]{5,16}",
        1 => around(20),
    ]
}

/// A button as a client might send it; the url's validity is known by construction.
#[derive(Clone, Debug)]
pub(super) struct GenButton {
    kind: Option<ButtonKind>,
    title: String,
    url: String,
    url_ok: bool,
    payload: String,
}

pub(super) fn gen_button() -> impl Strategy<Value = GenButton> {
    let kind = prop_oneof![
        3 => Just(Some(ButtonKind::WebUrl)),
        3 => Just(Some(ButtonKind::Postback)),
        3 => Just(Some(ButtonKind::PhoneNumber)),
        1 => Just(None),
    ];
    let none = || Just((String::new(), false));
    (kind, around(20))
        .prop_flat_map(move |(kind, title)| {
            let (url, payload) = match kind {
                Some(ButtonKind::WebUrl) => (
                    prop_oneof![4 => labelled_url(), 1 => none()].boxed(),
                    prop_oneof![4 => Just(String::new()), 1 => around(5)].boxed(),
                ),
                Some(ButtonKind::Postback) => (
                    prop_oneof![4 => none(), 1 => labelled_url()].boxed(),
                    around(1000).boxed(),
                ),
                Some(ButtonKind::PhoneNumber) | None => (
                    prop_oneof![4 => none(), 1 => labelled_url()].boxed(),
                    phone_payload().boxed(),
                ),
            };
            (Just(kind), Just(title), url, payload)
        })
        .prop_map(|(kind, title, (url, url_ok), payload)| GenButton {
            kind,
            title,
            url,
            url_ok,
            payload,
        })
}

#[derive(Clone, Debug)]
pub(super) enum GenContent {
    Missing,
    Text(String),
    Template {
        text: String,
        buttons: Vec<GenButton>,
    },
}

pub(super) fn gen_content() -> impl Strategy<Value = GenContent> {
    prop_oneof![
        1 => Just(GenContent::Missing),
        4 => around(2000).prop_map(GenContent::Text),
        8 => (around(640), prop::collection::vec(gen_button(), 0..=5))
            .prop_map(|(text, buttons)| GenContent::Template { text, buttons }),
    ]
}

impl GenContent {
    fn input(&self) -> ContentInput {
        match self {
            GenContent::Missing => ContentInput::Missing,
            GenContent::Text(text) => ContentInput::Text(text.clone()),
            GenContent::Template { text, buttons } => ContentInput::ButtonTemplate {
                text: text.clone(),
                buttons: buttons
                    .iter()
                    .map(|b| ButtonInput {
                        kind: b.kind,
                        title: b.title.clone(),
                        url: b.url.clone(),
                        payload: b.payload.clone(),
                    })
                    .collect(),
            },
        }
    }

    /// The documented rules, written again: every field path that breaks one, sorted.
    fn broken_fields(&self) -> Vec<String> {
        let within = |s: &str, max: usize| (1..=max).contains(&scalars(s));
        let mut broken = Vec::new();
        match self {
            GenContent::Missing => broken.push("content".to_string()),
            GenContent::Text(text) => {
                if !within(text, 2000) {
                    broken.push("content.text".into());
                }
            }
            GenContent::Template { text, buttons } => {
                let base = "content.button_template";
                if !within(text, 640) {
                    broken.push(format!("{base}.text"));
                }
                if !(1..=3).contains(&buttons.len()) {
                    broken.push(format!("{base}.buttons"));
                }
                for (i, b) in buttons.iter().enumerate() {
                    let path = format!("{base}.buttons[{i}]");
                    if !within(&b.title, 20) {
                        broken.push(format!("{path}.title"));
                    }
                    let (url_ok, payload_ok) = match b.kind {
                        None => {
                            broken.push(format!("{path}.type"));
                            (true, true)
                        }
                        Some(ButtonKind::WebUrl) => (b.url_ok, b.payload.is_empty()),
                        Some(ButtonKind::Postback) => (b.url.is_empty(), within(&b.payload, 1000)),
                        Some(ButtonKind::PhoneNumber) => (b.url.is_empty(), is_phone(&b.payload)),
                    };
                    if !url_ok {
                        broken.push(format!("{path}.url"));
                    }
                    if !payload_ok {
                        broken.push(format!("{path}.payload"));
                    }
                }
            }
        }
        broken.sort();
        broken
    }
}

/// What valid content must be: the input, unchanged.
pub(super) fn same_content(parsed: &StoryContent, generated: &GenContent) -> bool {
    match (parsed, generated) {
        (StoryContent::Text(a), GenContent::Text(b)) => a == b,
        (
            StoryContent::ButtonTemplate { text, buttons },
            GenContent::Template {
                text: gen_text,
                buttons: gen_buttons,
            },
        ) => {
            text == gen_text
                && buttons.len() == gen_buttons.len()
                && buttons.iter().zip(gen_buttons).all(|(b, g)| match b {
                    Button::WebUrl { title, url } => {
                        g.kind == Some(ButtonKind::WebUrl) && *title == g.title && *url == g.url
                    }
                    Button::Postback { title, payload } => {
                        g.kind == Some(ButtonKind::Postback)
                            && *title == g.title
                            && *payload == g.payload
                    }
                    Button::PhoneNumber { title, number } => {
                        g.kind == Some(ButtonKind::PhoneNumber)
                            && *title == g.title
                            && *number == g.payload
                    }
                })
        }
        _ => false,
    }
}

proptest! {
    #![proptest_config(config(STORY_CASES))]

    #[test]
    fn story_content_is_valid_exactly_when_the_documented_rules_hold(content in gen_content()) {
        let expected = content.broken_fields();
        match StoryContent::parse("content", content.input()) {
            Ok(parsed) => {
                prop_assert!(expected.is_empty(), "accepted, yet the rules break {expected:?}");
                prop_assert!(same_content(&parsed, &content), "{parsed:?} is not the input");
                let message = parsed.to_graph_message();
                prop_assert_eq!(StoryContent::from_graph_message(&message), Some(parsed));
            }
            Err(violations) => {
                for v in &violations.0 {
                    prop_assert!(!v.field.is_empty() && !v.description.is_empty(), "{v:?}");
                }
                let mut fields: Vec<String> = violations.0.into_iter().map(|v| v.field).collect();
                fields.sort();
                prop_assert_eq!(fields, expected);
            }
        }
    }
}

pub(super) fn wild_button() -> impl Strategy<Value = ButtonInput> {
    (
        prop_oneof![
            Just(None),
            Just(Some(ButtonKind::WebUrl)),
            Just(Some(ButtonKind::Postback)),
            Just(Some(ButtonKind::PhoneNumber)),
        ],
        ".{0,30}",
        prop_oneof![".{0,60}", "https?://\\PC{0,30}", "[a-z]{1,8}:\\PC{0,30}"],
        ".{0,40}",
    )
        .prop_map(|(kind, title, url, payload)| ButtonInput {
            kind,
            title,
            url,
            payload,
        })
}

proptest! {
    #![proptest_config(config(STORY_WILD_CASES))]

    /// Any strings at all (URLs included): never a panic, and every rejection names a field of
    /// the content.
    #[test]
    fn story_content_with_any_strings_names_every_broken_field(
        text in ".{0,700}",
        buttons in prop::collection::vec(wild_button(), 0..8),
    ) {
        let count = buttons.len();
        match StoryContent::parse("content", ContentInput::ButtonTemplate { text, buttons }) {
            Ok(parsed) => {
                let message = parsed.to_graph_message();
                prop_assert_eq!(StoryContent::from_graph_message(&message), Some(parsed));
            }
            Err(violations) => {
                prop_assert!(!violations.0.is_empty());
                for v in &violations.0 {
                    let known = v.field == "content.button_template.text"
                        || v.field == "content.button_template.buttons"
                        || (0..count).any(|i| {
                            ["title", "type", "url", "payload"].iter().any(|f| {
                                v.field == format!("content.button_template.buttons[{i}].{f}")
                            })
                        });
                    prop_assert!(known && !v.description.is_empty(), "{v:?}");
                }
            }
        }
    }
}
