//! Housekeeping of apalis-redis's keys, which apalis itself never does. Without it Redis keeps every job
//! ever pushed (its data, a metadata hash each and its id in the done set), a metadata hash for every worker
//! that ever registered, and, after a backlog, a scheduled set too large for apalis's own fetch to promote.
//!
//! apalis stays unpatched: these are scripts of ours over its key layout ([`QueueKeys`]), each one atomic and
//! bounded (at most [`BATCH`] ids per call), so none blocks Redis however much has piled up. Every worker process
//! runs a sweep per reconciler round; concurrent sweeps are safe (each id is popped by one of them).
//!
//! It also heals what Redis lost ([`Janitor::heal`]): apalis-redis cannot fetch past an entry it cannot read (an
//! id whose data or metadata is gone, a value that is not a job, a key holding another type), and its consumer
//! fails on it for ever. Each such entry is repaired or removed, counted in `queue_unreadable_entries_total`
//! and logged once with its order id; PostgreSQL still has the order, and the reconciler re-pushes it.

use std::{
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use orders_core::queue::QueueKeys;
use redis::{FromRedisValue, Script, aio::ConnectionManager};

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
static EXAMINE_JOBS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/examine_jobs.lua")));
static FORGET_ORPHANS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/forget_orphans.lua")));
static FORGET_STRAY_JOB_META: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/forget_stray_job_meta.lua")));

/// Most calls of the examining script over the active list per heal: with [`BATCH`] entries each, a queue
/// within its bound (`QUEUE_MAX_JOBS`, at most 5,000) is examined whole every heal.
const MAX_EXAMINE_CALLS: usize = 5;
/// Data entries one heal looks at for jobs no container refers to.
const ORPHAN_SCAN_COUNT: usize = 500;
/// apalis-redis's own key listing every queue's workers set (written when a worker registers).
const APALIS_QUEUES: &str = "core:apalis:queues:list";

/// An entry of the queue that apalis-redis could not have read, and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The job's id, or the key that held a value of another type.
    pub entry: String,
    /// What was wrong: `no_data`, `bad_data`, `bad_id`, `duplicate`, `no_meta`, `bad_meta`, `wrong_type`,
    /// `orphan_data` (data no container refers to) or `stray_meta` (metadata of a job with no data).
    pub problem: String,
    /// The job's order, when its data still said which.
    pub order_id: Option<String>,
    /// `removed` (the order is re-pushed from PostgreSQL), `repaired` (the job stays) or `deleted` (a key).
    pub action: String,
}

impl Finding {
    fn new(entry: String, problem: &str, order_id: String, action: &str) -> Self {
        Self {
            entry,
            problem: problem.to_owned(),
            order_id: (!order_id.is_empty()).then_some(order_id),
            action: action.to_owned(),
        }
    }

    /// Counts it in `queue_unreadable_entries_total` and logs it: one line per entry, once, since each is
    /// repaired or removed as it is found.
    fn report(&self) {
        metrics::counter!("queue_unreadable_entries_total", "problem" => self.problem.clone())
            .increment(1);
        tracing::warn!(
            entry = %self.entry,
            order_id = self.order_id.as_deref().unwrap_or("unknown"),
            problem = %self.problem,
            action = %self.action,
            "queue: unreadable entry {}; PostgreSQL re-drives its order",
            self.action
        );
    }
}

/// Every problem [`Finding::problem`] names, for describing the metric with zeros.
pub const PROBLEMS: [&str; 9] = [
    "no_data",
    "bad_data",
    "bad_id",
    "duplicate",
    "no_meta",
    "bad_meta",
    "wrong_type",
    "orphan_data",
    "stray_meta",
];

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
    /// Unreadable entries repaired or removed.
    pub healed: usize,
}

/// Sweeps one queue's Redis keys. Cheap to clone; each clone scans on its own.
#[derive(Debug, Clone)]
pub struct Janitor {
    conn: ConnectionManager,
    keys: Arc<QueueKeys>,
    /// A registration silent this long belongs to a dead worker.
    dead_after: Duration,
    scan_cursor: u64,
    /// Where the next heal goes on examining the active list, the scheduled set and the data hash.
    active_cursor: usize,
    scheduled_cursor: usize,
    data_cursor: String,
    /// The SCAN cursor over the jobs' metadata hashes.
    meta_cursor: u64,
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
            active_cursor: 0,
            scheduled_cursor: 0,
            data_cursor: "0".to_owned(),
            meta_cursor: 0,
        }
    }

    /// One bounded round of housekeeping. Stops at the first Redis error (the next round starts over).
    pub async fn sweep(&mut self) -> redis::RedisResult<Sweep> {
        let healed = self.heal().await?;
        let mut sweep = Sweep {
            healed,
            promoted: self.promote_if_piled_up().await?,
            purged: self.purge_finished().await?,
            ..Sweep::default()
        };
        sweep.retired = self.retire_dead_workers().await?;
        sweep.stray_metadata = self.forget_stray_metadata().await?;
        Ok(sweep)
    }

    /// Repairs or removes what apalis-redis could not read, a bounded step of each kind: keys holding another
    /// type, unreadable entries of the active list (whole, within the queue's bound) and of the scheduled set,
    /// a page of data entries no container refers to, and a SCAN step over the jobs' metadata. Each finding is
    /// counted and logged. Returns how many there were.
    pub async fn heal(&mut self) -> redis::RedisResult<usize> {
        let mut findings = self.check_key_types().await?;
        for _ in 0..MAX_EXAMINE_CALLS {
            let (next, found) = self
                .examine(self.keys.active.clone(), "list", self.active_cursor)
                .await?;
            findings.extend(found);
            self.active_cursor = next;
            if next == 0 {
                break;
            }
        }
        let (next, found) = self
            .examine(self.keys.scheduled.clone(), "zset", self.scheduled_cursor)
            .await?;
        self.scheduled_cursor = next;
        findings.extend(found);
        findings.extend(self.forget_orphans().await?);
        findings.extend(self.forget_stray_job_meta().await?);
        findings.iter().for_each(Finding::report);
        Ok(findings.len())
    }

    /// After a consumer of this process failed while Redis answered: repairs or removes the unreadable entries of
    /// the batch it had fetched (`worker`'s in-flight set: apalis's fetch moves a batch there, then fails on
    /// it), of the head of the active list and of the scheduled set, and keys holding another type. Call it
    /// before [`Self::retire`], which gives the rest of the batch back. Returns how many entries it dealt with.
    pub async fn heal_after_failure(&mut self, worker: &str) -> redis::RedisResult<usize> {
        let mut findings = self.check_key_types().await?;
        findings.extend(
            self.examine(self.keys.inflight_of(worker), "set", 0)
                .await?
                .1,
        );
        findings.extend(self.examine(self.keys.active.clone(), "list", 0).await?.1);
        findings.extend(
            self.examine(self.keys.scheduled.clone(), "zset", 0)
                .await?
                .1,
        );
        findings.iter().for_each(Finding::report);
        Ok(findings.len())
    }

    /// Deletes the queue's fixed keys that hold another type than apalis-redis (or this service) puts there:
    /// every script touching them would fail.
    async fn check_key_types(&mut self) -> redis::RedisResult<Vec<Finding>> {
        let expected = [
            (self.keys.active.as_str(), "list"),
            (self.keys.signal.as_str(), "list"),
            (self.keys.scheduled.as_str(), "zset"),
            (self.keys.workers.as_str(), "zset"),
            (APALIS_QUEUES, "zset"),
            (self.keys.data.as_str(), "hash"),
            (self.keys.done.as_str(), "set"),
            (self.keys.dead.as_str(), "set"),
            (self.keys.backlog.as_str(), "string"),
            (self.keys.feed_lock.as_str(), "string"),
        ];
        let mut pipe = redis::pipe();
        for (key, _) in expected {
            pipe.cmd("TYPE").arg(key);
        }
        let types: Vec<String> = pipe.query_async(&mut self.conn).await?;
        let mut findings = Vec::new();
        for ((key, wanted), actual) in expected.into_iter().zip(types) {
            if actual != "none" && actual != wanted {
                // Only if it still holds that other type: a push may have recreated it meanwhile.
                let deleted: i64 = redis::Script::new(
                    r#"if redis.call("type", KEYS[1])["ok"] == ARGV[1] then return redis.call("del", KEYS[1]) end return 0"#,
                )
                .key(key)
                .arg(&actual)
                .invoke_async(&mut self.conn)
                .await?;
                if deleted > 0 {
                    findings.push(Finding::new(
                        key.to_owned(),
                        "wrong_type",
                        String::new(),
                        "deleted",
                    ));
                }
            }
        }
        Ok(findings)
    }

    /// One call of the examining script over `container` (of Redis type `kind`) from `first`: returns where the
    /// next call goes on (0 at the end) and what it found.
    async fn examine(
        &mut self,
        container: String,
        kind: &str,
        first: usize,
    ) -> redis::RedisResult<(usize, Vec<Finding>)> {
        let reply: Vec<redis::Value> = EXAMINE_JOBS
            .key(container)
            .key(&self.keys.data)
            .arg(&self.keys.meta)
            .arg(kind)
            .arg(first)
            .arg(BATCH)
            .invoke_async(&mut self.conn)
            .await?;
        let mut values = reply.into_iter();
        let next = match values.next() {
            Some(value) => usize::from_redis_value(value)?,
            None => 0,
        };
        let strings = values
            .map(String::from_redis_value)
            .collect::<Result<Vec<_>, _>>()?;
        let findings = strings
            .chunks_exact(4)
            .map(|f| Finding::new(f[0].clone(), &f[1], f[2].clone(), &f[3]))
            .collect();
        Ok((next, findings))
    }

    /// One HSCAN page of the data hash, forgetting jobs no container refers to.
    async fn forget_orphans(&mut self) -> redis::RedisResult<Vec<Finding>> {
        let reply: Vec<String> = FORGET_ORPHANS
            .key(&self.keys.data)
            .key(&self.keys.active)
            .key(&self.keys.scheduled)
            .key(&self.keys.done)
            .key(&self.keys.dead)
            .key(&self.keys.workers)
            .arg(&self.data_cursor)
            .arg(ORPHAN_SCAN_COUNT)
            .arg(&self.keys.meta)
            .arg(&self.keys.inflight)
            .invoke_async(&mut self.conn)
            .await?;
        let mut values = reply.into_iter();
        self.data_cursor = values.next().unwrap_or_else(|| "0".to_owned());
        let forgotten: Vec<String> = values.collect();
        Ok(forgotten
            .chunks_exact(2)
            .map(|f| Finding::new(f[0].clone(), "orphan_data", f[1].clone(), "removed"))
            .collect())
    }

    /// One SCAN step over the jobs' metadata hashes, deleting those of jobs with no data that are not finished.
    async fn forget_stray_job_meta(&mut self) -> redis::RedisResult<Vec<Finding>> {
        let prefix = format!("{}:", self.keys.meta);
        let (cursor, found) = self.scan_step(self.meta_cursor, &prefix).await?;
        self.meta_cursor = cursor;
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let mut script = FORGET_STRAY_JOB_META.prepare_invoke();
        script
            .key(&self.keys.data)
            .key(&self.keys.done)
            .key(&self.keys.dead)
            .arg(&prefix)
            .arg(&found);
        let deleted: Vec<String> = script.invoke_async(&mut self.conn).await?;
        Ok(deleted
            .into_iter()
            .map(|id| Finding::new(id, "stray_meta", String::new(), "removed"))
            .collect())
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

    /// One SCAN step from `cursor` over the keys that start with `prefix`: the next cursor and the keys found.
    async fn scan_step(
        &mut self,
        cursor: u64,
        prefix: &str,
    ) -> redis::RedisResult<(u64, Vec<String>)> {
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", escape_glob(prefix)))
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut self.conn)
            .await
    }

    /// One SCAN step over the workers' metadata hashes, deleting those of workers no longer registered (apalis
    /// unregisters dead workers itself but leaves their metadata). The cursor carries over between sweeps.
    async fn forget_stray_metadata(&mut self) -> redis::RedisResult<usize> {
        let prefix = format!("{}:", self.keys.worker_metadata);
        let (cursor, found) = self.scan_step(self.scan_cursor, &prefix).await?;
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
