use prost_types::Timestamp;

/// A stored time (epoch milliseconds) as a protobuf Timestamp.
pub fn timestamp_from_ms(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}
