use std::fmt;

use secrecy::{ExposeSecret, SecretString};

use super::{Violations, char_len};

/// Facebook page ids are decimal numbers of about 15-17 digits; 32 leaves room without allowing
/// unbounded keys.
const PAGE_ID_MAX_DIGITS: usize = 32;
const PAGE_NAME_MAX_CHARS: usize = 200;
/// Page access tokens are a few hundred characters; this bounds what is stored.
const SECRET_MAX_CHARS: usize = 4096;
pub const DEFAULT_SEND_RATE: u32 = 40;
/// The Send API's limit per page for text and templates.
pub const MAX_SEND_RATE: u32 = 300;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(String);

impl PageId {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("is required".into());
        }
        if raw.len() > PAGE_ID_MAX_DIGITS || !raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "must be digits only (at most {PAGE_ID_MAX_DIGITS}), got '{}'",
                truncate_for_message(raw)
            ));
        }
        Ok(PageId(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For values read back from the database, which only ever holds parsed ids.
    pub fn from_trusted(raw: String) -> Self {
        PageId(raw)
    }
}

impl fmt::Display for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageName(String);

impl PageName {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.trim().is_empty() {
            return Err("must not be empty".into());
        }
        let len = char_len(raw);
        if len > PAGE_NAME_MAX_CHARS {
            return Err(format!(
                "must be at most {PAGE_NAME_MAX_CHARS} characters, got {len}"
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(PageName(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendRate(u32);

impl SendRate {
    pub fn parse(raw: u32) -> Result<Self, String> {
        if (1..=MAX_SEND_RATE).contains(&raw) {
            Ok(SendRate(raw))
        } else {
            Err(format!("must be from 1 to {MAX_SEND_RATE}, got {raw}"))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for SendRate {
    fn default() -> Self {
        SendRate(DEFAULT_SEND_RATE)
    }
}

/// A page secret (access token, app secret, verify token). Its Debug never shows the value.
#[derive(Clone, Debug)]
pub struct PageSecret(SecretString);

impl PageSecret {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("must not be empty".into());
        }
        if raw.trim() != raw || raw.chars().any(char::is_control) {
            return Err("must not have surrounding whitespace or control characters".into());
        }
        let len = char_len(raw);
        if len > SECRET_MAX_CHARS {
            return Err(format!(
                "must be at most {SECRET_MAX_CHARS} characters, got {len}"
            ));
        }
        Ok(PageSecret(SecretString::from(raw.to_string())))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

/// A page to create, every field parsed.
#[derive(Clone, Debug)]
pub struct NewPage {
    pub id: PageId,
    pub name: PageName,
    pub access_token: PageSecret,
    pub app_secret: PageSecret,
    pub verify_token: Option<PageSecret>,
    pub send_rate: SendRate,
}

impl NewPage {
    pub fn parse(
        page_id: &str,
        name: &str,
        access_token: &str,
        app_secret: &str,
        verify_token: &str,
        send_rate_per_second: Option<u32>,
    ) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let id = v.check("page_id", PageId::parse(page_id));
        let name = v.check("name", PageName::parse(name));
        let access_token = v.check("access_token", PageSecret::parse(access_token));
        let app_secret = v.check("app_secret", PageSecret::parse(app_secret));
        // The verify token is optional: a page fed by a gateway (RecordOptIn) needs no webhook.
        let verify_token = if verify_token.is_empty() {
            Some(None)
        } else {
            v.check("verify_token", PageSecret::parse(verify_token).map(Some))
        };
        let send_rate = match send_rate_per_second {
            None => Some(SendRate::default()),
            Some(raw) => v.check("send_rate_per_second", SendRate::parse(raw)),
        };
        v.finish(|| {
            Some(NewPage {
                id: id?,
                name: name?,
                access_token: access_token?,
                app_secret: app_secret?,
                verify_token: verify_token?,
                send_rate: send_rate?,
            })
        })
    }
}

/// The fields an update changes; `None` leaves a field as it is.
#[derive(Clone, Debug)]
pub struct PageChanges {
    pub name: Option<PageName>,
    pub access_token: Option<PageSecret>,
    pub app_secret: Option<PageSecret>,
    /// `Some(None)` removes the verify token.
    pub verify_token: Option<Option<PageSecret>>,
    pub send_rate: Option<SendRate>,
}

impl PageChanges {
    pub fn parse(
        name: Option<&str>,
        access_token: Option<&str>,
        app_secret: Option<&str>,
        verify_token: Option<&str>,
        send_rate_per_second: Option<u32>,
    ) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let name = name.map(|raw| v.check("name", PageName::parse(raw)));
        let access_token = access_token.map(|raw| v.check("access_token", PageSecret::parse(raw)));
        let app_secret = app_secret.map(|raw| v.check("app_secret", PageSecret::parse(raw)));
        let verify_token = verify_token.map(|raw| {
            if raw.is_empty() {
                Some(None)
            } else {
                v.check("verify_token", PageSecret::parse(raw).map(Some))
            }
        });
        let send_rate =
            send_rate_per_second.map(|raw| v.check("send_rate_per_second", SendRate::parse(raw)));
        if name.is_none()
            && access_token.is_none()
            && app_secret.is_none()
            && verify_token.is_none()
            && send_rate.is_none()
        {
            v.add(
                "update",
                "sets no field to change (name, access_token, app_secret, verify_token, send_rate_per_second)",
            );
        }
        // Each present field parsed (its `Option` is `Some`) when there are no violations.
        v.finish(|| {
            Some(PageChanges {
                name: name.map(Option::unwrap),
                access_token: access_token.map(Option::unwrap),
                app_secret: app_secret.map(Option::unwrap),
                verify_token: verify_token.map(Option::unwrap),
                send_rate: send_rate.map(Option::unwrap),
            })
        })
    }
}

/// Echoing a bad value helps the caller, but not at any length.
fn truncate_for_message(raw: &str) -> String {
    const MAX: usize = 40;
    if raw.chars().count() <= MAX {
        raw.to_string()
    } else {
        format!("{}…", raw.chars().take(MAX).collect::<String>())
    }
}

/// A page's secrets, opened: only for the Graph client and the webhook's signature check.
pub struct PageCredentials {
    pub access_token: secrecy::SecretString,
    pub app_secret: secrecy::SecretString,
    pub verify_token: Option<secrecy::SecretString>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_id_is_digits_only() {
        assert!(PageId::parse("1234567890").is_ok());
        for bad in ["", "12a", " 12", "-1", "１２", &"1".repeat(33)] {
            assert!(PageId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn name_limits_count_characters_not_bytes() {
        assert!(PageName::parse(&"é".repeat(200)).is_ok());
        assert!(PageName::parse(&"é".repeat(201)).is_err());
        assert!(PageName::parse("   ").is_err());
        assert!(PageName::parse("a\u{0}b").is_err());
    }

    #[test]
    fn send_rate_bounds() {
        assert!(SendRate::parse(0).is_err());
        assert!(SendRate::parse(1).is_ok());
        assert!(SendRate::parse(300).is_ok());
        assert!(SendRate::parse(301).is_err());
    }

    #[test]
    fn new_page_reports_every_violation() {
        let err = NewPage::parse("x", "", "", "", "", Some(0)).unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "page_id",
                "name",
                "access_token",
                "app_secret",
                "send_rate_per_second"
            ]
        );
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let page = NewPage::parse("1", "n", "tok-SECRET", "app-SECRET", "", None).unwrap();
        assert!(!format!("{page:?}").contains("SECRET"));
        assert_eq!(page.send_rate.get(), DEFAULT_SEND_RATE);
    }

    #[test]
    fn empty_update_is_refused() {
        let err = PageChanges::parse(None, None, None, None, None).unwrap_err();
        assert_eq!(err.0[0].field, "update");
    }
}
