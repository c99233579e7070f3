//! Password hashing with Argon2id at OWASP's minimum cost (m = 19 MiB, t = 2, p = 1).
//!
//! Hashing is CPU- and memory-heavy, so it runs on the blocking pool, never on the async workers, and a
//! semaphore bounds how many run at once: a login storm queues instead of exhausting memory. Login with an
//! unknown e-mail verifies against a dummy hash, so it costs the same time as a wrong password.

use std::sync::Arc;

use anyhow::Context;
use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHasher as _, PasswordVerifier as _},
};
use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use tracing::Span;
use uuid::Uuid;

/// Memory in KiB, iterations and lanes: OWASP's minimum for Argon2id.
const M_COST: u32 = 19 * 1024;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

fn argon2() -> anyhow::Result<Argon2<'static>> {
    let params = Params::new(M_COST, T_COST, P_COST, None)
        .map_err(|err| anyhow::anyhow!("argon2 params: {err}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// A PHC string that no password matches: the parameters of every stored hash, with a random salt and a random
/// output. Verifying a password against it costs one whole hash, as against a real one. Made without hashing:
/// hashing at start-up took 19 MiB that the allocator then kept (12 MB of the api's resident memory).
fn dummy_hash() -> String {
    let salt = Uuid::new_v4();
    let output = [Uuid::new_v4(), Uuid::new_v4()]
        .map(Uuid::into_bytes)
        .concat();
    format!(
        "$argon2id$v=19$m={M_COST},t={T_COST},p={P_COST}${}${}",
        STANDARD_NO_PAD.encode(salt.as_bytes()),
        STANDARD_NO_PAD.encode(output)
    )
}

/// Hashes and verifies passwords off the async runtime, a bounded number at a time.
#[derive(Clone)]
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
    dummy_hash: Arc<str>,
}

impl PasswordHasher {
    /// A hasher running at most `max_concurrent` hashes at once (0: one per CPU core).
    pub fn new(max_concurrent: usize) -> anyhow::Result<Self> {
        let max_concurrent = match max_concurrent {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        };
        Ok(Self {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            dummy_hash: dummy_hash().into(),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .context("hasher closed")?;
        let span = Span::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            span.in_scope(work)
        })
        .await
        .context("password hashing task failed")
    }

    /// A PHC string for a new password.
    pub async fn hash(&self, password: SecretString) -> anyhow::Result<String> {
        self.run(move || {
            argon2()?
                .hash_password(password.expose_secret().as_bytes())
                .map(|hash| hash.to_string())
                .map_err(|err| anyhow::anyhow!("cannot hash the password: {err}"))
        })
        .await?
    }

    /// Whether `password` matches `stored`. With no stored hash (unknown user) it checks against the dummy
    /// hash and answers false, spending the same work.
    pub async fn verify(
        &self,
        password: SecretString,
        stored: Option<String>,
    ) -> anyhow::Result<bool> {
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy_hash.to_string());
        let matches = self
            .run(move || {
                argon2().map(|argon2| {
                    argon2
                        .verify_password(password.expose_secret().as_bytes(), hash.as_str())
                        .is_ok()
                })
            })
            .await??;
        Ok(known && matches)
    }
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::phc::PasswordHash;

    use super::*;

    #[test]
    fn the_dummy_hash_costs_what_a_stored_hash_costs_and_matches_no_password() {
        let stored = argon2()
            .unwrap()
            .hash_password(b"correct horse battery staple")
            .unwrap()
            .to_string();
        let (dummy, other) = (dummy_hash(), dummy_hash());
        assert_ne!(dummy, other, "a fixed dummy hash");
        let (stored, dummy) = (
            PasswordHash::new(&stored).unwrap(),
            PasswordHash::new(&dummy).unwrap(),
        );
        assert_eq!(dummy.algorithm, stored.algorithm);
        assert_eq!(dummy.version, stored.version);
        assert_eq!(dummy.params, stored.params);
        assert_eq!(
            dummy.salt.map(|salt| salt.len()),
            stored.salt.map(|salt| salt.len())
        );
        assert_eq!(
            dummy.hash.map(|hash| hash.len()),
            stored.hash.map(|hash| hash.len())
        );
        for password in ["correct horse battery staple", "", "a password nobody has"] {
            assert!(
                argon2()
                    .unwrap()
                    .verify_password(password.as_bytes(), &dummy)
                    .is_err()
            );
        }
    }
}
