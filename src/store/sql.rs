//! Hand-written SQL, where the query builder cannot say it (aggregates over CASE, grouped
//! subqueries), with parameters bound in each backend's placeholder style.

use sea_orm::{DatabaseBackend, Statement, Value};

pub struct Sql {
    backend: DatabaseBackend,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    pub fn new(backend: DatabaseBackend) -> Self {
        Sql {
            backend,
            text: String::new(),
            values: Vec::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder (`?` on SQLite, `$n` on PostgreSQL) bound to `value`.
    pub fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.values.push(value.into());
        let placeholder = match self.backend {
            DatabaseBackend::Postgres => format!("${}", self.values.len()),
            _ => "?".to_string(),
        };
        self.text.push_str(&placeholder);
        self
    }

    pub fn statement(&self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text.clone(), self.values.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(backend: DatabaseBackend) -> Statement {
        let mut sql = Sql::new(backend);
        sql.push("SELECT * FROM t WHERE a = ")
            .bind(1_i64)
            .push(" AND b = ")
            .bind("two");
        sql.statement()
    }

    #[test]
    fn postgres_placeholders_are_numbered_in_the_order_values_are_bound() {
        let statement = built(DatabaseBackend::Postgres);
        assert_eq!(statement.sql, "SELECT * FROM t WHERE a = $1 AND b = $2");
        assert_eq!(
            statement.values.unwrap().0,
            [Value::from(1_i64), Value::from("two")]
        );
    }

    #[test]
    fn sqlite_placeholders_are_question_marks_bound_in_order() {
        let statement = built(DatabaseBackend::Sqlite);
        assert_eq!(statement.sql, "SELECT * FROM t WHERE a = ? AND b = ?");
        assert_eq!(
            statement.values.unwrap().0,
            [Value::from(1_i64), Value::from("two")]
        );
    }

    /// A statement can be taken more than once (a retried transaction runs it again).
    #[test]
    fn taking_the_statement_leaves_the_builder_as_it_was() {
        let mut sql = Sql::new(DatabaseBackend::Postgres);
        sql.push("SELECT ").bind(1_i64);
        let first = sql.statement();
        sql.push(", ").bind(2_i64);
        assert_eq!(first.sql, "SELECT $1");
        assert_eq!(sql.statement().sql, "SELECT $1, $2");
    }
}
