use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Invalid, UserId, trimmed_text};

/// An order's id (UUID v7, so ids sort by creation time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(transparent)]
#[serde(transparent)]
pub struct OrderId(pub Uuid);

impl OrderId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for OrderId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for OrderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where an order is in its life. The only transitions are `PENDING → PROCESSING → COMPLETED` (the worker)
/// and `PENDING → CANCELLED` (the owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[sqlx(type_name = "order_status", rename_all = "SCREAMING_SNAKE_CASE")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Created, waiting for a worker.
    Pending,
    /// A worker holds it.
    Processing,
    /// Done.
    Completed,
    /// Cancelled by its owner while pending.
    Cancelled,
}

impl OrderStatus {
    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Processing => "PROCESSING",
            Self::Completed => "COMPLETED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Whether no change can follow (COMPLETED or CANCELLED).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }
}

/// A product name: 1 to 200 characters after trimming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductName(String);

impl ProductName {
    /// Parses a product name sent by a client.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        trimmed_text(raw, 1, 200).map(Self)
    }

    /// The trimmed name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A money amount: more than 0, at most 1,000,000,000, with at most two decimal places. Held exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(Decimal);

impl Amount {
    /// The largest amount an order may have.
    pub const MAX: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

    /// Parses an exact decimal.
    pub fn parse(value: Decimal) -> Result<Self, Invalid> {
        if value <= Decimal::ZERO {
            return Err(Invalid::new(
                "greater_than",
                "Input should be greater than 0",
            ));
        }
        if value > Self::MAX {
            return Err(Invalid::new(
                "less_than_equal",
                "Input should be less than or equal to 1000000000",
            ));
        }
        if value.normalize().scale() > 2 {
            return Err(Invalid::new(
                "decimal_max_places",
                "Decimal input should have no more than 2 decimal places",
            ));
        }
        Ok(Self(value.normalize()))
    }

    /// Parses the text of a JSON number exactly as the client wrote it (`19.99`, `1999e-2`, `20.000`), with no
    /// detour through a double: `19.999999999999999999` has 18 decimal places and is refused, whereas a double
    /// would have rounded it to 20. Checks, in order: more than 0, at most 1,000,000,000, at most 2 decimal
    /// places (trailing zeros do not count).
    pub fn parse_json_number(text: &str) -> Result<Self, Invalid> {
        let number = JsonNumber::parse(text)
            .ok_or_else(|| Invalid::new("float_type", "Input should be a valid number"))?;
        let Some((digits, exponent)) = number.significant() else {
            return Err(Invalid::new(
                "greater_than",
                "Input should be greater than 0",
            ));
        };
        if number.negative {
            return Err(Invalid::new(
                "greater_than",
                "Input should be greater than 0",
            ));
        }
        // The value is `digits × 10^exponent`, with no trailing zero in `digits`.
        let magnitude = i128::try_from(digits.len())
            .unwrap_or(i128::MAX)
            .saturating_add(exponent);
        if magnitude > 10 {
            // At least 10^10.
            return Self::parse(Self::MAX + Decimal::ONE);
        }
        if exponent < -2 {
            return Err(Invalid::new(
                "decimal_max_places",
                "Decimal input should have no more than 2 decimal places",
            ));
        }
        // At most 12 digits from here on: exact in a Decimal.
        let scale = u32::try_from(-exponent.min(0)).unwrap_or(0);
        let mut mantissa: i64 = digits
            .parse()
            .map_err(|_| Invalid::new("decimal_parsing", "Input should be a valid decimal"))?;
        for _ in 0..exponent.max(0) {
            mantissa *= 10;
        }
        Self::parse(Decimal::new(mantissa, scale))
    }

    /// The exact value.
    pub fn value(self) -> Decimal {
        self.0
    }
}

/// The parts of a JSON number's text (RFC 8259 §6: `-? int frac? exp?`).
struct JsonNumber<'a> {
    negative: bool,
    int: &'a str,
    frac: &'a str,
    exp: &'a str,
}

impl<'a> JsonNumber<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, "0"),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let exp_digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        let well_formed = digits(int)
            && (int == "0" || !int.starts_with('0'))
            && (frac.is_empty() || digits(frac))
            && !mantissa.ends_with('.')
            && digits(exp_digits);
        well_formed.then_some(Self {
            negative,
            int,
            frac,
            exp,
        })
    }

    /// The value as `digits × 10^exponent`, `digits` without leading or trailing zeros; `None` for zero.
    fn significant(&self) -> Option<(String, i128)> {
        let all = format!("{}{}", self.int, self.frac);
        let without_trailing = all.trim_end_matches('0');
        let digits = without_trailing.trim_start_matches('0');
        if digits.is_empty() {
            return None;
        }
        let trailing = all.len() - without_trailing.len();
        // An exponent too long for i128 is far past any bound: saturate.
        let exp: i128 = self.exp.parse().unwrap_or_else(|_| {
            if self.exp.starts_with('-') {
                i128::MIN / 2
            } else {
                i128::MAX / 2
            }
        });
        let exponent = exp - i128::try_from(self.frac.len()).unwrap_or(0)
            + i128::try_from(trailing).unwrap_or(0);
        Some((digits.to_owned(), exponent))
    }
}

/// A client's `Idempotency-Key`: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses the header's value.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        if raw.is_empty() || raw.len() > 255 {
            return Err(Invalid::new(
                "string_length",
                "Idempotency-Key must be 1 to 255 characters long",
            ));
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Invalid::new(
                "string_pattern_mismatch",
                "Idempotency-Key may contain only visible ASCII characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Order {
    /// The order's id.
    pub id: OrderId,
    /// Its owner.
    pub user_id: UserId,
    /// What was ordered.
    pub product_name: String,
    /// How much, exactly.
    pub amount: Decimal,
    /// Where it is in its life.
    pub status: OrderStatus,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its status last changed.
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount(text: &str) -> Result<String, &'static str> {
        Amount::parse_json_number(text)
            .map(|a| a.value().to_string())
            .map_err(|e| e.kind)
    }

    #[test]
    fn amounts_are_read_exactly_as_written() {
        assert_eq!(amount("12.5"), Ok("12.5".into()));
        assert_eq!(amount("0.01"), Ok("0.01".into()));
        assert_eq!(amount("19.990"), Ok("19.99".into()));
        assert_eq!(amount("1999e-2"), Ok("19.99".into()));
        assert_eq!(amount("1.5E+3"), Ok("1500".into()));
        assert_eq!(amount("0.00100e3"), Ok("1".into()));
        assert_eq!(amount("1000000000"), Ok("1000000000".into()));
        assert_eq!(amount("1e9"), Ok("1000000000".into()));
        assert_eq!(amount("999999999.99"), Ok("999999999.99".into()));
        assert_eq!(amount("1000000000.000"), Ok("1000000000".into()));
    }

    #[test]
    fn amounts_too_precise_for_a_double_are_still_refused() {
        // A double rounds each of these to a value with 2 decimal places or fewer.
        for text in [
            "19.999999999999999999",
            "20.000000000000000001",
            "0.1000000000000000000000000000000000001",
            "1.005",
            "0.001",
            "1e-3",
            "123456789.001",
        ] {
            assert_eq!(amount(text), Err("decimal_max_places"), "{text}");
        }
    }

    #[test]
    fn out_of_range_amounts_are_refused() {
        for (text, kind) in [
            ("0", "greater_than"),
            ("0.000", "greater_than"),
            ("-0", "greater_than"),
            ("-1", "greater_than"),
            ("-1e400", "greater_than"),
            ("1000000000.01", "less_than_equal"),
            ("1e10", "less_than_equal"),
            ("1e400", "less_than_equal"),
            (
                "1e99999999999999999999999999999999999999999",
                "less_than_equal",
            ),
            (
                "1e-99999999999999999999999999999999999999999",
                "decimal_max_places",
            ),
        ] {
            assert_eq!(amount(text), Err(kind), "{text}");
        }
    }

    #[test]
    fn anything_but_a_json_number_is_a_type_error() {
        for text in [
            "\"1\"", "null", "true", "[1]", "{}", "01", "1.", ".5", "+1", "1e", "0x10", "NaN",
        ] {
            assert_eq!(amount(text), Err("float_type"), "{text}");
        }
    }

    #[test]
    fn idempotency_keys_are_visible_ascii() {
        assert!(IdempotencyKey::parse("abc-123_X").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse("é").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }
}
