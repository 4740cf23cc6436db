//! A story's content: one text, or one button template with 1 to 3 buttons, checked against
//! Facebook's limits (characters, not bytes) with every broken rule named by its field path.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Violations, char_len};

pub const TEXT_MAX_CHARS: usize = 2000;
pub const TEMPLATE_TEXT_MAX_CHARS: usize = 640;
pub const BUTTONS_MAX: usize = 3;
pub const BUTTON_TITLE_MAX_CHARS: usize = 20;
pub const POSTBACK_PAYLOAD_MAX_CHARS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ButtonKind {
    WebUrl,
    Postback,
    PhoneNumber,
}

/// A button as a request gives it, before its rules are checked.
#[derive(Clone, Debug, Default)]
pub struct ButtonInput {
    /// `None` when the request left the type unspecified (or gave an unknown one).
    pub kind: Option<ButtonKind>,
    pub title: String,
    pub url: String,
    pub payload: String,
}

/// Content as a request gives it.
#[derive(Clone, Debug)]
pub enum ContentInput {
    Missing,
    Text(String),
    ButtonTemplate {
        text: String,
        buttons: Vec<ButtonInput>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Button {
    WebUrl { title: String, url: String },
    Postback { title: String, payload: String },
    PhoneNumber { title: String, number: String },
}

/// Valid content. Its Graph form is what a send and a preview send, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoryContent {
    Text(String),
    ButtonTemplate { text: String, buttons: Vec<Button> },
}

fn length(v: &mut Violations, field: &str, value: &str, max: usize) {
    let len = char_len(value);
    if len == 0 {
        v.add(field, format!("must be 1 to {max} characters, got none"));
    } else if len > max {
        v.add(
            field,
            format!("must be at most {max} characters, got {len}"),
        );
    }
}

fn is_phone_number(value: &str) -> bool {
    value.strip_prefix('+').is_some_and(|digits| {
        (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

fn is_web_url(value: &str) -> bool {
    url::Url::parse(value).is_ok_and(|url| {
        matches!(url.scheme(), "http" | "https") && url.host_str().is_some_and(|h| !h.is_empty())
    })
}

impl StoryContent {
    /// `field` is the content's path in the request (`content`).
    pub fn parse(field: &str, input: ContentInput) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let content = match input {
            ContentInput::Missing => {
                v.add(field, "is required: set text or button_template");
                None
            }
            ContentInput::Text(text) => {
                length(&mut v, &format!("{field}.text"), &text, TEXT_MAX_CHARS);
                Some(StoryContent::Text(text))
            }
            ContentInput::ButtonTemplate { text, buttons } => {
                let base = format!("{field}.button_template");
                length(
                    &mut v,
                    &format!("{base}.text"),
                    &text,
                    TEMPLATE_TEXT_MAX_CHARS,
                );
                if buttons.is_empty() || buttons.len() > BUTTONS_MAX {
                    v.add(
                        format!("{base}.buttons"),
                        format!(
                            "must have 1 to {BUTTONS_MAX} buttons, got {}",
                            buttons.len()
                        ),
                    );
                }
                let parsed: Vec<Option<Button>> = buttons
                    .into_iter()
                    .enumerate()
                    .map(|(i, button)| {
                        parse_button(&mut v, &format!("{base}.buttons[{i}]"), button)
                    })
                    .collect();
                parsed
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .map(|buttons| StoryContent::ButtonTemplate { text, buttons })
            }
        };
        v.finish(|| content)
    }

    /// The Graph `message` object.
    pub fn to_graph_message(&self) -> Value {
        match self {
            StoryContent::Text(text) => json!({ "text": text }),
            StoryContent::ButtonTemplate { text, buttons } => {
                let buttons: Vec<Value> = buttons
                    .iter()
                    .map(|button| match button {
                        Button::WebUrl { title, url } => {
                            json!({"type": "web_url", "title": title, "url": url})
                        }
                        Button::Postback { title, payload } => {
                            json!({"type": "postback", "title": title, "payload": payload})
                        }
                        Button::PhoneNumber { title, number } => {
                            json!({"type": "phone_number", "title": title, "payload": number})
                        }
                    })
                    .collect();
                json!({"attachment": {"type": "template", "payload": {
                    "template_type": "button", "text": text, "buttons": buttons}}})
            }
        }
    }

    /// Reads back content stored as its Graph message (only this type writes it).
    pub fn from_graph_message(message: &Value) -> Option<Self> {
        if let Some(text) = message.get("text").and_then(Value::as_str) {
            return Some(StoryContent::Text(text.to_string()));
        }
        let payload = message.get("attachment")?.get("payload")?;
        let text = payload.get("text")?.as_str()?.to_string();
        let buttons = payload
            .get("buttons")?
            .as_array()?
            .iter()
            .map(|b| {
                let field = |name: &str| b.get(name).and_then(Value::as_str).map(str::to_string);
                let title = field("title")?;
                Some(match b.get("type")?.as_str()? {
                    "web_url" => Button::WebUrl {
                        title,
                        url: field("url")?,
                    },
                    "postback" => Button::Postback {
                        title,
                        payload: field("payload")?,
                    },
                    "phone_number" => Button::PhoneNumber {
                        title,
                        number: field("payload")?,
                    },
                    _ => return None,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(StoryContent::ButtonTemplate { text, buttons })
    }
}

fn parse_button(v: &mut Violations, path: &str, button: ButtonInput) -> Option<Button> {
    length(
        v,
        &format!("{path}.title"),
        &button.title,
        BUTTON_TITLE_MAX_CHARS,
    );
    let title = button.title;
    match button.kind {
        None => {
            v.add(format!("{path}.type"), "is required: BUTTON_TYPE_WEB_URL, BUTTON_TYPE_POSTBACK or BUTTON_TYPE_PHONE_NUMBER");
            None
        }
        Some(ButtonKind::WebUrl) => {
            if !is_web_url(&button.url) {
                v.add(
                    format!("{path}.url"),
                    "must be an absolute http or https URL",
                );
            }
            if !button.payload.is_empty() {
                v.add(
                    format!("{path}.payload"),
                    "must be empty for a web_url button (the url is what it opens)",
                );
            }
            Some(Button::WebUrl {
                title,
                url: button.url,
            })
        }
        Some(ButtonKind::Postback) => {
            length(
                v,
                &format!("{path}.payload"),
                &button.payload,
                POSTBACK_PAYLOAD_MAX_CHARS,
            );
            if !button.url.is_empty() {
                v.add(format!("{path}.url"), "must be empty for a postback button");
            }
            Some(Button::Postback {
                title,
                payload: button.payload,
            })
        }
        Some(ButtonKind::PhoneNumber) => {
            if !is_phone_number(&button.payload) {
                v.add(
                    format!("{path}.payload"),
                    "must be a phone number: + then 7 to 15 digits, e.g. +15105551234",
                );
            }
            if !button.url.is_empty() {
                v.add(
                    format!("{path}.url"),
                    "must be empty for a phone_number button",
                );
            }
            Some(Button::PhoneNumber {
                title,
                number: button.payload,
            })
        }
    }
}

/// The SHA-256 (hex) of a Graph message as stored: what a review vouches for.
pub fn content_hash(message_json: &str) -> String {
    hex::encode(Sha256::digest(message_json.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn button(kind: ButtonKind, title: &str, url: &str, payload: &str) -> ButtonInput {
        ButtonInput {
            kind: Some(kind),
            title: title.into(),
            url: url.into(),
            payload: payload.into(),
        }
    }

    fn fields(result: Result<StoryContent, Violations>) -> Vec<String> {
        result.unwrap_err().0.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn text_limits_count_characters() {
        assert!(StoryContent::parse("content", ContentInput::Text("🎉".repeat(2000))).is_ok());
        assert_eq!(
            fields(StoryContent::parse(
                "content",
                ContentInput::Text("é".repeat(2001))
            )),
            ["content.text"]
        );
        assert_eq!(
            fields(StoryContent::parse(
                "content",
                ContentInput::Text(String::new())
            )),
            ["content.text"]
        );
        assert_eq!(
            fields(StoryContent::parse("content", ContentInput::Missing)),
            ["content"]
        );
    }

    #[test]
    fn every_button_rule_is_reported_with_its_path() {
        let input = ContentInput::ButtonTemplate {
            text: "x".repeat(641),
            buttons: vec![
                button(ButtonKind::WebUrl, "Go", "ftp://x", ""),
                button(ButtonKind::Postback, &"t".repeat(21), "", ""),
                button(ButtonKind::PhoneNumber, "Call", "", "5551234"),
                ButtonInput {
                    kind: None,
                    title: "x".into(),
                    ..Default::default()
                },
            ],
        };
        assert_eq!(
            fields(StoryContent::parse("content", input)),
            [
                "content.button_template.text",
                "content.button_template.buttons",
                "content.button_template.buttons[0].url",
                "content.button_template.buttons[1].title",
                "content.button_template.buttons[1].payload",
                "content.button_template.buttons[2].payload",
                "content.button_template.buttons[3].type",
            ]
        );
    }

    #[test]
    fn graph_form_round_trips_and_hashes_stably() {
        let content = StoryContent::parse(
            "content",
            ContentInput::ButtonTemplate {
                text: "Tickets!".into(),
                buttons: vec![
                    button(ButtonKind::WebUrl, "Buy", "https://example.com/t", ""),
                    button(ButtonKind::Postback, "Later", "", "LATER"),
                    button(ButtonKind::PhoneNumber, "Call", "", "+15105551234"),
                ],
            },
        )
        .unwrap();
        let message = content.to_graph_message();
        assert_eq!(
            StoryContent::from_graph_message(&message),
            Some(content.clone())
        );
        let stored = message.to_string();
        assert_eq!(
            content_hash(&stored),
            content_hash(&content.to_graph_message().to_string())
        );
        assert_ne!(
            content_hash(&stored),
            content_hash(&json!({"text": "Tickets!"}).to_string())
        );
    }
}
