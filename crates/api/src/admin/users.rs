//! `api users set-role EMAIL ROLE`: how the first operator is made, and how roles change afterwards. Needs only
//! the database settings.

use std::process::ExitCode;

use orders_core::{
    config::DatabaseConfig,
    db::admin as db,
    domain::{Email, Role},
};

/// Gives the user with `email` the role `role`, printing the change; exit 1 with a message for an unknown role
/// or email, or a database that cannot be reached.
pub async fn set_role(database: &DatabaseConfig, email: &str, role: &str) -> ExitCode {
    match try_set_role(database, email, role).await {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// [`set_role`]'s work: the line to print, or the error.
pub async fn try_set_role(
    database: &DatabaseConfig,
    email: &str,
    role: &str,
) -> Result<String, String> {
    let role = Role::parse(role)
        .map_err(|_| format!("unknown role {role:?}: use customer, viewer or operator"))?;
    let email = Email::parse(email).map_err(|invalid| format!("{email:?}: {invalid}"))?;
    let pool = orders_core::db::connect(database)
        .await
        .map_err(|err| orders_core::telemetry::error_chain(&err))?;
    let change = db::set_role(&pool, &email, role).await;
    pool.close().await;
    match change.map_err(|err| format!("cannot change the role: {err}"))? {
        Some(change) if change.before == change.after => {
            Ok(format!("{}: already {}", email.as_str(), change.after))
        }
        Some(change) => Ok(format!(
            "{}: {} -> {}",
            email.as_str(),
            change.before,
            change.after
        )),
        None => Err(format!("no user has the email {}", email.as_str())),
    }
}
