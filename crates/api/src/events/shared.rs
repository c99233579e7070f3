//! The per-user stream limit (`SSE_MAX_STREAMS_PER_USER`) counted over every api process, in Redis: one sorted set
//! per user under `<QUEUE_NAME>:sse:`, one member per open stream, scored with the time its lease ends.
//!
//! - Opening a stream is one script run (one round trip, atomic, on Redis's clock): drop the members whose lease
//!   has ended, refuse if the user still has the limit's count, else add this stream.
//! - Closing it removes its member. A process that dies cannot, so each process renews the leases of its open
//!   streams every [`RENEW_EVERY`], and a dead one's streams stop counting at most [`LEASE`] later.
//! - The renewal also adds back what Redis lost: the streams opened while it did not answer, and those whose
//!   lease lapsed during an outage (or whose key was lost), so that the count heals within [`RENEW_EVERY`] of
//!   Redis answering again.
//! - When Redis does not answer within [`DECISION_TIMEOUT`], the process's own count decides (as for the rate
//!   limits: logged once, counted in `sse_local_decisions_total`, Redis asked again a second later).

use std::{
    collections::HashMap,
    sync::{
        Arc, LazyLock, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use orders_core::domain::UserId;
use redis::{Script, aio::ConnectionManager};
use tokio_util::sync::CancellationToken;

use crate::rate_limit::shared::{DECISION_TIMEOUT, Health};

/// How long an open stream counts without being renewed.
pub const LEASE: Duration = Duration::from_secs(60);
/// How often a process renews the leases of its open streams.
pub const RENEW_EVERY: Duration = Duration::from_secs(20);
/// Leases renewed by one script run, so that no run holds Redis long.
const RENEW_CHUNK: usize = 500;

static OPEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
",
    )
});

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', key, tonumber(ARGV[1]))
end
return #KEYS
",
    )
});

/// What the shared count says about one more stream of a user.
#[derive(Debug)]
pub enum Shared {
    /// It counts now; it stops counting when the slot is dropped.
    Granted(SharedSlot),
    /// The user has the limit's count of streams open over all processes.
    Refused,
    /// Redis did not answer: the process's own count decides. The stream is added to the shared count by the
    /// next renewal that Redis answers.
    Unknown(SharedSlot),
}

/// The streams of this process in the shared count.
pub struct SharedSlots {
    conn: ConnectionManager,
    prefix: String,
    /// Members are `<instance>:<n>`: unique over processes and restarts.
    instance: uuid::Uuid,
    next: AtomicU64,
    /// Open streams (their numbers in the members), with their users: what the renewals renew.
    held: Mutex<HashMap<u64, UserId>>,
    health: Health,
}

impl std::fmt::Debug for SharedSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSlots")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl SharedSlots {
    /// Counts under `<queue_name>:sse:` over `conn`.
    pub fn new(conn: ConnectionManager, queue_name: &str) -> Arc<Self> {
        Arc::new(Self {
            conn,
            prefix: format!("{queue_name}:sse"),
            instance: uuid::Uuid::new_v4(),
            next: AtomicU64::new(0),
            held: Mutex::default(),
            health: Health::new("sse_local_decisions_total", "event stream limits"),
        })
    }

    /// Asks for one more stream of `user`, who may have `max` open over all processes.
    pub async fn open(self: &Arc<Self>, user: UserId, max: u32) -> Shared {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        if self.health.skipping() {
            return Shared::Unknown(self.hold(number, user));
        }
        let mut invocation = OPEN.key(self.key(user));
        invocation
            .arg(self.member(number))
            .arg(max)
            .arg(LEASE.as_millis() as u64);
        let mut conn = self.conn.clone();
        // A run that answers too late may still have added the member: it is neither renewed nor removed, so it
        // stops counting when its lease ends.
        match tokio::time::timeout(DECISION_TIMEOUT, invocation.invoke_async::<u8>(&mut conn)).await
        {
            Ok(Ok(1)) => {
                self.health.answered();
                Shared::Granted(self.hold(number, user))
            }
            Ok(Ok(_)) => {
                self.health.answered();
                Shared::Refused
            }
            Ok(Err(err)) => {
                self.health.failed(&err.to_string());
                Shared::Unknown(self.hold(number, user))
            }
            Err(_) => {
                self.health.failed("no answer in time");
                Shared::Unknown(self.hold(number, user))
            }
        }
    }

    /// Counts stream `number` of `user` as open here: the renewals keep (or put) it in the shared count until the
    /// returned slot is dropped.
    fn hold(self: &Arc<Self>, number: u64, user: UserId) -> SharedSlot {
        self.held_mut().insert(number, user);
        SharedSlot {
            slots: self.clone(),
            number,
        }
    }

    /// Renews the leases of this process's open streams every [`RENEW_EVERY`] until `stop`.
    pub fn spawn_renewals(self: &Arc<Self>, stop: CancellationToken) {
        let slots = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(RENEW_EVERY) => {}
                    () = stop.cancelled() => return,
                }
                if let Err(err) = slots.renew().await {
                    tracing::warn!(error = %err, "cannot renew the event streams' slots; retrying in {RENEW_EVERY:?}");
                }
            }
        });
    }

    async fn renew(&self) -> redis::RedisResult<()> {
        let held: Vec<(u64, UserId)> = self
            .held_mut()
            .iter()
            .map(|(number, user)| (*number, *user))
            .collect();
        let mut conn = self.conn.clone();
        for chunk in held.chunks(RENEW_CHUNK) {
            let mut invocation = RENEW.prepare_invoke();
            invocation.arg(LEASE.as_millis() as u64);
            for (number, user) in chunk {
                invocation.key(self.key(*user)).arg(self.member(*number));
            }
            invocation.invoke_async::<usize>(&mut conn).await?;
        }
        Ok(())
    }

    /// The sorted set of `user`'s streams.
    fn key(&self, user: UserId) -> String {
        format!("{}:{user}", self.prefix)
    }

    /// The member of this process's stream `number`.
    fn member(&self, number: u64) -> String {
        format!("{}:{number}", self.instance)
    }

    fn held_mut(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UserId>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One open stream in the shared count; dropping it takes the stream out.
#[derive(Debug)]
pub struct SharedSlot {
    slots: Arc<SharedSlots>,
    number: u64,
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        let Some(user) = self.slots.held_mut().remove(&self.number) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (key, member) = (self.slots.key(user), self.slots.member(self.number));
        let mut conn = self.slots.conn.clone();
        // If this fails, the member stops counting when its lease ends.
        runtime.spawn(async move {
            let removed = tokio::time::timeout(
                DECISION_TIMEOUT,
                redis::cmd("ZREM")
                    .arg(&key)
                    .arg(&member)
                    .exec_async(&mut conn),
            )
            .await;
            if !matches!(removed, Ok(Ok(()))) {
                tracing::debug!("cannot remove a closed stream's slot; its lease ends it");
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Against the real Redis of `REDIS_URL`, each test under a prefix of its own.

    use redis::AsyncCommands;

    use super::*;

    /// Slots under a prefix of their own, and a connection to the same Redis.
    pub(crate) async fn slots() -> (Arc<SharedSlots>, ConnectionManager) {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
        let conn = ConnectionManager::new(redis::Client::open(url).unwrap())
            .await
            .unwrap();
        let prefix = format!("test_{}", uuid::Uuid::new_v4().simple());
        (SharedSlots::new(conn.clone(), &prefix), conn)
    }

    /// Redis's clock, in milliseconds, as the scripts read it.
    async fn redis_now(conn: &mut ConnectionManager) -> f64 {
        let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
        (seconds * 1000 + micros / 1000) as f64
    }

    #[tokio::test]
    async fn a_renewal_extends_the_lease_of_each_open_stream_and_of_no_closed_one() {
        let (slots, mut conn) = slots().await;
        let user = UserId::new();
        let key = slots.key(user);
        let Shared::Granted(open) = slots.open(user, 10).await else {
            panic!("the first stream is refused");
        };
        let Shared::Granted(closed) = slots.open(user, 10).await else {
            panic!("the second stream is refused");
        };
        let closed_member = slots.member(closed.number);
        drop(closed);
        for _ in 0..100 {
            if conn.zcard::<_, usize>(&key).await.unwrap() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            conn.zcard::<_, usize>(&key).await.unwrap(),
            1,
            "a closed stream still counts"
        );

        // As if the open stream's lease were about to end: a second left.
        let member = slots.member(open.number);
        let soon = redis_now(&mut conn).await + 1000.0;
        let _: () = conn.zadd(&key, &member, soon).await.unwrap();

        slots.renew().await.unwrap();
        let renewed: f64 = conn.zscore(&key, &member).await.unwrap();
        let now = redis_now(&mut conn).await;
        assert!(
            renewed > now + LEASE.as_millis() as f64 - 5_000.0,
            "the lease ends {} ms from now, not a full lease",
            renewed - now
        );
        let closed_score: Option<f64> = conn.zscore(&key, &closed_member).await.unwrap();
        assert_eq!(closed_score, None, "a renewal brought back a closed stream");
        let ttl: i64 = conn.pttl(&key).await.unwrap();
        assert!(
            ttl > 50_000,
            "the key expires in {ttl} ms, before the lease ends"
        );
        drop(open);
        let _: () = conn.del(&key).await.unwrap();
    }

    #[tokio::test]
    async fn a_renewal_adds_back_the_open_streams_redis_lost() {
        let (slots, mut conn) = slots().await;
        let user = UserId::new();
        let key = slots.key(user);
        let Shared::Granted(open) = slots.open(user, 10).await else {
            panic!("the stream is refused");
        };
        // Redis restarted empty, evicted the key, or the lease lapsed during an outage.
        let _: () = conn.del(&key).await.unwrap();
        slots.renew().await.unwrap();
        let score: Option<f64> = conn.zscore(&key, slots.member(open.number)).await.unwrap();
        assert!(score.is_some(), "the open stream counts again");
        assert_eq!(conn.zcard::<_, usize>(&key).await.unwrap(), 1);
        drop(open);
        let _: () = conn.del(&key).await.unwrap();
    }

    #[tokio::test]
    async fn a_stream_opened_while_redis_does_not_answer_is_counted_once_it_does() {
        let (slots, mut conn) = slots().await;
        let user = UserId::new();
        // Redis did not answer for this one: the process's count decided, and the renewals hold it.
        let number = slots.next.fetch_add(1, Ordering::Relaxed);
        let unknown = slots.hold(number, user);
        slots.renew().await.unwrap();
        let key = slots.key(user);
        let score: Option<f64> = conn.zscore(&key, slots.member(number)).await.unwrap();
        assert!(score.is_some(), "the stream counts once Redis answers");
        drop(unknown);
        for _ in 0..100 {
            if conn.zcard::<_, usize>(&key).await.unwrap() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            conn.zcard::<_, usize>(&key).await.unwrap(),
            0,
            "a closed stream still counts"
        );
    }
}
