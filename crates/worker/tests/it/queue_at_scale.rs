//! The queue at scale: backlogs drain, Redis holds state in proportion to the work waiting (never to the
//! history), dead workers' registrations go, a lost job comes back under load, and the parts of apalis-redis's
//! key layout the housekeeping relies on are pinned.

use std::time::Duration;

use orders_core::{
    db::orders as db,
    domain::{Amount, OrderId, ProductName},
    queue::{Admission, QueueKeys},
};
use redis::AsyncCommands;
use rust_decimal::Decimal;
use sqlx::PgPool;
use worker::{Janitor, WorkerSettings};

use crate::helpers::{
    TestQueue, count_with_status, create_and_enqueue, fast_settings, new_user, push_like_the_api,
    spawn_binary, spawn_worker, status_of, transitions, wait_until,
};

/// Settings for draining: no simulated work, many jobs at once, and no re-push while orders wait their turn.
fn drain_settings() -> WorkerSettings {
    let mut settings = fast_settings();
    settings.order_stage_delay_ms = 0;
    settings.worker_concurrency = Some(32);
    settings.reconcile_interval_ms = 500;
    settings.reconcile_redeliver_after_ms = 60_000;
    settings
}

/// `n` PENDING orders of one user, inserted in one statement, oldest first.
async fn bulk_orders(db: &PgPool, n: usize) -> Vec<OrderId> {
    let user = new_user(db).await;
    let name = ProductName::parse("Widget").unwrap();
    let amount = Amount::parse(Decimal::new(1999, 2)).unwrap();
    db::insert_orders_in_bulk(db, user, &name, amount, n)
        .await
        .unwrap()
}

async fn wait_all_completed(db: &PgPool, n: i64, limit: Duration) {
    wait_until(limit, &format!("{n} orders to complete"), || async {
        count_with_status(db, "COMPLETED").await == n
    })
    .await;
    let counts = transitions(db, "COMPLETED").await;
    assert_eq!(counts.len() as i64, n);
    assert!(
        counts.iter().all(|(_, times)| *times == 1),
        "an order completed more than once"
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_backlog_of_12000_orders_created_with_no_worker_drains_when_one_starts(db: PgPool) {
    let queue = TestQueue::new();
    let push = queue.push_queue();
    let ids = bulk_orders(&db, 12_000).await;
    let mut deferred = 0;
    for id in &ids {
        if push_like_the_api(&db, &push, *id).await.unwrap() == Admission::Deferred {
            deferred += 1;
        }
    }
    // Redis holds the bound; the rest wait in PostgreSQL.
    let depth = push.depth(Duration::from_secs(1)).await.unwrap();
    assert_eq!(depth.waiting(), push.max_jobs());
    assert_eq!(deferred, ids.len() - push.max_jobs() as usize);

    let (stop, running) = spawn_worker(&db, &queue.config, drain_settings());
    wait_all_completed(&db, 12_000, Duration::from_secs(300)).await;
    stop.cancel();
    running.await.unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_queue_piled_up_past_what_apalis_can_fetch_still_drains(db: PgPool) {
    // 12,000 jobs due at once in the scheduled set: apalis-redis's fetch would promote them with one Lua
    // `unpack` and fail on every fetch. This is what an older version (or pushing past the bound) leaves.
    let queue = TestQueue::new();
    let push = queue.push_queue();
    let ids = bulk_orders(&db, 12_000).await;
    for chunk in ids.chunks(1000) {
        push.push_orders(chunk, Duration::from_secs(5))
            .await
            .unwrap();
    }
    sqlx::query("update orders set enqueued_at = now()")
        .execute(&db)
        .await
        .unwrap();
    let scheduled: u64 = queue
        .redis()
        .await
        .zcard(queue.keys().scheduled)
        .await
        .unwrap();
    assert_eq!(scheduled, 12_000);

    let (stop, running) = spawn_worker(&db, &queue.config, drain_settings());
    wait_all_completed(&db, 12_000, Duration::from_secs(300)).await;
    stop.cancel();
    running.await.unwrap();
}

/// Keys a queue may keep once nothing waits: the workers set, apalis's signal list, our backlog flag and feed
/// lock and the console's set of workers, plus per live worker its metadata hash, its in-flight set and its console
/// card (the README states this bound).
fn idle_key_bound(live_workers: usize) -> usize {
    5 + 3 * live_workers
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn redis_forgets_finished_jobs_within_two_reconciler_rounds(db: PgPool) {
    let queue = TestQueue::new();
    let push = queue.push_queue();
    for id in bulk_orders(&db, 2_000).await {
        push_like_the_api(&db, &push, id).await.unwrap();
    }
    let peak = queue.existing_keys().await.len();
    assert!(peak > 2_000, "one metadata hash per waiting job: {peak}");

    let settings = drain_settings();
    let round = Duration::from_millis(settings.reconcile_interval_ms);
    let (stop, running) = spawn_worker(&db, &queue.config, settings);
    wait_all_completed(&db, 2_000, Duration::from_secs(120)).await;
    // Acknowledgements are flushed in batches; give them a moment, then two rounds. Wait for the whole idle
    // layout, not just the count: a late acknowledgement can bring `done` back for one more purge.
    let keys_layout = queue.keys();
    let finished = [&keys_layout.data, &keys_layout.done, &keys_layout.dead];
    wait_until(
        round * 2 + Duration::from_secs(2),
        "the queue's keys to shrink back",
        || async {
            let keys = queue.existing_keys().await;
            keys.len() <= idle_key_bound(1)
                && !finished.iter().any(|gone| keys.contains(gone))
                && !keys.iter().any(|key| key.starts_with(&keys_layout.meta))
        },
    )
    .await;
    let keys = queue.existing_keys().await;
    for gone in finished {
        assert!(!keys.contains(gone), "{gone} is still there: {keys:?}");
    }
    assert!(
        !keys.iter().any(|key| key.starts_with(&keys_layout.meta)),
        "{keys:?}"
    );
    stop.cancel();
    running.await.unwrap();
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn registrations_do_not_outlive_their_workers(db: PgPool) {
    let queue = TestQueue::new();

    // 20 workers started and stopped one after another.
    for _ in 0..20 {
        let (stop, running) = spawn_worker(&db, &queue.config, fast_settings());
        wait_until(
            Duration::from_secs(10),
            "the worker to register",
            || async { queue.registered_workers().await.len() == 1 },
        )
        .await;
        stop.cancel();
        running.await.unwrap();
        assert_eq!(queue.registered_workers().await, Vec::<String>::new());
        assert_eq!(queue.worker_metadata_keys().await, Vec::<String>::new());
    }

    // One live worker, and three worker processes killed with SIGKILL once registered.
    let (stop, running) = spawn_worker(&db, &queue.config, fast_settings());
    for killed in 1..=3 {
        let mut doomed = spawn_binary(&db, &queue, 10, 2000);
        wait_until(
            Duration::from_secs(20),
            "the process to register",
            || async { queue.registered_workers().await.len() > killed },
        )
        .await;
        doomed.kill().unwrap();
        doomed.wait().unwrap();
    }
    // The live worker's consumer fails twice (a job whose data is gone fails apalis's fetch): each time it
    // restarts under a new name.
    let mut redis = queue.redis().await;
    for poison in ["01J0000000000000000000POS1", "01J0000000000000000000POS2"] {
        let before = queue.registered_workers().await;
        let _: () = redis.lpush(queue.keys().active, poison).await.unwrap();
        wait_until(
            Duration::from_secs(10),
            "the consumer to restart",
            || async {
                let now = queue.registered_workers().await;
                now.iter().any(|name| !before.contains(name))
            },
        )
        .await;
    }

    // Heartbeat 500 ms: dead after 3 s of silence, removed by the next sweep.
    wait_until(
        Duration::from_secs(20),
        "only the live worker to stay registered",
        || async {
            queue.registered_workers().await.len() == 1
                && queue.worker_metadata_keys().await.len() == 1
        },
    )
    .await;
    let live = queue.registered_workers().await;
    assert!(
        live[0].ends_with("-2"),
        "the live worker's third consumer: {live:?}"
    );
    // The poison is gone and the worker still works.
    let [id] = create_and_enqueue(&db, &queue.push_queue(), 1).await[..] else {
        unreachable!()
    };
    wait_until(Duration::from_secs(10), "the order to complete", || async {
        status_of(&db, id).await == orders_core::domain::OrderStatus::Completed
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    assert_eq!(queue.registered_workers().await, Vec::<String>::new());
}

/// The apalis job id of `order`'s waiting job, if Redis has one.
async fn job_of(queue: &TestQueue, order: OrderId) -> Option<String> {
    let jobs: Vec<(String, String)> = queue
        .redis()
        .await
        .hgetall(queue.keys().data)
        .await
        .unwrap();
    let needle = order.to_string();
    jobs.into_iter()
        .find(|(_, job)| job.contains(&needle))
        .map(|(id, _)| id)
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn a_lost_job_is_pushed_again_while_hundreds_of_others_wait(db: PgPool) {
    let queue = TestQueue::new();
    let push = queue.push_queue();
    let ids = bulk_orders(&db, 300).await;
    for id in &ids {
        assert_eq!(
            push_like_the_api(&db, &push, *id).await.unwrap(),
            Admission::Pushed
        );
    }
    // A slow worker: one order at a time, a second per stage, so hundreds wait throughout.
    let mut settings = fast_settings();
    settings.worker_concurrency = Some(1);
    settings.order_stage_delay_ms = 1000;
    settings.order_lease_ms = 5000;
    settings.reconcile_interval_ms = 200;
    settings.reconcile_redeliver_after_ms = 1000;
    let bound = Duration::from_millis(
        settings.reconcile_redeliver_after_ms + settings.reconcile_interval_ms,
    );
    let (stop, running) = spawn_worker(&db, &queue.config, settings);

    let victim = ids[150];
    let job = job_of(&queue, victim).await.expect("the victim's job");
    let keys = queue.keys();
    let mut redis = queue.redis().await;
    let _: () = redis::pipe()
        .atomic()
        .lrem(&keys.active, 0, &job)
        .zrem(&keys.scheduled, &job)
        .hdel(&keys.data, &job)
        .del(keys.meta_of(&job))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(job_of(&queue, victim).await, None);
    let waiting = push.depth(Duration::from_secs(1)).await.unwrap().waiting();
    assert!(waiting >= 250, "only {waiting} jobs wait");

    wait_until(
        bound + Duration::from_secs(2),
        "the lost job to be pushed again",
        || async { job_of(&queue, victim).await.is_some() },
    )
    .await;
    stop.cancel();
    running.await.unwrap();
}

#[test]
fn the_key_names_the_housekeeping_relies_on_are_apalis_redis_1_0s() {
    let keys = QueueKeys::new(&apalis_redis::Config::default().queue("q"));
    assert_eq!(
        keys,
        QueueKeys {
            active: "q:active".into(),
            scheduled: "q:scheduled".into(),
            data: "q:data".into(),
            meta: "q:meta".into(),
            done: "q:done".into(),
            dead: "q:dead".into(),
            workers: "q:workers".into(),
            worker_metadata: "q:workers:metadata".into(),
            inflight: "q:inflight".into(),
            signal: "q:signal".into(),
            backlog: "q:feeder:backlog".into(),
            feed_lock: "q:feeder:lock".into(),
            console_worker: "q:console:worker".into(),
            console_workers: "q:console:workers".into(),
        }
    );
}

#[sqlx::test(migrator = "orders_core::MIGRATOR")]
async fn apalis_redis_stores_jobs_and_workers_where_the_housekeeping_looks(db: PgPool) {
    let queue = TestQueue::new();
    let keys = queue.keys();
    let mut redis = queue.redis().await;

    // A push: its id in the scheduled set (scored in unix seconds), its JSON in the data hash, a metadata hash.
    let [id] = create_and_enqueue(&db, &queue.push_queue(), 1).await[..] else {
        unreachable!()
    };
    let job = job_of(&queue, id).await.expect("a job in the data hash");
    let score: f64 = redis.zscore(&keys.scheduled, &job).await.unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((score - now).abs() < 5.0, "score {score}, now {now}");
    let data: String = redis.hget(&keys.data, &job).await.unwrap();
    assert!(data.contains(&id.to_string()), "{data}");
    let status: String = redis.hget(keys.meta_of(&job), "status").await.unwrap();
    assert_eq!(status, "Pending");

    // A worker: registered in the workers set (scored in unix seconds) with a metadata hash; while it holds the
    // job, the job's id is in its in-flight set; once done, in the done set with its metadata saying so.
    // A second stage long enough that the test sees the job in flight and stops the worker (and with it the
    // reconciler's purge) before the job is acknowledged, even on a loaded machine.
    let mut settings = fast_settings();
    settings.order_stage_delay_ms = 3000;
    settings.order_lease_ms = 10_000;
    settings.reconcile_interval_ms = 600_000;
    // Room for the job to finish and its acknowledgement to be flushed after the stop, however loaded the machine.
    settings.worker_shutdown_timeout_ms = 30_000;
    let (stop, running) = spawn_worker(&db, &queue.config, settings);
    wait_until(
        Duration::from_secs(10),
        "the job to be in flight",
        || async { status_of(&db, id).await == orders_core::domain::OrderStatus::Processing },
    )
    .await;
    let [worker] = &queue.registered_workers().await[..] else {
        panic!("one worker registered")
    };
    let beat: f64 = redis.zscore(&keys.workers, worker).await.unwrap();
    assert!((beat - now).abs() < 10.0, "heartbeat score {beat}");
    let metadata: bool = redis.exists(keys.metadata_of(worker)).await.unwrap();
    assert!(metadata, "no {}", keys.metadata_of(worker));
    let inflight: bool = redis
        .sismember(keys.inflight_of(worker), &job)
        .await
        .unwrap();
    assert!(inflight, "{job} not in {}", keys.inflight_of(worker));
    // Stopping lets the job finish and be acknowledged; the reconciler (whose sweeps would forget the job at
    // once) stops first.
    stop.cancel();
    running.await.unwrap();
    assert_eq!(
        status_of(&db, id).await,
        orders_core::domain::OrderStatus::Completed
    );
    let done: bool = redis.sismember(&keys.done, &job).await.unwrap();
    assert!(done, "{job} not in {}", keys.done);
    let status: String = redis.hget(keys.meta_of(&job), "status").await.unwrap();
    assert_eq!(status, "Done");

    // A sweep forgets it.
    let connection = orders_core::queue::redis_connection(&queue.config).unwrap();
    let mut janitor = Janitor::new(connection, keys.clone(), Duration::from_secs(60));
    assert_eq!(janitor.purge_finished().await.unwrap(), 1);
    for key in [keys.data.clone(), keys.done.clone(), keys.meta_of(&job)] {
        let exists: bool = redis.exists(&key).await.unwrap();
        assert!(!exists, "{key} is still there");
    }
}
