//! Domain types: each is parsed once at the edge, so every value past that point is valid ("parse, don't
//! validate"). Their fields are private; the only way in is `parse`.

mod email;
mod order;
mod role;
mod user;

pub use email::Email;
pub use order::{Amount, IdempotencyKey, Order, OrderId, OrderStatus, ProductName};
pub use role::Role;
pub use user::{User, UserId, UserName};

/// Why a value was refused, in words a client can act on.
///
/// `kind` is a short machine-readable tag in the style of pydantic's error types (`string_too_short`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    /// Machine-readable error type, e.g. `greater_than`.
    pub kind: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl Invalid {
    pub(crate) fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Checks the length in characters of `value` after trimming it, and returns the trimmed text.
pub(crate) fn trimmed_text(value: &str, min: usize, max: usize) -> Result<String, Invalid> {
    let trimmed = value.trim();
    // PostgreSQL text cannot hold NUL, and no name needs a control character.
    if trimmed.chars().any(char::is_control) {
        return Err(Invalid::new(
            "string_pattern_mismatch",
            "String should not contain control characters",
        ));
    }
    let len = trimmed.chars().count();
    if len < min {
        Err(Invalid::new(
            "string_too_short",
            format!(
                "String should have at least {min} character{} after trimming",
                plural(min)
            ),
        ))
    } else if len > max {
        Err(Invalid::new(
            "string_too_long",
            format!("String should have at most {max} character{}", plural(max)),
        ))
    } else {
        Ok(trimmed.to_owned())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_trimmed_and_measured_in_characters() {
        assert_eq!(trimmed_text("  héllo ", 1, 5).unwrap(), "héllo");
        assert_eq!(
            trimmed_text("   ", 1, 5).unwrap_err().kind,
            "string_too_short"
        );
        assert_eq!(
            trimmed_text("abcdef", 1, 5).unwrap_err().kind,
            "string_too_long"
        );
    }

    #[test]
    fn control_characters_are_refused() {
        for bad in ["a\u{0}b", "tab\there", "bell\u{7}"] {
            assert_eq!(
                trimmed_text(bad, 1, 50).unwrap_err().kind,
                "string_pattern_mismatch",
                "{bad:?}"
            );
        }
    }
}
