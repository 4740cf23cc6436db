//! The domain's lifecycle states as column values: stored as their names (text), read back
//! through the domain's own parser, so a row with a name the domain does not know is an error
//! rather than a silent default. The schema's CHECK constraints hold the same lists.

use sea_orm::{
    ColIdx, DbErr, QueryResult, TryGetError, TryGetable, Value,
    sea_query::{ArrayType, ColumnType, Nullable, ValueType, ValueTypeErr},
};

use crate::domain::{DeliveryState, OptInState, Route, SendState, TokenKind};

macro_rules! stored_as_text {
    ($($ty:ident),+ $(,)?) => {$(
        impl From<$ty> for Value {
            fn from(value: $ty) -> Self {
                value.as_str().into()
            }
        }

        impl TryGetable for $ty {
            fn try_get_by<I: ColIdx>(res: &QueryResult, index: I) -> Result<Self, TryGetError> {
                let text = String::try_get_by(res, index)?;
                $ty::parse(&text).ok_or_else(|| {
                    TryGetError::DbErr(DbErr::Type(format!(
                        "'{text}' is not a {}", stringify!($ty)
                    )))
                })
            }
        }

        impl ValueType for $ty {
            fn try_from(value: Value) -> Result<Self, ValueTypeErr> {
                let text = <String as ValueType>::try_from(value)?;
                $ty::parse(&text).ok_or(ValueTypeErr)
            }

            fn type_name() -> String {
                stringify!($ty).to_owned()
            }

            fn array_type() -> ArrayType {
                <String as ValueType>::array_type()
            }

            fn column_type() -> ColumnType {
                <String as ValueType>::column_type()
            }
        }

        impl Nullable for $ty {
            fn null() -> Value {
                <String as Nullable>::null()
            }
        }

        impl sea_orm::IntoActiveValue<$ty> for $ty {
            fn into_active_value(self) -> sea_orm::ActiveValue<$ty> {
                sea_orm::ActiveValue::Set(self)
            }
        }
    )+};
}

stored_as_text!(SendState, DeliveryState, Route, OptInState, TokenKind);

/// `'a', 'b', …`: the quoted names of `states`, for a CHECK constraint or an `IN` list that is
/// part of a statement's fixed text.
pub fn quoted<T: Copy>(states: &[T], name: impl Fn(T) -> &'static str) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", name(*s)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use sea_orm::{FromQueryResult, Statement};

    use super::*;
    use crate::store::testing::store_tests;

    #[test]
    fn quoted_names_are_listed_in_the_order_given() {
        let states = [SendState::Queued, SendState::Running];
        assert_eq!(quoted(&states, SendState::as_str), "'queued', 'running'");
        assert_eq!(quoted::<SendState>(&[], SendState::as_str), "");
    }

    #[test]
    fn a_state_is_stored_as_its_name_and_read_back_by_it() {
        assert_eq!(
            Value::from(DeliveryState::InFlight),
            Value::from("in_flight")
        );
        assert_eq!(
            <OptInState as ValueType>::try_from(Value::from("reserved")).ok(),
            Some(OptInState::Reserved)
        );
        assert_eq!(
            <Route as ValueType>::try_from(Value::from("window")).ok(),
            Some(Route::Window)
        );
    }

    /// A name the domain does not know is an error, never a silent default.
    #[test]
    fn a_name_the_domain_does_not_know_is_refused() {
        assert!(<SendState as ValueType>::try_from(Value::from("finished")).is_err());
        assert!(<DeliveryState as ValueType>::try_from(Value::from(3_i64)).is_err());
    }

    #[derive(Debug, FromQueryResult)]
    struct Row {
        state: SendState,
    }

    store_tests! {
        async fn a_row_read_back_with_an_unknown_state_fails_with_the_name(t) {
            let read = |text: &str| {
                let sql = format!("SELECT '{text}' AS state");
                Row::find_by_statement(Statement::from_string(t.backend(), sql)).one(t.db())
            };
            assert_eq!(
                read("paused").await.unwrap().unwrap().state,
                SendState::Paused
            );
            let err = read("finished").await.unwrap_err();
            assert!(
                err.to_string().contains("'finished' is not a SendState"),
                "{err}"
            );
        }
    }
}
