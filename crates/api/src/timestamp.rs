//! Timestamps in responses: the text chrono's own `Serialize` writes (RFC 3339, `Z`, the fewest fractional digits
//! that keep the value exact), formatted once into a string and then written as one JSON string. Through serde,
//! chrono hands serde_json its text a piece at a time, each piece escaped on its own: about a twentieth of the
//! api's CPU on a page of 50 orders.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::Serializer;

/// For `#[serde(serialize_with = "crate::timestamp::serialize")]`.
pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// Appends what [`serialize`] writes between the quotes, without formatting machinery or a string of its own:
/// `YYYY-MM-DDTHH:MM:SS`, then `.` and 3, 6 or 9 digits unless the fraction is 0, then `Z`. Years outside
/// 0..=9999 and leap seconds go through chrono.
pub fn write(out: &mut Vec<u8>, at: DateTime<Utc>) {
    let (date, time) = (at.date_naive(), at.time());
    let nanos = time.nanosecond();
    let Ok(year) = u32::try_from(date.year()) else {
        out.extend_from_slice(at.to_rfc3339_opts(SecondsFormat::AutoSi, true).as_bytes());
        return;
    };
    if year > 9999 || nanos >= 1_000_000_000 {
        out.extend_from_slice(at.to_rfc3339_opts(SecondsFormat::AutoSi, true).as_bytes());
        return;
    }
    digits(out, year, 4);
    out.push(b'-');
    digits(out, date.month(), 2);
    out.push(b'-');
    digits(out, date.day(), 2);
    out.push(b'T');
    digits(out, time.hour(), 2);
    out.push(b':');
    digits(out, time.minute(), 2);
    out.push(b':');
    digits(out, time.second(), 2);
    if nanos != 0 {
        out.push(b'.');
        if nanos % 1_000_000 == 0 {
            digits(out, nanos / 1_000_000, 3);
        } else if nanos % 1_000 == 0 {
            digits(out, nanos / 1_000, 6);
        } else {
            digits(out, nanos, 9);
        }
    }
    out.push(b'Z');
}

/// `value` in `width` decimal digits, zero-padded (`value` has at most `width` digits).
fn digits(out: &mut Vec<u8>, mut value: u32, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// For `#[serde(serialize_with = "crate::timestamp::serialize_option")]`: [`serialize`], or `null`.
pub fn serialize_option<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serialize(at, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    #[derive(serde::Serialize)]
    struct Fast(#[serde(serialize_with = "super::serialize")] chrono::DateTime<Utc>);

    #[test]
    fn write_appends_what_serialize_writes() {
        let base = Utc.with_ymd_and_hms(2026, 1, 5, 3, 4, 9).unwrap();
        let mut times: Vec<_> = [
            0,
            1_000_000,
            438_929_000,
            438_000_000,
            1,
            999_999_999,
            120_000,
        ]
        .into_iter()
        .map(|nanos| base + chrono::Duration::nanoseconds(nanos))
        .collect();
        times.push(Utc.with_ymd_and_hms(1, 12, 31, 23, 59, 59).unwrap());
        times.push(Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap());
        times.push(Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap());
        for at in times {
            let mut out = b"\"".to_vec();
            super::write(&mut out, at);
            out.push(b'"');
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&Fast(at)).unwrap(),
                "{at:?}"
            );
        }
    }

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
