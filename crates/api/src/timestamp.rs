//! Timestamps in responses: the text chrono's own `Serialize` writes (RFC 3339, `Z`, the fewest fractional digits
//! that keep the value exact), formatted once into a string and then written as one JSON string. Through serde,
//! chrono hands serde_json its text a piece at a time, each piece escaped on its own: about a twentieth of the
//! api's CPU on a page of 50 orders.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serializer;

/// For `#[serde(serialize_with = "crate::timestamp::serialize")]`.
pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    #[derive(serde::Serialize)]
    struct Fast(#[serde(serialize_with = "super::serialize")] chrono::DateTime<Utc>);

    #[test]
    fn writes_what_chrono_writes() {
        let base = Utc.with_ymd_and_hms(2026, 11, 25, 13, 31, 13).unwrap();
        for nanos in [0, 1_000_000, 438_929_000, 438_000_000, 1, 999_999_999] {
            let at = base + chrono::Duration::nanoseconds(nanos);
            assert_eq!(
                serde_json::to_string(&Fast(at)).unwrap(),
                serde_json::to_string(&at).unwrap(),
                "{nanos} ns"
            );
        }
    }
}
