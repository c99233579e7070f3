use super::Invalid;

/// The longest address RFC 5321 lets through a mail server.
const MAX_LEN: usize = 254;

/// An e-mail address, trimmed and lower-cased, so that comparisons are case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Parses an address typed by a user.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let email = raw.trim().to_lowercase();
        if email.len() > MAX_LEN {
            return Err(Invalid::new(
                "string_too_long",
                format!("An email address has at most {MAX_LEN} characters"),
            ));
        }
        if !email_address::EmailAddress::is_valid(&email) || !email.contains('.') {
            return Err(Invalid::new(
                "value_error",
                "value is not a valid email address",
            ));
        }
        Ok(Self(email))
    }

    /// The normalised address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_trimmed_and_lower_cased() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "a b@example.com",
            "ada@localhost",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(Email::parse(&long).unwrap_err().kind, "string_too_long");
    }
}
