use std::str::FromStr;

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

    /// Parses a number as it arrived in JSON (a double). JSON parsers hand us the nearest double to the literal;
    /// its shortest round-trip text is the literal itself for every amount with at most 2 decimal places and
    /// at most 12 significant digits, so `1.005` is seen as three decimal places, not as `1.00499999…`.
    pub fn parse_f64(value: f64) -> Result<Self, Invalid> {
        if !value.is_finite() {
            return Err(Invalid::new(
                "finite_number",
                "Input should be a finite number",
            ));
        }
        if value > 1e10 {
            return Self::parse(Self::MAX + Decimal::ONE);
        }
        if value < -1e10 {
            return Self::parse(Decimal::NEGATIVE_ONE);
        }
        let decimal = Decimal::from_str(&value.to_string())
            .or_else(|_| Decimal::from_scientific(&format!("{value:e}")))
            .map_err(|_| Invalid::new("decimal_parsing", "Input should be a valid decimal"))?;
        Self::parse(decimal)
    }

    /// The exact value.
    pub fn value(self) -> Decimal {
        self.0
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

    #[test]
    fn amounts_keep_two_decimal_places_exactly() {
        assert_eq!(Amount::parse_f64(12.5).unwrap().value().to_string(), "12.5");
        assert_eq!(Amount::parse_f64(0.01).unwrap().value().to_string(), "0.01");
        assert_eq!(Amount::parse_f64(1e9).unwrap().value(), Amount::MAX);
        assert_eq!(
            Amount::parse_f64(999_999_999.99)
                .unwrap()
                .value()
                .to_string(),
            "999999999.99"
        );
    }

    #[test]
    fn out_of_range_or_too_precise_amounts_are_refused() {
        assert_eq!(Amount::parse_f64(0.0).unwrap_err().kind, "greater_than");
        assert_eq!(Amount::parse_f64(-1.0).unwrap_err().kind, "greater_than");
        assert_eq!(
            Amount::parse_f64(1.005).unwrap_err().kind,
            "decimal_max_places"
        );
        assert_eq!(
            Amount::parse_f64(0.001).unwrap_err().kind,
            "decimal_max_places"
        );
        assert_eq!(
            Amount::parse_f64(1e9 + 0.01).unwrap_err().kind,
            "less_than_equal"
        );
        assert_eq!(
            Amount::parse_f64(1e300).unwrap_err().kind,
            "less_than_equal"
        );
        assert!(Amount::parse_f64(1e-300).is_err());
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
