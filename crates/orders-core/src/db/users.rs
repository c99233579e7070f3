//! Users and their credentials.

use sqlx::PgExecutor;

use crate::domain::{Email, User, UserId, UserName};

/// The outcome of inserting a user other than success.
#[derive(Debug, thiserror::Error)]
pub enum InsertUserError {
    /// Another account has this e-mail address (compared lower-cased).
    #[error("email already registered")]
    EmailTaken,
    /// Anything else.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Stores a new user with an already computed password hash.
pub async fn insert_user(
    executor: impl PgExecutor<'_>,
    name: &UserName,
    email: &Email,
    password_hash: &str,
) -> Result<User, InsertUserError> {
    sqlx::query_as!(
        User,
        r#"
        insert into users (id, name, email, password_hash)
        values ($1, $2, $3, $4)
        returning id as "id: UserId", name, email, created_at
        "#,
        UserId::new() as UserId,
        name.as_str(),
        email.as_str(),
        password_hash,
    )
    .fetch_one(executor)
    .await
    .map_err(|err| {
        if super::is_constraint_violation(&err, "users_email_key") {
            InsertUserError::EmailTaken
        } else {
            InsertUserError::Database(err)
        }
    })
}

/// What login needs to check a password.
#[derive(Debug)]
pub struct Credentials {
    /// The user's id.
    pub user_id: UserId,
    /// The stored PHC hash.
    pub password_hash: String,
}

/// The credentials stored for an address, if any.
pub async fn find_credentials(
    executor: impl PgExecutor<'_>,
    email: &Email,
) -> sqlx::Result<Option<Credentials>> {
    sqlx::query_as!(
        Credentials,
        r#"select id as "user_id: UserId", password_hash from users where email = $1"#,
        email.as_str(),
    )
    .fetch_optional(executor)
    .await
}

/// A user by id.
pub async fn find_user(executor: impl PgExecutor<'_>, id: UserId) -> sqlx::Result<Option<User>> {
    sqlx::query_as!(
        User,
        r#"select id as "id: UserId", name, email, created_at from users where id = $1"#,
        id as UserId,
    )
    .fetch_optional(executor)
    .await
}
