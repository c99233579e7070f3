//! Group commit. Items that reach the database at about the same time (the api's creates and page reads, the
//! worker's claims and completions) share one statement and one commit: under load each item's own commit, not
//! its work, was what PostgreSQL spent its time on. A lone item is not delayed: a batch is whatever is waiting
//! when a statement slot is free, one item included. A batch that fails is retried item by item, so that one row
//! that cannot be written never costs the others theirs.
//!
//! An item is only worth running while its caller still waits for the answer:
//! - **The queue is bounded** (`max_waiting`): one item more is refused at once with [`BatchError::Full`], before
//!   anything is written, instead of waiting behind a backlog it has no time for.
//! - **A caller that stops waiting takes its item back.** Dropping the future of [`Batcher::run`] (a client that
//!   hangs up, a request timeout), or reaching the deadline of [`Batcher::run_until`], gives the item up unless a
//!   statement has taken it already. An item given up is left out of the batches formed after, and of the
//!   item-by-item retries.
//! - **An item is taken right before the commit, not before the statement.** A statement that writes calls
//!   [`Gate::take_all`] between its last statement and its commit: that marks every item of the batch as taken,
//!   or, when one gave up while the statement ran, none, and the statement rolls back and is run again without
//!   it. So once a caller has given up, its item is never committed, then or later; and a caller whose deadline
//!   comes while its item's commit is under way waits for that commit's answer instead (a commit is short: the
//!   statement before it already did the work). The only window left is a future dropped during that commit: a
//!   caller that hangs up then cannot learn the outcome whatever is done here.
//! - **A statement lasts no longer than its items wait**: [`Gate::deadline`] is the latest deadline of the batch, for
//!   the statement's own timeout, so that work nobody waits for is cancelled rather than finished.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use sqlx::{AssertSqlSafe, PgPool, Postgres, pool::PoolConnection};
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};

/// Why a batched statement gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The statement failed; every item of its batch gets the same error. Nothing of the batch was committed,
    /// unless the commit itself lost its connection.
    #[error(transparent)]
    Database(Arc<sqlx::Error>),
    /// The batcher is gone (the runtime is shutting down) or its statement panicked.
    #[error("the batched statement was abandoned")]
    Abandoned,
    /// As many items wait as the batcher allows: this one was refused, and nothing was written for it.
    #[error("too many items are waiting for a batched statement")]
    Full,
    /// The item's deadline came before a statement committed it: nothing was written for it, nor will be.
    #[error("the deadline passed before the item was committed")]
    Expired,
}

/// How a batcher forms and runs its batches.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most items in one statement.
    pub max_batch: usize,
    /// Most statements running at once.
    pub in_flight: usize,
    /// Most items waiting for a statement slot; one more is refused with [`BatchError::Full`]. `usize::MAX` for
    /// no bound (when the callers are bounded already, as the worker's jobs are).
    pub max_waiting: usize,
    /// Whether an item whose caller stopped waiting is still run: only for a statement whose effect is wanted
    /// even when nobody reads its answer (the worker's completions).
    pub run_abandoned: bool,
}

impl Limits {
    /// At most `max_batch` items per statement and `in_flight` statements at once, no bound on the items waiting,
    /// and items given up are not run.
    pub fn new(max_batch: usize, in_flight: usize) -> Self {
        Self {
            max_batch,
            in_flight,
            max_waiting: usize::MAX,
            run_abandoned: false,
        }
    }
}

/// The item waits in the queue or in a statement that has not reached its commit.
const WAITING: u8 = 0;
/// A statement is committing the item: its caller waits for the answer.
const TAKEN: u8 = 1;
/// The caller stopped waiting before the item was taken: it is never committed.
const GAVE_UP: u8 = 2;

/// An item with what its caller waits on.
struct Waiter<I, O> {
    input: I,
    answer: oneshot::Sender<Result<O, BatchError>>,
    deadline: Option<Instant>,
    state: Arc<AtomicU8>,
}

impl<I, O> Waiter<I, O> {
    fn gave_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == GAVE_UP
    }

    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|deadline| deadline <= now)
    }

    fn answer(self, output: Result<O, BatchError>) {
        let _ = self.answer.send(output);
    }
}

/// Handed to each run of a batch's statement, to take its items right before the commit (see the module's
/// notes). A statement that only reads needs none of it.
#[derive(Clone)]
pub struct Gate(Arc<GateInner>);

struct GateInner {
    states: Vec<Arc<AtomicU8>>,
    deadline: Option<Instant>,
    refused: AtomicBool,
}

impl Gate {
    fn new<I, O>(batch: &[Waiter<I, O>]) -> Self {
        // A statement is worth running until the last of its items gives up; one that gives up earlier is left
        // out at the commit (`take_all`) rather than cut short for everyone.
        let deadline = batch
            .iter()
            .map(|waiter| waiter.deadline)
            .try_fold(None::<Instant>, |latest, deadline| {
                deadline
                    .map(|deadline| Some(latest.map_or(deadline, |latest| latest.max(deadline))))
            })
            .flatten();
        Self(Arc::new(GateInner {
            states: batch
                .iter()
                .map(|waiter| Arc::clone(&waiter.state))
                .collect(),
            deadline,
            refused: AtomicBool::new(false),
        }))
    }

    /// The latest deadline of the batch's items: past it nobody waits for the statement. `None` when an item has
    /// none.
    pub fn deadline(&self) -> Option<Instant> {
        self.0.deadline
    }

    /// A pooled connection for the batch's statement; past [`deadline`](Self::deadline) nobody waits for one.
    pub async fn acquire(&self, db: &PgPool) -> sqlx::Result<PoolConnection<Postgres>> {
        match self.0.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, db.acquire())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?,
            None => db.acquire().await,
        }
    }

    /// The `begin` of a transaction whose statements each end by [`deadline`](Self::deadline), and within
    /// `statement_timeout` (the pool's own timeout, which this replaces for the transaction): a statement nobody
    /// waits for any more is cancelled and rolled back rather than finished. For `Connection::begin_with`, once
    /// the connection is acquired.
    pub fn begin_until_deadline(&self, statement_timeout: Duration) -> AssertSqlSafe<String> {
        let timeout = self.0.deadline.map_or(statement_timeout, |deadline| {
            deadline
                .saturating_duration_since(Instant::now())
                .min(statement_timeout)
        });
        // 0 would turn the timeout off.
        let millis = timeout.as_millis().clamp(1, u128::from(i32::MAX as u32));
        AssertSqlSafe(format!("begin; set local statement_timeout = {millis}"))
    }

    /// Takes every item of the batch for its commit; call it after the last statement, right before the commit.
    /// False when an item's caller gave up meanwhile: then no item is taken, the statement must roll back (and may
    /// answer anything), and the batcher runs it again with the items still waiting.
    pub fn take_all(&self) -> bool {
        for (at, state) in self.0.states.iter().enumerate() {
            let taken = state
                .compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
                .map_or_else(|current| current == TAKEN, |_| true);
            if !taken {
                for state in &self.0.states[..at] {
                    let _ =
                        state.compare_exchange(TAKEN, WAITING, Ordering::AcqRel, Ordering::Acquire);
                }
                self.0.refused.store(true, Ordering::Release);
                return false;
            }
        }
        true
    }

    /// Gives the items back after a statement failed (nothing committed): their callers may give up again
    /// until the retry that takes them.
    fn release(&self) {
        for state in &self.0.states {
            let _ = state.compare_exchange(TAKEN, WAITING, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn refused(&self) -> bool {
        self.0.refused.load(Ordering::Acquire)
    }
}

/// Runs one batch; an answer without one output per item is an error.
async fn run_batch<I, O, F, Fut>(run: &F, inputs: Vec<I>, gate: Gate) -> Result<Vec<O>, BatchError>
where
    F: Fn(Vec<I>, Gate) -> Fut,
    Fut: Future<Output = sqlx::Result<Vec<O>>>,
{
    let expected = inputs.len();
    match run(inputs, gate).await {
        Ok(outputs) if outputs.len() == expected => Ok(outputs),
        Ok(_) => Err(BatchError::Abandoned),
        Err(err) => Err(BatchError::Database(Arc::new(err))),
    }
}

/// The items of `batch` still worth running: those given up are dropped (nobody reads their answer) and those
/// past their deadline are answered [`BatchError::Expired`].
fn still_waiting<I, O>(batch: Vec<Waiter<I, O>>, run_abandoned: bool) -> Vec<Waiter<I, O>> {
    let now = Instant::now();
    batch
        .into_iter()
        .filter_map(|waiter| {
            if waiter.gave_up() && !run_abandoned {
                None
            } else if waiter.expired(now) {
                waiter.answer(Err(BatchError::Expired));
                None
            } else {
                Some(waiter)
            }
        })
        .collect()
}

/// Runs `batch` to the end: again without the items given up whenever its gate refused the commit, then item by
/// item if it failed.
async fn settle<I, O, F, Fut>(run: &F, mut batch: Vec<Waiter<I, O>>, run_abandoned: bool)
where
    I: Clone,
    F: Fn(Vec<I>, Gate) -> Fut,
    Fut: Future<Output = sqlx::Result<Vec<O>>>,
{
    loop {
        let gate = Gate::new(&batch);
        let inputs = batch.iter().map(|waiter| waiter.input.clone()).collect();
        let result = run_batch(run, inputs, gate.clone()).await;
        if gate.refused() {
            // Rolled back: each round leaves out at least the item that gave up, so this ends.
            batch = still_waiting(batch, run_abandoned);
            if batch.is_empty() {
                return;
            }
            continue;
        }
        match result {
            Ok(outputs) => {
                for (waiter, output) in batch.into_iter().zip(outputs) {
                    waiter.answer(Ok(output));
                }
                return;
            }
            Err(err) if batch.len() == 1 => {
                gate.release();
                for waiter in batch {
                    waiter.answer(Err(err.clone()));
                }
                return;
            }
            // One bad row (a constraint, a trigger) fails its whole statement: run the items one by one, so that
            // only its own caller gets the error.
            Err(_) => {
                gate.release();
                break;
            }
        }
    }
    for waiter in batch {
        let Some(waiter) = still_waiting(vec![waiter], run_abandoned).pop() else {
            continue;
        };
        let gate = Gate::new(std::slice::from_ref(&waiter));
        let output = run_batch(run, vec![waiter.input.clone()], gate.clone())
            .await
            .and_then(|mut outputs| outputs.pop().ok_or(BatchError::Abandoned));
        if gate.refused() {
            // Its caller gave up while the statement ran: rolled back, and nobody reads this.
            waiter.answer(Err(BatchError::Expired));
        } else {
            if output.is_err() {
                gate.release();
            }
            waiter.answer(output);
        }
    }
}

/// Gives the item up when its caller's future is dropped, unless a statement has taken it.
struct GiveUpOnDrop(Arc<AtomicU8>);

impl GiveUpOnDrop {
    /// Gives the item up; false if a statement has taken it already.
    fn give_up(&self) -> bool {
        match self
            .0
            .compare_exchange(WAITING, GAVE_UP, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(current) => current == GAVE_UP,
        }
    }
}

impl Drop for GiveUpOnDrop {
    fn drop(&mut self) {
        self.give_up();
    }
}

/// Sends items to a background task that runs them in batches (see the module's notes and [`Limits`]). Cheap to
/// clone; the task ends when the last clone is dropped.
pub struct Batcher<I, O> {
    items: mpsc::UnboundedSender<Waiter<I, O>>,
    /// Items sent and not yet received by the task: at most `max_waiting`.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            items: self.items.clone(),
            waiting: Arc::clone(&self.waiting),
            max_waiting: self.max_waiting,
        }
    }
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .field("max_waiting", &self.max_waiting)
            .finish_non_exhaustive()
    }
}

impl<I: Clone + Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the batching task on the current Tokio runtime. `run` gets a batch and its [`Gate`] and answers
    /// with one output per item, in the same order; a statement that writes calls [`Gate::take_all`] right
    /// before its commit.
    pub fn spawn<F, Fut>(limits: Limits, run: F) -> Self
    where
        F: Fn(Vec<I>, Gate) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = sqlx::Result<Vec<O>>> + Send + 'static,
    {
        let (items, mut queue) = mpsc::unbounded_channel::<Waiter<I, O>>();
        let waiting = Arc::new(AtomicUsize::new(0));
        let run = Arc::new(run);
        let slots = Arc::new(Semaphore::new(limits.in_flight.max(1)));
        let max_batch = limits.max_batch.max(1);
        let run_abandoned = limits.run_abandoned;
        let received = Arc::clone(&waiting);
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                received.fetch_sub(1, Ordering::AcqRel);
                // While every slot is busy, more items queue up: the busier, the larger the next batch.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = still_waiting(vec![first], run_abandoned);
                while batch.len() < max_batch {
                    match queue.try_recv() {
                        Ok(item) => {
                            received.fetch_sub(1, Ordering::AcqRel);
                            batch.extend(still_waiting(vec![item], run_abandoned));
                        }
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let run = run.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    settle(run.as_ref(), batch, run_abandoned).await;
                });
            }
        });
        Self {
            items,
            waiting,
            max_waiting: limits.max_waiting,
        }
    }

    /// Runs `item` in the next batch and returns its output. If its batch fails, each of the batch's items is
    /// run again alone, so a failure is only ever reported to the item that causes it. Dropping the future
    /// before a statement has taken the item gives it up.
    pub async fn run(&self, item: I) -> Result<O, BatchError> {
        self.submit(item, None).await
    }

    /// Like [`run`](Self::run), giving the item up at `deadline` unless a statement has taken it by then:
    /// [`BatchError::Expired`] means that nothing was written for it, then or later. An item taken for a commit
    /// when its deadline comes waits for that commit's answer.
    pub async fn run_until(&self, item: I, deadline: Instant) -> Result<O, BatchError> {
        self.submit(item, Some(deadline)).await
    }

    async fn submit(&self, item: I, deadline: Option<Instant>) -> Result<O, BatchError> {
        if deadline.is_some_and(|deadline| deadline <= Instant::now()) {
            return Err(BatchError::Expired);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(BatchError::Full);
        }
        let state = Arc::new(AtomicU8::new(WAITING));
        let (answer, mut answered) = oneshot::channel();
        let waiter = Waiter {
            input: item,
            answer,
            deadline,
            state: Arc::clone(&state),
        };
        if self.items.send(waiter).is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(BatchError::Abandoned);
        }
        let waiting = GiveUpOnDrop(state);
        let Some(deadline) = deadline else {
            return answered.await.map_err(|_| BatchError::Abandoned)?;
        };
        match tokio::time::timeout_at(deadline, &mut answered).await {
            Ok(answer) => answer.map_err(|_| BatchError::Abandoned)?,
            Err(_) if waiting.give_up() => Err(BatchError::Expired),
            // Taken for a commit under way: its answer tells whether the item was committed.
            Err(_) => answered.await.map_err(|_| BatchError::Abandoned)?,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Instant as StdInstant};

    use super::*;

    /// What a fake statement committed, in order.
    type Committed = Arc<Mutex<Vec<u32>>>;

    /// A batcher whose "statement" waits until `release` is notified (when `hold` is set), then commits its items
    /// if its gate lets it: it records them in `committed`. One statement at a time.
    fn holding_batcher(
        max_waiting: usize,
        hold: Arc<tokio::sync::Notify>,
        held: bool,
    ) -> (Batcher<u32, u32>, Committed, Arc<AtomicUsize>) {
        let committed = Committed::default();
        let statements = Arc::new(AtomicUsize::new(0));
        let limits = Limits {
            max_waiting,
            ..Limits::new(16, 1)
        };
        let (recorded, counted) = (Arc::clone(&committed), Arc::clone(&statements));
        let batcher = Batcher::spawn(limits, move |items: Vec<u32>, gate: Gate| {
            let (recorded, counted, hold) = (recorded.clone(), counted.clone(), hold.clone());
            async move {
                let first = counted.fetch_add(1, Ordering::AcqRel) == 0;
                if held && first {
                    hold.notified().await;
                }
                if !gate.take_all() {
                    return Ok(Vec::new());
                }
                recorded.lock().unwrap().extend(&items);
                Ok(items)
            }
        });
        (batcher, committed, statements)
    }

    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let started = StdInstant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(10), "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn an_item_given_up_while_it_queues_is_never_run() {
        let hold = Arc::new(tokio::sync::Notify::new());
        let (batcher, committed, statements) = holding_batcher(usize::MAX, hold.clone(), true);
        // 1 is held in the first statement; 2 and 3 queue behind it and share the second.
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.run(1).await }
        });
        eventually("the first statement starts", || {
            statements.load(Ordering::Acquire) == 1
        })
        .await;
        let deadline = Instant::now() + Duration::from_millis(50);
        let second = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.run_until(2, deadline).await }
        });
        let third = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.run(3).await }
        });
        // 2 gives up at its deadline, while 1's statement still holds the only slot.
        assert!(matches!(second.await.unwrap(), Err(BatchError::Expired)));
        hold.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(third.await.unwrap().unwrap(), 3);
        assert_eq!(*committed.lock().unwrap(), [1, 3]);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_mid_statement_makes_it_roll_back_and_run_again_without_it() {
        let hold = Arc::new(tokio::sync::Notify::new());
        let (batcher, committed, statements) = holding_batcher(usize::MAX, hold.clone(), true);
        // Both items are in the first (held) statement; one caller hangs up, the other waits.
        let dropped = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.run(1).await }
        });
        let waiting = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.run(2).await }
        });
        eventually("the first statement starts", || {
            statements.load(Ordering::Acquire) == 1
        })
        .await;
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        hold.notify_one();
        let answer = waiting.await.unwrap().unwrap();
        assert_eq!(answer, 2);
        // The first statement was refused its commit whichever items it held; 1 was never committed.
        assert_eq!(*committed.lock().unwrap(), [2]);
        assert!(statements.load(Ordering::Acquire) >= 2);
    }

    #[tokio::test]
    async fn an_item_past_its_deadline_is_never_run() {
        let hold = Arc::new(tokio::sync::Notify::new());
        let (batcher, committed, _) = holding_batcher(usize::MAX, hold, false);
        let past = Instant::now();
        assert!(matches!(
            batcher.run_until(7, past).await,
            Err(BatchError::Expired)
        ));
        assert_eq!(batcher.run(8).await.unwrap(), 8);
        assert_eq!(*committed.lock().unwrap(), [8]);
    }

    #[tokio::test]
    async fn past_max_waiting_an_item_is_refused_at_once_and_never_run() {
        let hold = Arc::new(tokio::sync::Notify::new());
        let (batcher, committed, statements) = holding_batcher(1, hold.clone(), true);
        let held = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.run(1).await }
        });
        eventually("the first statement starts", || {
            statements.load(Ordering::Acquire) == 1
        })
        .await;
        // The task takes one more item off the queue while it waits for the slot, and the queue holds one: of
        // six more items, two at most wait, and the others are refused on their first poll.
        let mut queued = Vec::new();
        let mut refused = Vec::new();
        for item in 2..8 {
            let batcher = batcher.clone();
            let mut task = Box::pin(async move { batcher.run(item).await });
            let first_poll =
                std::future::poll_fn(|cx| std::task::Poll::Ready(task.as_mut().poll(cx))).await;
            match first_poll {
                std::task::Poll::Ready(answer) => {
                    assert!(matches!(answer, Err(BatchError::Full)), "{answer:?}");
                    refused.push(item);
                }
                std::task::Poll::Pending => queued.push((item, tokio::spawn(task))),
            }
            // Lets the task take an item off the queue.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused.len() >= 4, "refused {refused:?}");
        hold.notify_one();
        assert_eq!(held.await.unwrap().unwrap(), 1);
        for (item, task) in queued {
            assert_eq!(task.await.unwrap().unwrap(), item);
        }
        let committed = committed.lock().unwrap();
        assert!(
            refused.iter().all(|item| !committed.contains(item)),
            "{committed:?}"
        );
    }
}
