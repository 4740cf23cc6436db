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
    }
    /// What happens to an opt-in.
    enum OptInEvent {
        Reserve = "reserve",
        Release = "release",
        Spend = "spend",
        Reject = "reject",
        Lapse = "lapse",
    }
    table {
        Active --Reserve--> Reserved,
        Reserved --Release--> Active,
        Reserved --Spend--> Used,
        Reserved --Reject--> Rejected,
        Active --Lapse--> Expired,
        Reserved --Lapse--> Expired,
    }
}

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
                (Active | Reserved, Lapse) => Some(Expired),
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
    }
}
