//! The machinery of a lifecycle table: a state enum stored as text, its events, and the one
//! table that says where each event takes each state. See `send` and `optin` for the tables.

/// The table's answer to an event it does not list from a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a {kind} cannot {event} from {from}")]
pub struct IllegalTransition {
    pub kind: &'static str,
    pub event: &'static str,
    pub from: &'static str,
}

/// Declares a state enum stored as text, its event enum, and the transition table. The table
/// lists `from --event--> to` rows; a pair it does not list is an [`IllegalTransition`].
macro_rules! lifecycle {
    (
        $kind:literal,
        $(#[$state_doc:meta])* enum $State:ident { $($state:ident = $state_text:literal),+ $(,)? }
        $(#[$event_doc:meta])* enum $Event:ident { $($event:ident = $event_text:literal),+ $(,)? }
        table { $($from:ident --$on:ident--> $to:ident),+ $(,)? }
    ) => {
        $(#[$state_doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $State { $($state),+ }

        impl $State {
            pub const ALL: &'static [$State] = &[$($State::$state),+];

            /// The stored (and logged) name.
            pub fn as_str(self) -> &'static str {
                match self { $($State::$state => $state_text),+ }
            }

            /// The state a stored name stands for.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($state_text => Some($State::$state),)+ _ => None }
            }

            /// Where `event` takes this state, or why it cannot.
            pub fn on(self, event: $Event) -> Result<$State, $crate::domain::IllegalTransition> {
                $(if self == $State::$from && event == $Event::$on {
                    return Ok($State::$to);
                })+
                Err($crate::domain::IllegalTransition { kind: $kind, event: event.as_str(), from: self.as_str() })
            }

            /// Whether no event leads out of this state.
            pub fn is_terminal(self) -> bool {
                $Event::ALL.iter().all(|event| self.on(*event).is_err())
            }
        }

        impl std::fmt::Display for $State {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        $(#[$event_doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $Event { $($event),+ }

        impl $Event {
            pub const ALL: &'static [$Event] = &[$($Event::$event),+];

            pub fn as_str(self) -> &'static str {
                match self { $($Event::$event => $event_text),+ }
            }

            /// The states this event leaves: the `WHERE state IN (…)` of its statement.
            pub fn sources(self) -> Vec<$State> {
                $State::ALL.iter().copied().filter(|s| s.on(self).is_ok()).collect()
            }

            /// The state this event leads to (every event of these tables has one target).
            #[allow(unreachable_patterns)]
            pub fn target(self) -> $State {
                match self {
                    $($Event::$on => $State::$to,)+
                }
            }
        }
    };
}

pub(crate) use lifecycle;
