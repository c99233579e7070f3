//! Where apalis-redis keeps a queue's state, and the two keys of our own (under `<queue>:feeder:`). apalis stays
//! unpatched: the worker's housekeeping (`worker::janitor`) works on these keys with scripts of its own, so
//! this is the contract with apalis-redis 1.0's layout. The names come from `apalis_redis::Config`'s accessors
//! where it has one; the rest are built here the way apalis builds them. The layout tests in the worker's suite
//! pin every name and what apalis stores under it, so an upgrade that changes the layout fails loudly.

use apalis_redis::Config;

/// The Redis keys of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    /// LIST of job ids ready to be fetched, oldest at the head.
    pub active: String,
    /// ZSET of job ids by the second they may run (every push lands here first, retries too).
    pub scheduled: String,
    /// HASH job id → job JSON.
    pub data: String,
    /// Prefix of the per-job HASH `<meta>:<job id>` (status, attempts, result).
    pub meta: String,
    /// SET of job ids that finished well.
    pub done: String,
    /// SET of job ids that failed for good (aborted, or out of retries).
    pub dead: String,
    /// ZSET of worker names by their last heartbeat (unix seconds).
    pub workers: String,
    /// Prefix of the per-worker HASH `<worker_metadata>:<worker>`.
    pub worker_metadata: String,
    /// Prefix of the per-worker SET `<inflight>:<worker>` of jobs it fetched and has not acknowledged.
    pub inflight: String,
    /// LIST apalis uses as a "jobs available" flag.
    pub signal: String,
    /// Ours: a flag the reconciler sets while orders wait in PostgreSQL for room in Redis, so that the api
    /// leaves new orders to it too and the backlog is fed oldest first.
    pub backlog: String,
    /// Ours: held by the one reconciler feeding the queue at a time, so that several workers do not each fill
    /// the same room and overshoot `QUEUE_MAX_JOBS`.
    pub feed_lock: String,
    /// Ours: prefix of the per-worker HASH `<console_worker>:<worker>` each worker process publishes for the
    /// operations console (host, start, in-flight and done counts), expiring unless renewed.
    pub console_worker: String,
    /// Ours: ZSET of the worker processes that publish to the console, by their last publication (unix ms).
    pub console_workers: String,
}

impl QueueKeys {
    /// The keys of the queue `config` names.
    pub fn new(config: &Config) -> Self {
        let workers = config.workers_set();
        Self {
            active: config.active_jobs_list(),
            scheduled: config.scheduled_jobs_set(),
            data: config.job_data_hash(),
            meta: config.job_meta_hash(),
            done: config.done_jobs_set(),
            dead: config.dead_jobs_set(),
            worker_metadata: format!("{workers}:metadata"),
            workers,
            inflight: config.inflight_jobs_set(),
            signal: config.signal_list(),
            backlog: format!("{}:feeder:backlog", config.queue.as_ref()),
            feed_lock: format!("{}:feeder:lock", config.queue.as_ref()),
            console_worker: format!("{}:console:worker", config.queue.as_ref()),
            console_workers: format!("{}:console:workers", config.queue.as_ref()),
        }
    }

    /// The SET of jobs `worker` has fetched and not yet acknowledged.
    pub fn inflight_of(&self, worker: &str) -> String {
        format!("{}:{worker}", self.inflight)
    }

    /// The metadata HASH apalis writes when `worker` registers.
    pub fn metadata_of(&self, worker: &str) -> String {
        format!("{}:{worker}", self.worker_metadata)
    }

    /// The console's HASH of one worker process.
    pub fn console_worker_of(&self, worker: &str) -> String {
        format!("{}:{worker}", self.console_worker)
    }

    /// The metadata HASH of one job.
    pub fn meta_of(&self, job_id: &str) -> String {
        format!("{}:{job_id}", self.meta)
    }
}
