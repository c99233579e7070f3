//! Status changes as events: what the `order_events` notifications announce (see the migration
//! `20261125000005_order_events.sql`), and the same read back from `order_status_history` for a stream that may
//! have missed some.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgExecutor;

use crate::domain::{OrderId, OrderStatus, UserId};

/// The channel the status changes are announced on.
pub const CHANNEL: &str = "order_events";

/// One status change of one order. Its `id` (the history row's) grows with every change, so a client resumes
/// after the last id it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Announcement")]
pub struct StatusChange {
    /// The `order_status_history` row.
    pub id: i64,
    /// The order.
    pub order_id: OrderId,
    /// Its owner.
    pub user_id: UserId,
    /// Its status from then on.
    pub status: OrderStatus,
    /// When it changed.
    pub changed_at: DateTime<Utc>,
}

/// A notification's payload, as the trigger writes it.
#[derive(Deserialize)]
struct Announcement {
    id: i64,
    order_id: OrderId,
    user_id: UserId,
    status: OrderStatus,
    changed_at_us: i64,
}

impl TryFrom<Announcement> for StatusChange {
    type Error = &'static str;

    fn try_from(a: Announcement) -> Result<Self, Self::Error> {
        Ok(Self {
            id: a.id,
            order_id: a.order_id,
            user_id: a.user_id,
            status: a.status,
            changed_at: DateTime::from_timestamp_micros(a.changed_at_us)
                .ok_or("time out of range")?,
        })
    }
}

impl StatusChange {
    /// Reads a notification's payload.
    pub fn parse(payload: &str) -> serde_json::Result<Self> {
        serde_json::from_str(payload)
    }
}

/// The changes of one order after `after`, oldest first.
pub async fn changes_of_order(
    executor: impl PgExecutor<'_>,
    order_id: OrderId,
    after: i64,
) -> sqlx::Result<Vec<StatusChange>> {
    sqlx::query_as!(
        StatusChange,
        r#"
        select h.id, h.order_id as "order_id: OrderId", o.user_id as "user_id: UserId",
               h.status as "status: OrderStatus", h.changed_at
        from order_status_history h join orders o on o.id = h.order_id
        where h.order_id = $1 and h.id > $2
        order by h.id
        "#,
        order_id as OrderId,
        after,
    )
    .fetch_all(executor)
    .await
}

/// Most changes one read of a user's history returns; a stream further behind reads again from the last.
pub const USER_CHANGES_PAGE: i64 = 500;

/// The changes of a user's orders after `after`, oldest first, at most [`USER_CHANGES_PAGE`].
pub async fn changes_of_user(
    executor: impl PgExecutor<'_>,
    user_id: UserId,
    after: i64,
) -> sqlx::Result<Vec<StatusChange>> {
    sqlx::query_as!(
        StatusChange,
        r#"
        select h.id, h.order_id as "order_id: OrderId", o.user_id as "user_id: UserId",
               h.status as "status: OrderStatus", h.changed_at
        from order_status_history h join orders o on o.id = h.order_id
        where o.user_id = $1 and h.id > $2
        order by h.id
        limit $3
        "#,
        user_id as UserId,
        after,
        USER_CHANGES_PAGE,
    )
    .fetch_all(executor)
    .await
}

/// The id of the last change of one order (0 if it has none yet: a new order is `PENDING` without a row).
pub async fn last_change_of_order(
    executor: impl PgExecutor<'_>,
    order_id: OrderId,
) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"select coalesce(max(id), 0) as "id!" from order_status_history where order_id = $1"#,
        order_id as OrderId,
    )
    .fetch_one(executor)
    .await
}

/// The id of the last change of any order (0 if none): where a stream of a user's changes starts.
pub async fn last_change(executor: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"select coalesce(max(id), 0) as "id!" from order_status_history"#)
        .fetch_one(executor)
        .await
}
