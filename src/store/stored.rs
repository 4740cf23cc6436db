//! The domain's lifecycle states as column values: stored as their names (text), read back
//! through the domain's own parser, so a row with a name the domain does not know is an error
//! rather than a silent default. The schema's CHECK constraints hold the same lists.

use sea_orm::{
    ColIdx, DbErr, QueryResult, TryGetError, TryGetable, Value,
    sea_query::{ArrayType, ColumnType, Nullable, ValueType, ValueTypeErr},
};

use crate::domain::{DeliveryState, OptInState, Route, SendState};

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

stored_as_text!(SendState, DeliveryState, Route, OptInState);

/// `'a', 'b', …`: the quoted names of `states`, for a CHECK constraint or an `IN` list that is
/// part of a statement's fixed text.
pub fn quoted<T: Copy>(states: &[T], name: impl Fn(T) -> &'static str) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", name(*s)))
        .collect::<Vec<_>>()
        .join(", ")
}
