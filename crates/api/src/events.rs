//! Live order status for server-sent events: one `LISTEN order_events` connection per api process, whose
//! changes go to the streams watching that order or that user (and to no other), and the bounds on how many
//! streams are open.
//!
//! PostgreSQL announces each status change when the transaction that makes it commits (a trigger on
//! `order_status_history`), so a change made by any worker or any api replica reaches the streams of every
//! replica. Notifications are not stored: when the listener first listens and each time it listens again, or when a
//! stream falls [`WATCHER_CAPACITY`] changes behind, the stream is told to catch up ([`Signal::CatchUp`]) and reads
//! what it may have missed back from `order_status_history` (after the last id it sent, or for a stream of a
//! user's orders, after its floor).
//!
//! Each stream has one small [`Inbox`] that the hub fills and wakes: its changes, the call to catch up, and the
//! end at shutdown. An open stream costs memory for as long as it is open (10,000 of them on one process), so
//! this is deliberately less than a channel, a broadcast receiver and a cancellation future each.
//!
//! The per-user bound is counted over every process in Redis ([`shared`]) as well as in each process.
//!
//! The listener proves its connection alive and replaces it when it is not ([`listener`]). Reads of the history
//! run on the pool the requests use, a few at a time ([`HISTORY_READS`]): after a reconnect every open stream
//! reads at once, and 20,000 reads queued for the pool would time out, close their streams, and keep the requests
//! from a connection meanwhile.
//!
//! A stream lasts no longer than the authority it was opened with ([`authority`]): it ends when its token
//! expires, and within a few seconds of its session ending (a logout, or a reuse that revoked it).

pub mod authority;
pub mod listener;
pub mod shared;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    task::{Context, Poll, Waker},
    time::Duration,
};

use axum::Extension;
use orders_core::{
    db::events::StatusChange,
    domain::{OrderId, UserId},
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;

use self::authority::Authority;
use self::shared::{Shared, SharedSlot, SharedSlots};
use crate::{error::ApiError, rate_limit::RouteLimits, state::AppState};

/// The longest life of one stream (`SSE_MAX_STREAM_SECONDS`); `None`: as long as its authority. Its routes read it
/// as `Extension<MaxLifetime>`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxLifetime(pub Option<Duration>);

/// `routes`, which open streams, within their rate limit `route` (`per_minute` per client), each of their streams
/// lasting at most `max_lifetime` when set.
pub(crate) fn stream_routes(
    per_route: &RouteLimits,
    routes: OpenApiRouter<AppState>,
    route: &'static str,
    per_minute: u32,
    max_lifetime: Option<Duration>,
) -> OpenApiRouter<AppState> {
    per_route
        .apply(routes, route, per_minute)
        .layer(Extension(MaxLifetime(max_lifetime)))
}

/// Changes held per stream; a stream further behind than this reads the rest from the history.
pub const WATCHER_CAPACITY: usize = 64;

/// Streams of one process reading the history at once; the others wait their turn without a connection, so a
/// request waits behind two reads at most and the rest of the pool (10 connections by default) stays free for
/// requests. Each read is one short query (a page at most); catching up is bound by the CPU that sends what was
/// read, not by these turns: 2,000 streams that missed 50 changes each caught up in 8 s in a debug build on two
/// cores with two turns or with four, the requests meanwhile answering within 50 ms with two and 100 ms with four.
pub const HISTORY_READS: usize = 2;

/// What a stream watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// One order's changes.
    Order(OrderId),
    /// The changes of all of one user's orders.
    User(UserId),
}

/// The streams' side of the listener, and their bounds. One per process; cheap to share.
#[derive(Debug)]
pub struct Hub {
    watchers: Mutex<Watchers>,
    open: Mutex<Open>,
    max_per_user: u32,
    max_total: u32,
    /// The per-user count over every process.
    shared: Arc<SharedSlots>,
    /// Turns to read the history ([`HISTORY_READS`]).
    history_reads: Arc<Semaphore>,
    /// When the listener was last known to listen.
    pub listener: listener::ListenerHealth,
    /// Cancelled when the process stops: every stream ends, so a graceful shutdown does not wait on them.
    pub shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct Watchers {
    next_id: u64,
    by_topic: HashMap<Topic, Vec<Watcher>>,
    /// The process is stopping: every inbox is closed, and so is each new one.
    closed: bool,
}

#[derive(Debug)]
struct Watcher {
    id: u64,
    inbox: Arc<Inbox>,
    /// What the stream was opened with: it ends with it.
    authority: Authority,
}

#[derive(Debug, Default)]
struct Open {
    total: u32,
    per_user: HashMap<UserId, u32>,
}

/// What the hub tells a stream, in the order the stream should act on it.
#[derive(Debug)]
pub enum Signal {
    /// The server is stopping: end the stream.
    Stop,
    /// Changes may have been missed (the listener listens for the first time or again, or this stream fell
    /// behind): read the history.
    CatchUp,
    /// The next change of the stream's topic, as PostgreSQL announced it (shared: one change may go to many
    /// streams).
    Change(Arc<StatusChange>),
}

/// One stream's inbox, filled by the hub and read by the stream.
#[derive(Debug, Default)]
pub struct Inbox(Mutex<InboxState>);

#[derive(Debug, Default)]
struct InboxState {
    changes: VecDeque<Arc<StatusChange>>,
    catch_up: bool,
    closed: bool,
    /// The stream waiting for one of the above.
    waker: Option<Waker>,
}

impl Inbox {
    fn state(&self) -> MutexGuard<'_, InboxState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes `state` and wakes the stream if it waits.
    fn update(&self, change: impl FnOnce(&mut InboxState)) {
        let waker = {
            let mut state = self.state();
            change(&mut state);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Adds `change`, or, when [`WATCHER_CAPACITY`] changes wait already, tells the stream to catch up instead.
    fn deliver(&self, change: &Arc<StatusChange>) {
        self.update(|state| {
            if state.changes.len() < WATCHER_CAPACITY {
                state.changes.push_back(change.clone());
            } else {
                state.catch_up = true;
            }
        });
    }

    /// The next signal, or `Pending` (the stream is woken when one comes).
    pub fn poll_signal(&self, cx: &mut Context<'_>) -> Poll<Signal> {
        let mut state = self.state();
        if state.closed {
            return Poll::Ready(Signal::Stop);
        }
        if std::mem::take(&mut state.catch_up) {
            return Poll::Ready(Signal::CatchUp);
        }
        if let Some(change) = state.changes.pop_front() {
            if state.changes.is_empty() {
                // Most streams are idle most of the time: an empty inbox holds no memory.
                state.changes = VecDeque::new();
            }
            return Poll::Ready(Signal::Change(change));
        }
        match &mut state.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            None => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// One stream's feed: its [`Inbox`], registered with the hub under its topic until dropped.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    topic: Topic,
    id: u64,
    inbox: Arc<Inbox>,
}

impl Subscription {
    /// What the stream watches.
    pub fn topic(&self) -> Topic {
        self.topic
    }

    /// The next signal for this stream, or `Pending`.
    pub fn poll_signal(&self, cx: &mut Context<'_>) -> Poll<Signal> {
        self.inbox.poll_signal(cx)
    }

    /// Whether the server is stopping.
    pub fn is_closed(&self) -> bool {
        self.inbox.state().closed
    }

    /// The turns to read the history, shared by every stream of the process: hold one while a read runs.
    pub fn history_reads(&self) -> Arc<Semaphore> {
        self.hub.history_reads.clone()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watchers = self.hub.watchers();
        if let Some(list) = watchers.by_topic.get_mut(&self.topic) {
            list.retain(|watcher| watcher.id != self.id);
            if list.is_empty() {
                watchers.by_topic.remove(&self.topic);
            }
        }
    }
}

impl Hub {
    /// A hub allowing `max_per_user` streams per user and `max_total` in all.
    ///
    /// The per-user bound is also counted over every process sharing `shared`; its leases are renewed until the
    /// hub's `shutdown`.
    pub fn new(max_per_user: u32, max_total: u32, shared: Arc<SharedSlots>) -> Arc<Self> {
        let shutdown = CancellationToken::new();
        shared.spawn_renewals(shutdown.clone());
        let hub = Arc::new(Self {
            watchers: Mutex::default(),
            open: Mutex::default(),
            max_per_user,
            max_total,
            shared,
            history_reads: Arc::new(Semaphore::new(HISTORY_READS)),
            listener: listener::ListenerHealth::default(),
            shutdown: shutdown.clone(),
        });
        let stopping: Weak<Self> = Arc::downgrade(&hub);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            if let Some(hub) = stopping.upgrade() {
                hub.close_all();
            }
        });
        hub
    }

    fn watchers(&self) -> MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes of `topic` from now on, for as long as `authority` holds.
    pub fn subscribe(self: &Arc<Self>, topic: Topic, authority: Authority) -> Subscription {
        let mut watchers = self.watchers();
        let inbox = Arc::new(Inbox::default());
        // Stopping already: the stream ends at once rather than hold the shutdown up.
        inbox.state().closed = watchers.closed;
        watchers.next_id += 1;
        let id = watchers.next_id;
        watchers.by_topic.entry(topic).or_default().push(Watcher {
            id,
            inbox: inbox.clone(),
            authority,
        });
        Subscription {
            hub: self.clone(),
            topic,
            id,
            inbox,
        }
    }

    /// Hands each change to the streams of its order and of its owner, under one lock.
    fn dispatch(&self, changes: Vec<StatusChange>) {
        let watchers = self.watchers();
        for change in changes.into_iter().map(Arc::new) {
            for topic in [
                Topic::Order(change.order.id),
                Topic::User(change.order.user_id),
            ] {
                for watcher in watchers.by_topic.get(&topic).into_iter().flatten() {
                    watcher.inbox.deliver(&change);
                }
            }
        }
    }

    /// Tells every stream to read the history: the listener (re)connected, and changes may have gone unheard.
    fn catch_up_all(&self) {
        for watcher in self.watchers().by_topic.values().flatten() {
            watcher.inbox.update(|state| state.catch_up = true);
        }
    }

    /// Ends the streams whose authority `ended` says has ended; returns how many.
    pub fn end_where(&self, mut ended: impl FnMut(&Authority) -> bool) -> usize {
        let mut count = 0;
        for watcher in self.watchers().by_topic.values().flatten() {
            if ended(&watcher.authority) {
                watcher.inbox.update(|state| state.closed = true);
                count += 1;
            }
        }
        count
    }

    /// The sessions the open streams were opened in, each once.
    pub fn sessions(&self) -> Vec<uuid::Uuid> {
        let mut sessions: Vec<uuid::Uuid> = self
            .watchers()
            .by_topic
            .values()
            .flatten()
            .filter_map(|watcher| watcher.authority.session)
            .collect();
        sessions.sort_unstable();
        sessions.dedup();
        sessions
    }

    /// Ends every stream, and each one opened from now on.
    fn close_all(&self) {
        let mut watchers = self.watchers();
        watchers.closed = true;
        for watcher in watchers.by_topic.values().flatten() {
            watcher.inbox.update(|state| state.closed = true);
        }
    }

    /// Takes a slot for a new stream of `user`, released when the slot is dropped: within this process's bounds,
    /// then within the user's bound over every process (unless Redis does not answer).
    pub async fn open(self: &Arc<Self>, user: UserId) -> Result<Slot, ApiError> {
        let mut slot = self.open_here(user)?;
        match self.shared.open(user, self.max_per_user).await {
            Shared::Granted(place) => slot.shared = Some(place),
            Shared::Refused => return Err(ApiError::TooManyStreams(self.max_per_user)),
            Shared::Unknown(place) => slot.shared = Some(place),
        }
        Ok(slot)
    }

    fn open_here(self: &Arc<Self>, user: UserId) -> Result<Slot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max_total {
            return Err(ApiError::StreamsFull);
        }
        let mine = open.per_user.entry(user).or_default();
        if *mine >= self.max_per_user {
            return Err(ApiError::TooManyStreams(self.max_per_user));
        }
        *mine += 1;
        open.total += 1;
        metrics::gauge!("sse_streams_open").set(f64::from(open.total));
        Ok(Slot {
            hub: self.clone(),
            user,
            shared: None,
        })
    }

    fn close(&self, user: UserId) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(mine) = open.per_user.get_mut(&user) {
            *mine -= 1;
            if *mine == 0 {
                open.per_user.remove(&user);
            }
        }
        metrics::gauge!("sse_streams_open").set(f64::from(open.total));
    }
}

/// One open stream's place in the bounds.
#[derive(Debug)]
pub struct Slot {
    hub: Arc<Hub>,
    user: UserId,
    shared: Option<SharedSlot>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hub.close(self.user);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The hub's side of a stream, against the real Redis of `REDIS_URL` (for the shared count the hub keeps).

    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        task::Wake,
        time::Duration,
    };

    use chrono::Utc;
    use orders_core::domain::{Order, OrderStatus};

    use super::*;

    async fn hub() -> Arc<Hub> {
        Hub::new(10, 100, shared::tests::slots().await.0)
    }

    /// Change `id`, to `status`, of a widget `order` of `user`.
    pub(crate) fn change(
        id: i64,
        order: OrderId,
        user: UserId,
        status: OrderStatus,
    ) -> StatusChange {
        StatusChange {
            id,
            order: Order {
                id: order,
                user_id: user,
                product_name: "Widget".into(),
                amount: 1.into(),
                status,
                created_at: Utc::now(),
                updated_at: Utc::now(),
            },
        }
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(feed: &Subscription, wakes: &Arc<Wakes>) -> Poll<Signal> {
        let waker = Waker::from(wakes.clone());
        feed.poll_signal(&mut Context::from_waker(&waker))
    }

    fn change_id(signal: Poll<Signal>) -> i64 {
        match signal {
            Poll::Ready(Signal::Change(change)) => change.id,
            other => panic!("not a change: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_change_goes_to_the_streams_of_its_order_and_of_its_owner_and_wakes_them() {
        let hub = hub().await;
        let (order, user) = (OrderId::new(), UserId::new());
        let of_order = hub.subscribe(Topic::Order(order), Authority::LASTING);
        let of_user = hub.subscribe(Topic::User(user), Authority::LASTING);
        let of_another = hub.subscribe(Topic::User(UserId::new()), Authority::LASTING);
        let wakes = Arc::new(Wakes::default());
        for feed in [&of_order, &of_user, &of_another] {
            assert!(poll(feed, &wakes).is_pending());
        }

        hub.dispatch(vec![
            change(1, order, user, OrderStatus::Processing),
            change(2, order, user, OrderStatus::Processing),
        ]);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            2,
            "each waiting stream once"
        );
        for feed in [&of_order, &of_user] {
            assert_eq!(change_id(poll(feed, &wakes)), 1);
            assert_eq!(change_id(poll(feed, &wakes)), 2);
            assert!(poll(feed, &wakes).is_pending());
        }
        assert!(poll(&of_another, &wakes).is_pending());
    }

    #[tokio::test]
    async fn a_stream_that_falls_behind_is_told_to_catch_up_before_its_held_changes() {
        let hub = hub().await;
        let (order, user) = (OrderId::new(), UserId::new());
        let feed = hub.subscribe(Topic::User(user), Authority::LASTING);
        let changes: Vec<_> = (1..=WATCHER_CAPACITY as i64 + 5)
            .map(|id| change(id, order, user, OrderStatus::Processing))
            .collect();
        hub.dispatch(changes);

        let wakes = Arc::new(Wakes::default());
        assert!(matches!(poll(&feed, &wakes), Poll::Ready(Signal::CatchUp)));
        // The first WATCHER_CAPACITY are held; the rest are for the history to give.
        for id in 1..=WATCHER_CAPACITY as i64 {
            assert_eq!(change_id(poll(&feed, &wakes)), id);
        }
        assert!(poll(&feed, &wakes).is_pending());
    }

    #[tokio::test]
    async fn a_reconnected_listener_tells_every_stream_to_catch_up_once() {
        let hub = hub().await;
        let feeds = [
            hub.subscribe(Topic::Order(OrderId::new()), Authority::LASTING),
            hub.subscribe(Topic::User(UserId::new()), Authority::LASTING),
        ];
        let wakes = Arc::new(Wakes::default());
        for feed in &feeds {
            assert!(poll(feed, &wakes).is_pending());
        }
        hub.catch_up_all();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        for feed in &feeds {
            assert!(matches!(poll(feed, &wakes), Poll::Ready(Signal::CatchUp)));
            assert!(poll(feed, &wakes).is_pending());
        }
    }

    #[tokio::test]
    async fn shutdown_stops_every_stream_and_each_one_opened_after_it() {
        let hub = hub().await;
        let (order, user) = (OrderId::new(), UserId::new());
        let open = hub.subscribe(Topic::Order(order), Authority::LASTING);
        let wakes = Arc::new(Wakes::default());
        assert!(poll(&open, &wakes).is_pending());

        hub.shutdown.cancel();
        for _ in 0..100 {
            if wakes.0.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "the waiting stream is woken"
        );
        // Stopping wins over a change still held.
        hub.dispatch(vec![change(1, order, user, OrderStatus::Processing)]);
        assert!(matches!(poll(&open, &wakes), Poll::Ready(Signal::Stop)));
        let late = hub.subscribe(Topic::Order(order), Authority::LASTING);
        assert!(matches!(poll(&late, &wakes), Poll::Ready(Signal::Stop)));
    }

    #[tokio::test]
    async fn a_dropped_subscription_leaves_the_hub() {
        let hub = hub().await;
        let topic = Topic::User(UserId::new());
        let (first, second) = (
            hub.subscribe(topic, Authority::LASTING),
            hub.subscribe(topic, Authority::LASTING),
        );
        assert_eq!(hub.watchers().by_topic[&topic].len(), 2);
        drop(first);
        assert_eq!(hub.watchers().by_topic[&topic].len(), 1);
        drop(second);
        assert!(!hub.watchers().by_topic.contains_key(&topic));
    }
}
