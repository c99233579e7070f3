//! JWTs: HMAC-signed with the configured algorithm, which is pinned on verification (a token whose header names
//! another algorithm is refused). Access and refresh tokens carry a `typ` claim that every use checks, so one
//! can never stand in for the other (RFC 8725 §3.11).

use std::time::Duration;

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use orders_core::domain::UserId;
use quick_cache::sync::Cache;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The `iss` of every token this service issues, and the only one it accepts.
const ISSUER: &str = "orders-api";

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Presented as `Authorization: Bearer` on API calls.
    Access,
    /// Exchanged at `/auth/refresh` for a new pair.
    Refresh,
    /// Read from the `order_events` cookie by the event routes alone, so that a browser's `EventSource`, which
    /// cannot send a header, can subscribe. It lives exactly as long as the access token it was made from.
    Events,
}

/// The claims of both kinds of token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: Uuid,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
    /// Unique token id.
    pub jti: Uuid,
    /// Access or refresh.
    pub typ: TokenKind,
    /// Always `ISSUER`.
    pub iss: String,
    /// The session (refresh token family) the token was issued in; absent from tokens issued before sessions were
    /// named in them. A stream ends when its session does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<Uuid>,
}

/// A freshly signed token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The compact JWT.
    pub token: String,
    /// Its `jti`.
    pub jti: Uuid,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}

impl Grant {
    fn of(claims: &Claims) -> Self {
        Self {
            user: UserId(claims.sub),
            session: claims.sid,
            expires_at: claims.exp,
        }
    }
}

/// Why a token was refused. Deliberately uninformative towards the client.
#[derive(Debug, thiserror::Error)]
#[error("invalid token")]
pub struct InvalidToken;

/// Signing and verification keys plus the rules tokens are checked against.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
    access_ttl: Duration,
    refresh_ttl: Duration,
    /// Access tokens already verified, by the SHA-256 of the token (see [`JwtKeys::verify_access`]).
    verified: Cache<[u8; 32], Grant>,
}

/// Access tokens remembered as verified: about 100 bytes each, so at most about 1 MB.
const VERIFIED_ACCESS_TOKENS: usize = 10_000;

/// What a valid access (or event-stream) token proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Who.
    pub user: UserId,
    /// In which session, if the token names it.
    pub session: Option<Uuid>,
    /// Until when (seconds since the epoch): the token's `exp`.
    pub expires_at: i64,
}

impl JwtKeys {
    /// Keys for an HMAC secret.
    pub fn new(
        secret: &[u8],
        algorithm: Algorithm,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Self {
        let mut validation = Validation::new(algorithm);
        // The library's default is 60 s of grace; tokens are issued and checked by this service's own clock.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss"]);
        validation.set_issuer(&[ISSUER]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            algorithm,
            validation,
            access_ttl,
            refresh_ttl,
            verified: Cache::new(VERIFIED_ACCESS_TOKENS),
        }
    }

    /// Lifetime of access tokens.
    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// Lifetime of refresh tokens.
    pub fn refresh_ttl(&self) -> Duration {
        self.refresh_ttl
    }

    /// Signs a token of `kind` for `user`, with `jti` as its id.
    pub fn issue(&self, user: UserId, kind: TokenKind, jti: Uuid) -> anyhow::Result<IssuedToken> {
        self.issue_until(user, kind, jti, None, None)
    }

    /// Like [`issue`](Self::issue), in `session`, expiring no later than `not_after` (a session's end, or the
    /// access token an event-stream token is made from). The expiry is rounded down to a whole second, as the
    /// `exp` claim holds it, so the stored expiry and the claim agree.
    pub fn issue_until(
        &self,
        user: UserId,
        kind: TokenKind,
        jti: Uuid,
        session: Option<Uuid>,
        not_after: Option<DateTime<Utc>>,
    ) -> anyhow::Result<IssuedToken> {
        let ttl = match kind {
            TokenKind::Access | TokenKind::Events => self.access_ttl,
            TokenKind::Refresh => self.refresh_ttl,
        };
        let now = Utc::now();
        let expires_at = not_after.map_or(now + ttl, |cap| cap.min(now + ttl));
        let expires_at = DateTime::from_timestamp(expires_at.timestamp(), 0).unwrap_or(expires_at);
        let claims = Claims {
            sub: user.0,
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
            jti,
            typ: kind,
            iss: ISSUER.to_owned(),
            sid: session,
        };
        let token = jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.encoding)?;
        Ok(IssuedToken {
            token,
            jti,
            expires_at,
        })
    }

    /// The user of a valid access token. A client presents the same token on every call until it expires, and
    /// decoding and checking it (base64, two JSON parses, the HMAC) was measured at about 12 % of the api's CPU on
    /// the list path; so a token that passed [`verify`](Self::verify) is remembered, keyed by its SHA-256 (an exact
    /// match of the whole token, signature included, and no token kept in memory), and its expiry is checked on
    /// every use as `verify` checks it. Refused tokens are not remembered: each costs a full check, as before.
    pub fn verify_access(&self, token: &str) -> Result<Grant, InvalidToken> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(verified) = self.verified.get(&key) {
            // `verify` refuses a token once `exp` is in the past (no leeway).
            if verified.expires_at < Utc::now().timestamp() {
                self.verified.remove(&key);
                return Err(InvalidToken);
            }
            return Ok(verified);
        }
        let claims = self.verify(token, TokenKind::Access)?;
        let grant = Grant::of(&claims);
        self.verified.insert(key, grant);
        Ok(grant)
    }

    /// What a valid event-stream token (from the `order_events` cookie) proves. Not remembered: a stream is
    /// opened once and then lasts.
    pub fn verify_events(&self, token: &str) -> Result<Grant, InvalidToken> {
        self.verify(token, TokenKind::Events)
            .map(|claims| Grant::of(&claims))
    }

    /// Checks signature, algorithm, issuer, expiry and kind.
    pub fn verify(&self, token: &str, expected: TokenKind) -> Result<Claims, InvalidToken> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| InvalidToken)?;
        if data.claims.typ != expected {
            return Err(InvalidToken);
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(algorithm: Algorithm) -> JwtKeys {
        JwtKeys::new(
            &[7; 32],
            algorithm,
            Duration::from_secs(60),
            Duration::from_secs(600),
        )
    }

    #[test]
    fn a_token_verifies_only_as_its_own_kind() {
        let keys = keys(Algorithm::HS256);
        let user = UserId::new();
        let access = keys.issue(user, TokenKind::Access, Uuid::new_v4()).unwrap();
        assert_eq!(
            keys.verify(&access.token, TokenKind::Access).unwrap().sub,
            user.0
        );
        assert!(keys.verify(&access.token, TokenKind::Refresh).is_err());
    }

    #[test]
    fn a_token_signed_with_another_algorithm_or_key_is_refused() {
        let token = keys(Algorithm::HS512)
            .issue(UserId::new(), TokenKind::Access, Uuid::new_v4())
            .unwrap();
        assert!(
            keys(Algorithm::HS256)
                .verify(&token.token, TokenKind::Access)
                .is_err()
        );
        let other = JwtKeys::new(
            &[8; 32],
            Algorithm::HS256,
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let token = other
            .issue(UserId::new(), TokenKind::Access, Uuid::new_v4())
            .unwrap();
        assert!(
            keys(Algorithm::HS256)
                .verify(&token.token, TokenKind::Access)
                .is_err()
        );
    }

    #[test]
    fn an_access_token_verifies_again_from_memory_until_it_expires() {
        let keys = keys(Algorithm::HS256);
        let user = UserId::new();
        let access = keys.issue(user, TokenKind::Access, Uuid::new_v4()).unwrap();
        assert_eq!(keys.verify_access(&access.token).unwrap().user, user);
        assert_eq!(keys.verified.len(), 1);
        assert_eq!(keys.verify_access(&access.token).unwrap().user, user);

        // The remembered token with an expiry now past (as it would be an access TTL later) is refused, and
        // forgotten.
        let key: [u8; 32] = Sha256::digest(access.token.as_bytes()).into();
        let remembered = keys.verified.get(&key).unwrap();
        keys.verified.insert(
            key,
            Grant {
                expires_at: Utc::now().timestamp() - 1,
                ..remembered
            },
        );
        assert!(keys.verify_access(&access.token).is_err());
        assert_eq!(keys.verified.len(), 0);
    }

    #[test]
    fn a_remembered_token_vouches_for_no_other() {
        let keys = keys(Algorithm::HS256);
        let access = keys
            .issue(UserId::new(), TokenKind::Access, Uuid::new_v4())
            .unwrap();
        keys.verify_access(&access.token).unwrap();
        // The same claims with a changed signature, a refresh token, and a token of another key: all checked
        // in full, all refused, none remembered.
        // The signature's first character changed (its last may carry only padding bits).
        let at = access.token.rfind('.').unwrap() + 1;
        let swapped = if access.token.as_bytes()[at] == b'A' {
            "B"
        } else {
            "A"
        };
        let mut forged = access.token.clone();
        forged.replace_range(at..=at, swapped);
        let refresh = keys
            .issue(UserId::new(), TokenKind::Refresh, Uuid::new_v4())
            .unwrap();
        let foreign = JwtKeys::new(
            &[8; 32],
            Algorithm::HS256,
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
        .issue(UserId::new(), TokenKind::Access, Uuid::new_v4())
        .unwrap();
        for token in [forged.as_str(), &refresh.token, &foreign.token] {
            assert!(keys.verify_access(token).is_err());
        }
        assert_eq!(keys.verified.len(), 1);
    }

    #[test]
    fn an_unsigned_token_is_refused() {
        // {"alg":"none"} with valid-looking claims and an empty signature.
        let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        let claims = keys(Algorithm::HS256)
            .issue(UserId::new(), TokenKind::Access, Uuid::new_v4())
            .unwrap();
        let payload = claims.token.split('.').nth(1).unwrap();
        assert!(
            keys(Algorithm::HS256)
                .verify(&format!("{header}.{payload}."), TokenKind::Access)
                .is_err()
        );
    }
}
