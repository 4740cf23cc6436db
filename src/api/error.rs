//! The one mapping of a use case's error to a gRPC status.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::{
    domain::Violations,
    engine::EngineError,
    graph::{Class, Failure},
    service::ServiceError,
};

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        match err {
            ServiceError::Invalid(violations) => invalid_argument(&violations),
            // These messages may quote what the request named (an id of any length).
            ServiceError::NotFound(message) => Status::not_found(clip(&message, MAX_MESSAGE_CHARS)),
            ServiceError::AlreadyExists(message) => {
                Status::already_exists(clip(&message, MAX_MESSAGE_CHARS))
            }
            ServiceError::FailedPrecondition(message) => {
                Status::failed_precondition(clip(&message, MAX_MESSAGE_CHARS))
            }
            ServiceError::ResourceExhausted(message) => {
                Status::resource_exhausted(clip(&message, MAX_MESSAGE_CHARS))
            }
            ServiceError::Unavailable(message) => {
                Status::unavailable(clip(&message, MAX_MESSAGE_CHARS))
            }
            ServiceError::Engine(err @ EngineError::Busy) => {
                Status::resource_exhausted(err.to_string())
            }
            ServiceError::Engine(err @ EngineError::Timeout) => {
                Status::deadline_exceeded(err.to_string())
            }
            ServiceError::Engine(err @ EngineError::Stopped) => {
                Status::unavailable(err.to_string())
            }
            ServiceError::Engine(EngineError::Store(err)) => {
                tracing::error!(error = ?err, "request failed in the engine");
                Status::internal("internal error; the cause is in otnd's log")
            }
            ServiceError::Graph(failure) => graph_status(&failure),
            ServiceError::Internal(cause) => {
                tracing::error!(error = ?cause, "request failed");
                Status::internal("internal error; the cause is in otnd's log")
            }
        }
    }
}

/// A status's message and details travel in HTTP/2 headers, which clients cap (hyper's at 16 KiB,
/// past which the answer is lost and the connection with it). So a message is clipped, and a
/// request that breaks thousands of rules (a template with 2,000 buttons) is answered with the
/// first few, each clipped, as many as fit a budget of bytes, and a count of the rest.
const MAX_MESSAGE_CHARS: usize = 500;
const MAX_VIOLATIONS_LISTED: usize = 10;
const MAX_VIOLATION_BYTES: usize = 2000;
const MAX_FIELD_CHARS: usize = 100;
const MAX_DESCRIPTION_CHARS: usize = 120;

fn clip(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

fn invalid_argument(violations: &Violations) -> Status {
    let mut listed: Vec<FieldViolation> = Vec::new();
    let mut bytes = 0;
    for v in violations.0.iter().take(MAX_VIOLATIONS_LISTED) {
        let field = clip(&v.field, MAX_FIELD_CHARS);
        let description = clip(&v.description, MAX_DESCRIPTION_CHARS);
        bytes += field.len() + description.len();
        if !listed.is_empty() && bytes > MAX_VIOLATION_BYTES {
            break;
        }
        listed.push(FieldViolation::new(field, description));
    }
    let mut message = listed
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    let unlisted = violations.0.len() - listed.len();
    if unlisted > 0 {
        message.push_str(&format!("; and {unlisted} more"));
    }
    Status::with_error_details(
        Code::InvalidArgument,
        message,
        ErrorDetails::with_bad_request(listed),
    )
}

/// A Graph refusal as the gRPC code a caller can act on, with Facebook's own words.
fn graph_status(failure: &Failure) -> Status {
    let facebook = clip(&format!("Facebook: {failure}"), MAX_MESSAGE_CHARS);
    let error = &failure.error;
    match (failure.class, error.code, error.subcode) {
        (Class::RecipientPermanent, 10, Some(2018278)) => Status::failed_precondition(format!(
            "the user is outside the 24-hour messaging window: they must message the page first ({facebook})"
        )),
        (Class::RecipientPermanent, 613, Some(1893016)) => Status::already_exists(format!(
            "an opt-in request for this topic was already sent to this user ({facebook})"
        )),
        (Class::RecipientPermanent, 9, Some(2018352)) => Status::failed_precondition(format!(
            "Facebook takes one recurring opt-in request per title per user per week: send it \
             later or with another title ({facebook})"
        )),
        (Class::RecipientPermanent, 100, Some(2018001)) => {
            Status::not_found(format!("the page has no such user ({facebook})"))
        }
        (Class::RecipientPermanent, _, _) => Status::failed_precondition(format!(
            "Facebook refused to message this user ({facebook})"
        )),
        (Class::PagePermanent, _, _) => Status::failed_precondition(format!(
            "the page cannot send: fix its access token or permissions (UpdatePage) or wait out the restriction ({facebook})"
        )),
        (Class::Throttled { regain }, _, _) => Status::resource_exhausted(format!(
            "Facebook is rate limiting this page; retry in {} s ({facebook})",
            regain
                .unwrap_or(crate::graph::classify::DEFAULT_THROTTLE_WAIT)
                .as_secs()
                .max(1)
        )),
        (Class::Transient { .. }, _, _) => {
            Status::unavailable(format!("the Graph API failed; retry ({facebook})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the status costs in response headers, as hyper's client counts them (name, value
    /// and 32 bytes per header).
    fn header_bytes(status: Status) -> usize {
        status
            .into_http::<()>()
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum()
    }

    #[test]
    fn thousands_of_violations_and_long_messages_fit_a_clients_header_limit() {
        let mut violations = Violations::new();
        for i in 0..5000 {
            violations.add(
                format!("content.button_template.buttons[{i}].title"),
                format!("must be at most 20 characters, got '{}'", "é🎉".repeat(500)),
            );
        }
        let status = Status::from(ServiceError::Invalid(violations));
        let fields = status.get_details_bad_request().unwrap().field_violations;
        assert!((1..=MAX_VIOLATIONS_LISTED).contains(&fields.len()));
        assert_eq!(fields[0].field, "content.button_template.buttons[0].title");
        let more = format!("; and {} more", 5000 - fields.len());
        assert!(status.message().ends_with(&more), "{}", status.message());
        assert!(header_bytes(status) < 16 * 1024);

        let long_id = "\u{1F389}".repeat(1_000_000);
        let status = Status::from(ServiceError::NotFound(format!(
            "story {long_id} does not exist"
        )));
        assert_eq!(status.code(), Code::NotFound);
        assert!(header_bytes(status) < 16 * 1024);
    }

    #[test]
    fn a_few_violations_are_listed_whole() {
        let mut violations = Violations::new();
        violations.add("page_id", "is required");
        violations.add("name", "must be at most 200 characters, got 201");
        let status = Status::from(ServiceError::Invalid(violations.clone()));
        assert_eq!(status.message(), violations.summary());
        assert_eq!(
            status
                .get_details_bad_request()
                .unwrap()
                .field_violations
                .len(),
            2
        );
    }
}
