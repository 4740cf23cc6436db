//! `otnctl story …`.

use otnd::{
    domain::{ButtonInput, ButtonKind, ContentInput, StoryContent},
    pb,
};

use crate::{
    ExitCode, Outcome, check_list,
    cli::{ContentArgs, Output, StoryCommand, TokenKindArg},
    client::Conn,
    id, list_pages,
    output::{self, EstimateRow, StoryRow},
    page_id, psid, topic, usage_error,
};

/// The kinds as the API lists them, each once.
fn kinds(given: &[TokenKindArg]) -> Vec<i32> {
    let mut kinds: Vec<i32> = Vec::new();
    for kind in given {
        let value = pb::TokenKind::from(*kind) as i32;
        if !kinds.contains(&value) {
            kinds.push(value);
        }
    }
    kinds
}

pub async fn run(command: StoryCommand, output: Output, conn: &Conn) -> Outcome {
    match command {
        StoryCommand::Create {
            page,
            topic: story_topic,
            content,
            include_window_users,
            segment,
            token_kinds,
        } => {
            let page_id = page_id(&page);
            let story_topic = topic("--topic", &story_topic);
            let Some(content) = parse_content(&content) else {
                usage_error("the story's content is required: --text, with --button for a template")
            };
            let segment_id = segment.map(|s| id("--segment", &s)).unwrap_or_default();
            let answer = conn
                .stories()
                .await?
                .create_story(pb::CreateStoryRequest {
                    page_id,
                    topic: story_topic,
                    content: Some(content),
                    include_window_users,
                    segment_id,
                    token_kinds: kinds(&token_kinds),
                })
                .await?
                .into_inner();
            warn(&answer.warnings);
            output::one(output, &StoryRow::from(answer.story.unwrap_or_default()));
        }
        StoryCommand::Update {
            story,
            topic: new_topic,
            content,
            include_window_users,
            segment,
            no_segment,
            token_kinds,
            all_token_kinds,
        } => {
            let story_id = id("STORY", &story);
            let new_topic = new_topic.map(|t| topic("--topic", &t));
            let content = parse_content(&content);
            let segment_id = match (segment, no_segment) {
                (Some(segment), _) => Some(id("--segment", &segment)),
                (None, true) => Some(String::new()),
                (None, false) => None,
            };
            let token_kinds =
                (all_token_kinds || !token_kinds.is_empty()).then(|| pb::TokenKinds {
                    kinds: kinds(&token_kinds),
                });
            if new_topic.is_none()
                && content.is_none()
                && include_window_users.is_none()
                && segment_id.is_none()
                && token_kinds.is_none()
            {
                usage_error(
                    "nothing to change: give --topic, --text (and --button), \
                     --include-window-users, --segment, --no-segment, --token-kind or \
                     --all-token-kinds",
                );
            }
            let answer = conn
                .stories()
                .await?
                .update_story(pb::UpdateStoryRequest {
                    story_id,
                    topic: new_topic,
                    content,
                    include_window_users,
                    segment_id,
                    token_kinds,
                })
                .await?
                .into_inner();
            warn(&answer.warnings);
            output::one(output, &StoryRow::from(answer.story.unwrap_or_default()));
        }
        StoryCommand::Get { story } => {
            let story_id = id("STORY", &story);
            let story = conn
                .stories()
                .await?
                .get_story(pb::GetStoryRequest { story_id })
                .await?
                .into_inner()
                .story
                .unwrap_or_default();
            output::one(output, &StoryRow::from(story));
        }
        StoryCommand::List {
            page,
            topic: wanted_topic,
            list,
        } => {
            let page_id = page_id(&page);
            let wanted_topic = wanted_topic
                .map(|t| topic("--topic", &t))
                .unwrap_or_default();
            check_list(&list);
            let client = conn.stories().await?;
            let stories = list_pages(&list, |page_size, page_token| {
                let mut client = client.clone();
                let request = pb::ListStoriesRequest {
                    page_id: page_id.clone(),
                    topic: wanted_topic.clone(),
                    page_size,
                    page_token,
                };
                async move {
                    let answer = client.list_stories(request).await?.into_inner();
                    Ok((answer.stories, answer.next_page_token))
                }
            })
            .await?;
            let rows: Vec<StoryRow> = stories.into_iter().map(StoryRow::from).collect();
            output::many(output, &rows, "stories");
        }
        StoryCommand::Preview { story, reviewer } => {
            let story_id = id("STORY", &story);
            let reviewer_psid = psid("--reviewer", &reviewer);
            let answer = conn
                .stories()
                .await?
                .preview_story(pb::PreviewStoryRequest {
                    story_id,
                    reviewer_psid: reviewer_psid.clone(),
                })
                .await?
                .into_inner();
            eprintln!(
                "previewed to {reviewer_psid} as message {}",
                answer.message_id
            );
            output::one(output, &StoryRow::from(answer.story.unwrap_or_default()));
        }
        StoryCommand::Estimate { story } => {
            let story_id = id("STORY", &story);
            let estimate = conn
                .stories()
                .await?
                .estimate_audience(pb::EstimateAudienceRequest {
                    story_id: story_id.clone(),
                })
                .await?
                .into_inner();
            output::one(
                output,
                &EstimateRow {
                    story_id,
                    token_recipients: estimate.token_recipients,
                    window_recipients: estimate.window_recipients,
                    excluded_expired: estimate.excluded_expired,
                    excluded_by_segment: estimate.excluded_by_segment,
                },
            );
        }
    }
    Ok(ExitCode::Success)
}

fn warn(warnings: &[String]) {
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
}

/// The content the flags describe, checked with otnd's rules; `None` when no content flag was
/// given (an update that leaves the content alone).
fn parse_content(args: &ContentArgs) -> Option<pb::StoryContent> {
    let text = match (&args.text, args.button.is_empty()) {
        (None, true) => return None,
        (None, false) => usage_error("--button needs --text: the template's text"),
        (Some(text), _) => text.clone(),
    };
    let buttons: Vec<(ButtonKind, &str, &str)> = args
        .button
        .chunks(3)
        .enumerate()
        .map(|(i, parts)| {
            let [kind, title, value] = parts else {
                usage_error(format!("--button #{}: expected TYPE TITLE VALUE", i + 1))
            };
            let kind = match kind.as_str() {
                "web-url" | "web_url" | "url" => ButtonKind::WebUrl,
                "postback" => ButtonKind::Postback,
                "phone-number" | "phone_number" | "phone" => ButtonKind::PhoneNumber,
                other => usage_error(format!(
                    "--button #{}: unknown type '{other}'; one of web-url, postback, phone-number",
                    i + 1
                )),
            };
            (kind, title.as_str(), value.as_str())
        })
        .collect();
    let input = if buttons.is_empty() {
        ContentInput::Text(text.clone())
    } else {
        ContentInput::ButtonTemplate {
            text: text.clone(),
            buttons: buttons
                .iter()
                .map(|&(kind, title, value)| {
                    let (url, payload) = match kind {
                        ButtonKind::WebUrl => (value.to_string(), String::new()),
                        _ => (String::new(), value.to_string()),
                    };
                    ButtonInput {
                        kind: Some(kind),
                        title: title.to_string(),
                        url,
                        payload,
                    }
                })
                .collect(),
        }
    };
    if let Err(violations) = StoryContent::parse("content", input) {
        usage_error(format!("--text/--button: {}", violations.summary()));
    }
    let kind = if buttons.is_empty() {
        pb::story_content::Kind::Text(text)
    } else {
        pb::story_content::Kind::ButtonTemplate(pb::ButtonTemplate {
            text,
            buttons: buttons
                .into_iter()
                .map(|(kind, title, value)| {
                    let (r#type, url, payload) = match kind {
                        ButtonKind::WebUrl => (pb::ButtonType::WebUrl, value, ""),
                        ButtonKind::Postback => (pb::ButtonType::Postback, "", value),
                        ButtonKind::PhoneNumber => (pb::ButtonType::PhoneNumber, "", value),
                    };
                    pb::Button {
                        r#type: r#type.into(),
                        title: title.to_string(),
                        url: url.to_string(),
                        payload: payload.to_string(),
                    }
                })
                .collect(),
        })
    };
    Some(pb::StoryContent { kind: Some(kind) })
}
