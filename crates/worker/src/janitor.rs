//! Housekeeping of apalis-redis's keys, which apalis itself never does. Without it Redis keeps every job
//! ever pushed (its data, a metadata hash each and its id in the done set), a metadata hash for every worker
//! that ever registered, and, after a backlog, a scheduled set too large for apalis's own fetch to promote.
//!
//! apalis stays unpatched: these are scripts of ours over its key layout ([`QueueKeys`]), each one atomic and
//! bounded (at most [`BATCH`] ids per call), so none blocks Redis however much has piled up. Every worker process
//! runs a sweep per reconciler round; concurrent sweeps are safe (each id is popped by one of them).

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use orders_core::queue::QueueKeys;
use redis::{Script, aio::ConnectionManager};

/// Most ids one script call touches.
pub const BATCH: usize = 1000;
/// Most script calls of one kind per sweep: a sweep forgets up to 100,000 finished jobs.
const MAX_CALLS_PER_SWEEP: usize = 100;
/// Above this many scheduled jobs, a sweep promotes the due ones itself, in batches.
pub const PROMOTE_ABOVE: u64 = 1000;
/// Keys one SCAN step looks at, looking for metadata of workers that are gone.
const SCAN_COUNT: usize = 1000;

static PURGE_FINISHED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/purge_finished.lua")));
static PROMOTE_DUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/promote_due.lua")));
static RETIRE_WORKER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/retire_worker.lua")));
static FORGET_STRAY_METADATA: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/forget_stray_metadata.lua")));

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Finished jobs forgotten (data, metadata and done/dead entry).
    pub purged: usize,
    /// Due jobs moved from the scheduled set to the active list.
    pub promoted: usize,
    /// Registrations of dead workers removed.
    pub retired: usize,
    /// Metadata hashes of unregistered workers deleted.
    pub stray_metadata: usize,
}

/// Sweeps one queue's Redis keys. Cheap to clone; each clone scans on its own.
#[derive(Debug, Clone)]
pub struct Janitor {
    conn: ConnectionManager,
    keys: Arc<QueueKeys>,
    /// A registration silent this long belongs to a dead worker.
    dead_after: Duration,
    scan_cursor: u64,
}

/// Unix seconds, the clock apalis-redis scores heartbeats and schedules with.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |now| now.as_secs())
}

/// `text` with the glob characters of Redis's MATCH escaped.
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

impl Janitor {
    /// A janitor for the queue with `keys`. Registrations silent for `dead_after` are removed; make it longer
    /// than apalis's orphan timeout, so that apalis's own recovery goes first.
    pub fn new(conn: ConnectionManager, keys: QueueKeys, dead_after: Duration) -> Self {
        Self {
            conn,
            keys: Arc::new(keys),
            dead_after,
            scan_cursor: 0,
        }
    }

    /// One bounded round of housekeeping. Stops at the first Redis error (the next round starts over).
    pub async fn sweep(&mut self) -> redis::RedisResult<Sweep> {
        let mut sweep = Sweep {
            promoted: self.promote_if_piled_up().await?,
            purged: self.purge_finished().await?,
            ..Sweep::default()
        };
        sweep.retired = self.retire_dead_workers().await?;
        sweep.stray_metadata = self.forget_stray_metadata().await?;
        Ok(sweep)
    }

    /// Forgets finished jobs, [`BATCH`] per call, until none are left (or the sweep's cap).
    pub async fn purge_finished(&mut self) -> redis::RedisResult<usize> {
        let mut purged = 0;
        for _ in 0..MAX_CALLS_PER_SWEEP {
            let removed: usize = PURGE_FINISHED
                .key(&self.keys.done)
                .key(&self.keys.dead)
                .key(&self.keys.data)
                .arg(&self.keys.meta)
                .arg(BATCH)
                .invoke_async(&mut self.conn)
                .await?;
            purged += removed;
            if removed < BATCH {
                break;
            }
        }
        Ok(purged)
    }

    /// When the scheduled set holds more than [`PROMOTE_ABOVE`] jobs, moves the due ones to the active list in
    /// batches, so that apalis's fetch never has to move more than it can. Within `QUEUE_MAX_JOBS` this does
    /// not happen; it heals a queue filled past it (by an older version, or by hand).
    pub async fn promote_if_piled_up(&mut self) -> redis::RedisResult<usize> {
        let scheduled: u64 = redis::cmd("ZCARD")
            .arg(&self.keys.scheduled)
            .query_async(&mut self.conn)
            .await?;
        if scheduled <= PROMOTE_ABOVE {
            return Ok(0);
        }
        let mut promoted = 0;
        for _ in 0..MAX_CALLS_PER_SWEEP {
            let moved: usize = PROMOTE_DUE
                .key(&self.keys.scheduled)
                .key(&self.keys.active)
                .key(&self.keys.signal)
                .arg(BATCH)
                .arg(unix_now())
                .invoke_async(&mut self.conn)
                .await?;
            promoted += moved;
            if moved < BATCH {
                break;
            }
        }
        if promoted > 0 {
            tracing::info!(
                promoted,
                "janitor: moved due jobs from the scheduled set to the active list"
            );
        }
        Ok(promoted)
    }

    /// Removes `worker`'s registration now, giving its unacknowledged jobs back to the queue. For a worker of
    /// this process that has stopped. Returns the jobs given back.
    pub async fn retire(&mut self, worker: &str) -> redis::RedisResult<i64> {
        self.invoke_retire(worker, -1).await
    }

    async fn invoke_retire(&mut self, worker: &str, least_silence: i64) -> redis::RedisResult<i64> {
        RETIRE_WORKER
            .key(&self.keys.workers)
            .key(self.keys.inflight_of(worker))
            .key(self.keys.metadata_of(worker))
            .key(&self.keys.active)
            .key(&self.keys.data)
            .key(&self.keys.signal)
            .arg(worker)
            .arg(unix_now())
            .arg(least_silence)
            .invoke_async(&mut self.conn)
            .await
    }

    /// Retires workers whose last heartbeat is older than `dead_after` (a killed process, or a consumer that
    /// failed while Redis was unreachable). Up to [`BATCH`] per sweep.
    async fn retire_dead_workers(&mut self) -> redis::RedisResult<usize> {
        let silence = self.dead_after.as_secs().max(1);
        let cutoff = unix_now().saturating_sub(silence);
        let dead: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&self.keys.workers)
            .arg("-inf")
            .arg(cutoff)
            .arg("LIMIT")
            .arg(0)
            .arg(BATCH)
            .query_async(&mut self.conn)
            .await?;
        let mut retired = 0;
        for worker in dead {
            let returned = self
                .invoke_retire(&worker, i64::try_from(silence).unwrap_or(i64::MAX))
                .await?;
            if returned >= 0 {
                retired += 1;
                tracing::info!(%worker, jobs_returned = returned, "janitor: removed a dead worker's registration");
            }
        }
        Ok(retired)
    }

    /// One SCAN step over the workers' metadata hashes, deleting those of workers no longer registered (apalis
    /// unregisters dead workers itself but leaves their metadata). The cursor carries over between sweeps.
    async fn forget_stray_metadata(&mut self) -> redis::RedisResult<usize> {
        let prefix = format!("{}:", self.keys.worker_metadata);
        let (cursor, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(self.scan_cursor)
            .arg("MATCH")
            .arg(format!("{}*", escape_glob(&prefix)))
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut self.conn)
            .await?;
        self.scan_cursor = cursor;
        let mut forgotten = 0;
        for key in found {
            let Some(worker) = key.strip_prefix(&prefix) else {
                continue;
            };
            let deleted: usize = FORGET_STRAY_METADATA
                .key(&self.keys.workers)
                .key(&key)
                .arg(worker)
                .invoke_async(&mut self.conn)
                .await?;
            forgotten += deleted;
        }
        Ok(forgotten)
    }
}

#[cfg(test)]
mod tests {
    use super::escape_glob;

    #[test]
    fn glob_characters_in_queue_names_are_escaped() {
        assert_eq!(escape_glob("orders"), "orders");
        assert_eq!(escape_glob(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
    }
}
