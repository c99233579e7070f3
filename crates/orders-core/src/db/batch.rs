//! Group commit for the worker's transitions. Jobs that claim (or complete) their orders at about the same time
//! have their updates coalesced into one statement and one commit: under a backlog each job's two commits, not
//! its work, were what PostgreSQL spent its time on. A lone job is not delayed: a batch is whatever is waiting
//! when a statement slot is free, one job included. A batch that fails is retried item by item, so that one
//! order that cannot move never costs the others an attempt.

use std::{future::Future, sync::Arc};

use tokio::sync::{Semaphore, mpsc, oneshot};

/// Why a batched statement gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The statement failed; every job of its batch gets the same error.
    #[error(transparent)]
    Database(Arc<sqlx::Error>),
    /// The batcher is gone (the runtime is shutting down) or its statement panicked.
    #[error("the batched statement was abandoned")]
    Abandoned,
}

/// Runs one batch; an answer without one output per item is an error.
async fn run_batch<I, O, F, Fut>(run: &F, inputs: Vec<I>) -> Result<Vec<O>, BatchError>
where
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = sqlx::Result<Vec<O>>>,
{
    let expected = inputs.len();
    match run(inputs).await {
        Ok(outputs) if outputs.len() == expected => Ok(outputs),
        Ok(_) => Err(BatchError::Abandoned),
        Err(err) => Err(BatchError::Database(Arc::new(err))),
    }
}

type Waiter<I, O> = (I, oneshot::Sender<Result<O, BatchError>>);

/// Sends items to a background task that runs them in batches of at most `max_batch`, with at most `in_flight`
/// batches running at once. Cheap to clone; the task ends when the last clone is dropped.
pub struct Batcher<I, O> {
    items: mpsc::UnboundedSender<Waiter<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            items: self.items.clone(),
        }
    }
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<I: Clone + Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the batching task on the current Tokio runtime. `run` gets a batch and answers with one output per
    /// item, in the same order.
    pub fn spawn<F, Fut>(max_batch: usize, in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = sqlx::Result<Vec<O>>> + Send + 'static,
    {
        let (items, mut queue) = mpsc::unbounded_channel::<Waiter<I, O>>();
        let run = Arc::new(run);
        let slots = Arc::new(Semaphore::new(in_flight.max(1)));
        let max_batch = max_batch.max(1);
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                // While every slot is busy, more items queue up: the busier, the larger the next batch.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match queue.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let run = run.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let (inputs, waiters): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
                    match run_batch(run.as_ref(), inputs.clone()).await {
                        Ok(outputs) => {
                            for (waiter, output) in waiters.into_iter().zip(outputs) {
                                let _ = waiter.send(Ok(output));
                            }
                        }
                        Err(err) if waiters.len() == 1 => {
                            for waiter in waiters {
                                let _ = waiter.send(Err(err.clone()));
                            }
                        }
                        // One bad row (a constraint, a trigger) fails its whole statement: run the items one by
                        // one, so that only its own job fails and the others' attempts are not spent on it.
                        Err(_) => {
                            for (input, waiter) in inputs.into_iter().zip(waiters) {
                                let output = run_batch(run.as_ref(), vec![input]).await.and_then(
                                    |mut outputs| outputs.pop().ok_or(BatchError::Abandoned),
                                );
                                let _ = waiter.send(output);
                            }
                        }
                    }
                });
            }
        });
        Self { items }
    }

    /// Runs `item` in the next batch and returns its output. If its batch fails, each of the batch's items is
    /// run again alone, so a failure is only ever reported to the item that causes it.
    pub async fn run(&self, item: I) -> Result<O, BatchError> {
        let (answer, answered) = oneshot::channel();
        self.items
            .send((item, answer))
            .map_err(|_| BatchError::Abandoned)?;
        answered.await.map_err(|_| BatchError::Abandoned)?
    }
}
