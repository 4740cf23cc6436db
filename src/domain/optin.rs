//! An opt-in's life: the token Facebook gave for one user and topic, from its arrival to its use.
//! An opt-in follows the delivery it is reserved for: sent or maybe sent, the token is spent;
//! refused for good, rejected; ended before any attempt could land, released for a later send.
//!
//! ```text
//! active   --reserve--> reserved    a delivery of a send is to use it
//! reserved --release--> active      its delivery ended before any attempt could land
//! reserved --spend----> used        its delivery was sent, or may have been
//! reserved --reject---> rejected    Facebook refused the token for good
//! active   --lapse----> expired     its year ran out (or will before it can be presented)
//! reserved --lapse----> expired
//! ```
//!
//! A recurring token (`notification_messages_token`) is a subscription, not a single use: it is
//! never reserved or spent, and stays `active` after each message. Its user can stop and resume
//! it, and Facebook can refuse it for good:
//!
//! ```text
//! active   --stop-------> stopped   the user stopped notifications on the topic
//! stopped  --resume-----> active    the user resumed them
//! active   --invalidate-> rejected  Facebook refused the token for good (code 100)
//! stopped  --lapse------> expired
//! ```
//!
//! Besides its stored state, an `active` opt-in whose `expires_at` has passed reads as `expired`.

use super::lifecycle::lifecycle;

lifecycle! {
    "opt-in",
    /// Where one token is in its life.
    enum OptInState {
        Active = "active",
        Reserved = "reserved",
        Used = "used",
        Rejected = "rejected",
        Expired = "expired",
        Stopped = "stopped",
    }
    /// What happens to an opt-in.
    enum OptInEvent {
        Reserve = "reserve",
        Release = "release",
        Spend = "spend",
        Reject = "reject",
        Lapse = "lapse",
        Stop = "stop",
        Resume = "resume",
        Invalidate = "invalidate",
    }
    table {
        Active --Reserve--> Reserved,
        Reserved --Release--> Active,
        Reserved --Spend--> Used,
        Reserved --Reject--> Rejected,
        Active --Lapse--> Expired,
        Reserved --Lapse--> Expired,
        Stopped --Lapse--> Expired,
        Active --Stop--> Stopped,
        Stopped --Resume--> Active,
        Active --Invalidate--> Rejected,
    }
}

/// Which kind of token an opt-in holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenKind {
    /// `one_time_notif_token`: one message, within a year of the opt-in.
    OneTime,
    /// `notification_messages_token`: a subscription, one message per cooldown, until the
    /// user stops it (or it expires, for tokens that carry an expiry).
    Recurring,
}

impl TokenKind {
    pub const ALL: &'static [TokenKind] = &[TokenKind::OneTime, TokenKind::Recurring];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::OneTime => "one_time",
            TokenKind::Recurring => "recurring",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "one_time" => Some(TokenKind::OneTime),
            "recurring" => Some(TokenKind::Recurring),
            _ => None,
        }
    }

    /// Stored as a comma-separated list; '' is every kind.
    pub fn join(kinds: &[TokenKind]) -> String {
        if kinds.is_empty() || TokenKind::ALL.iter().all(|k| kinds.contains(k)) {
            return String::new();
        }
        let mut kinds = kinds.to_vec();
        kinds.sort();
        kinds.dedup();
        kinds
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The kinds a stored list names; '' (and anything unreadable) is every kind.
    pub fn split(stored: &str) -> Vec<TokenKind> {
        let kinds: Vec<TokenKind> = stored.split(',').filter_map(TokenKind::parse).collect();
        if kinds.is_empty() {
            TokenKind::ALL.to_vec()
        } else {
            kinds
        }
    }
}

impl std::fmt::Display for TokenKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A recurring token with no `token_expiry_timestamp` never expires (Facebook's tokens issued
/// since August 2023): it is stored with this expiry, so that every "still valid" comparison
/// holds without a special case, and is shown as having none.
pub const NEVER_EXPIRES_MS: i64 = i64::MAX;

impl OptInState {
    /// The state a stored row reads as at `now`: an active token past its expiry is expired.
    pub fn effective(self, expires_at: i64, now: i64) -> Self {
        match self {
            OptInState::Active if expires_at <= now => OptInState::Expired,
            state => state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_opt_in_transition_is_the_table() {
        use OptInEvent::*;
        use OptInState::*;
        let expected = |from: OptInState, event: OptInEvent| -> Option<OptInState> {
            match (from, event) {
                (Active, Reserve) => Some(Reserved),
                (Reserved, Release) => Some(Active),
                (Reserved, Spend) => Some(Used),
                (Reserved, Reject) => Some(Rejected),
                (Active | Reserved | Stopped, Lapse) => Some(Expired),
                (Active, Stop) => Some(Stopped),
                (Stopped, Resume) => Some(Active),
                (Active, Invalidate) => Some(Rejected),
                _ => None,
            }
        };
        for from in OptInState::ALL {
            for event in OptInEvent::ALL {
                assert_eq!(
                    from.on(*event).ok(),
                    expected(*from, *event),
                    "{from} --{}-->",
                    event.as_str()
                );
            }
        }
        // A spent, refused or lapsed token never comes back.
        for state in [Used, Rejected, Expired] {
            assert!(state.is_terminal(), "{state}");
        }
    }

    #[test]
    fn an_active_token_past_its_expiry_reads_as_expired() {
        assert_eq!(OptInState::Active.effective(100, 100), OptInState::Expired);
        assert_eq!(OptInState::Active.effective(101, 100), OptInState::Active);
        assert_eq!(OptInState::Used.effective(1, 100), OptInState::Used);
        assert_eq!(
            OptInState::Active.effective(NEVER_EXPIRES_MS, i64::MAX - 1),
            OptInState::Active
        );
    }

    #[test]
    fn token_kinds_are_stored_as_a_list_and_empty_is_every_kind() {
        use TokenKind::*;
        assert_eq!(TokenKind::join(&[]), "");
        assert_eq!(TokenKind::join(&[Recurring, OneTime]), "");
        assert_eq!(TokenKind::join(&[Recurring, Recurring]), "recurring");
        assert_eq!(TokenKind::split(""), [OneTime, Recurring]);
        assert_eq!(TokenKind::split("recurring"), [Recurring]);
        assert_eq!(TokenKind::split("one_time"), [OneTime]);
        for kind in TokenKind::ALL {
            assert_eq!(TokenKind::parse(kind.as_str()), Some(*kind));
        }
    }
}
