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
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use tracing::Span;

fn argon2() -> anyhow::Result<Argon2<'static>> {
    let params = Params::new(19 * 1024, 2, 1, None)
        .map_err(|err| anyhow::anyhow!("argon2 params: {err}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
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
        let dummy_hash = argon2()?
            .hash_password(b"a password nobody has: only here to spend the same time")
            .map_err(|err| anyhow::anyhow!("cannot compute the dummy hash: {err}"))?
            .to_string();
        Ok(Self {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            dummy_hash: dummy_hash.into(),
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
