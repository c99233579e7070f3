//! What a user may do in the operations console. Stored as text in `users.role` (checked by the
//! `users_role_known` constraint), read on every admin request, so a change takes effect at once.

use serde::{Deserialize, Serialize};

use super::Invalid;

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every account: orders of its own, no admin access.
    Customer,
    /// Reads the admin API.
    Viewer,
    /// Reads the admin API and acts through it (re-drives and cancels orders).
    Operator,
}

impl Role {
    /// Every role, least powerful first.
    pub const ALL: [Self; 3] = [Self::Customer, Self::Viewer, Self::Operator];

    /// Parses a role's name (`customer`, `viewer`, `operator`).
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        Self::ALL
            .into_iter()
            .find(|role| role.as_str() == raw)
            .ok_or_else(|| {
                Invalid::new("enum", "Input should be 'customer', 'viewer' or 'operator'")
            })
    }

    /// The name stored in the database and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Viewer => "viewer",
            Self::Operator => "operator",
        }
    }

    /// Whether it may read the admin API.
    pub fn can_read_admin(self) -> bool {
        matches!(self, Self::Viewer | Self::Operator)
    }

    /// Whether it may act through the admin API.
    pub fn can_act(self) -> bool {
        self == Self::Operator
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Role;

    #[test]
    fn roles_round_trip_and_others_are_refused() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Ok(role));
        }
        for bad in ["", "admin", "Operator", " viewer"] {
            assert!(Role::parse(bad).is_err(), "{bad:?}");
        }
    }
}
