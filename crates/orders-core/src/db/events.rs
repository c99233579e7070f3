//! Status changes as events: what the `order_events` notifications announce (see the migrations
//! `20261125000005_order_events.sql` and `20261125000006_order_events_per_statement.sql`), and the same read back
//! from `order_status_history` for a stream that may have missed some. Either way a change carries the whole order
//! as of that change, so a stream sends it as it is.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use sqlx::PgExecutor;

use crate::domain::{Order, OrderId, OrderStatus, UserId};

/// The channel the status changes are announced on.
pub const CHANNEL: &str = "order_events";

/// One status change of one order. Its `id` (the history row's) grows with every change, so a client resumes
/// after the last id it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// The `order_status_history` row.
    pub id: i64,
    /// The order right after the change: the new status, and `updated_at` the time of the change.
    pub order: Order,
}

/// One change in a notification's payload, as the trigger writes it.
#[derive(Deserialize)]
struct Announcement {
    id: i64,
    order_id: OrderId,
    user_id: UserId,
    product_name: String,
    amount: String,
    status: OrderStatus,
    created_at_us: i64,
    changed_at_us: i64,
}

/// Why a payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BadAnnouncement {
    /// Not the JSON the trigger writes.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A field out of range.
    #[error("{0}")]
    Value(&'static str),
}

impl StatusChange {
    /// Reads a notification's payload: the changes one statement made, oldest first (see the migration
    /// `20261125000006`).
    pub fn parse(payload: &str) -> Result<Vec<Self>, BadAnnouncement> {
        let all: Vec<Announcement> = serde_json::from_str(payload)?;
        all.into_iter().map(Self::read).collect()
    }

    fn read(a: Announcement) -> Result<Self, BadAnnouncement> {
        let time = |us| {
            DateTime::from_timestamp_micros(us).ok_or(BadAnnouncement::Value("time out of range"))
        };
        Ok(Self {
            id: a.id,
            order: Order {
                id: a.order_id,
                user_id: a.user_id,
                product_name: a.product_name,
                amount: a
                    .amount
                    .parse()
                    .map_err(|_| BadAnnouncement::Value("amount is not a decimal"))?,
                status: a.status,
                created_at: time(a.created_at_us)?,
                updated_at: time(a.changed_at_us)?,
            },
        })
    }
}

/// A history row joined with its order.
struct ChangeRow {
    id: i64,
    order_id: OrderId,
    user_id: UserId,
    product_name: String,
    amount: Decimal,
    status: OrderStatus,
    created_at: DateTime<Utc>,
    changed_at: DateTime<Utc>,
}

impl From<ChangeRow> for StatusChange {
    fn from(row: ChangeRow) -> Self {
        Self {
            id: row.id,
            order: Order {
                id: row.order_id,
                user_id: row.user_id,
                product_name: row.product_name,
                amount: row.amount,
                status: row.status,
                created_at: row.created_at,
                updated_at: row.changed_at,
            },
        }
    }
}

/// The changes of one order after `after`, oldest first.
pub async fn changes_of_order(
    executor: impl PgExecutor<'_>,
    order_id: OrderId,
    after: i64,
) -> sqlx::Result<Vec<StatusChange>> {
    let rows = sqlx::query_as!(
        ChangeRow,
        r#"
        select h.id, h.order_id as "order_id: OrderId", o.user_id as "user_id: UserId", o.product_name,
               o.amount, h.status as "status: OrderStatus", o.created_at, h.changed_at
        from order_status_history h join orders o on o.id = h.order_id
        where h.order_id = $1 and h.id > $2
        order by h.id
        "#,
        order_id as OrderId,
        after,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(StatusChange::from).collect())
}

/// Most changes one read of a user's history returns; a stream further behind reads again from the last.
pub const USER_CHANGES_PAGE: i64 = 500;

/// The changes of a user's orders after `after`, oldest first, at most [`USER_CHANGES_PAGE`].
pub async fn changes_of_user(
    executor: impl PgExecutor<'_>,
    user_id: UserId,
    after: i64,
) -> sqlx::Result<Vec<StatusChange>> {
    let rows = sqlx::query_as!(
        ChangeRow,
        r#"
        select h.id, h.order_id as "order_id: OrderId", o.user_id as "user_id: UserId", o.product_name,
               o.amount, h.status as "status: OrderStatus", o.created_at, h.changed_at
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
    .await?;
    Ok(rows.into_iter().map(StatusChange::from).collect())
}

/// Whether a user's orders have more than `max` changes after `after` (reading at most `max + 1` of them).
pub async fn user_changes_exceed(
    executor: impl PgExecutor<'_>,
    user_id: UserId,
    after: i64,
    max: i64,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"
        select count(*) > $3::bigint as "exceeds!" from (
            select 1 from order_status_history h join orders o on o.id = h.order_id
            where o.user_id = $1 and h.id > $2
            limit $3::bigint + 1
        ) missed
        "#,
        user_id as UserId,
        after,
        max,
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

#[cfg(test)]
mod tests {
    use super::StatusChange;

    #[test]
    fn a_payload_reads_into_the_order_as_of_the_change() {
        let changes = StatusChange::parse(
            r#"[{"id": 7, "order_id": "01a2137d-8c5e-7712-ab36-a9b261b86c7e",
                "user_id": "01a2137d-8c5e-7712-ab36-a9b261b86c7f", "product_name": "Widget \"x\"",
                "amount": "19.90", "status": "PROCESSING", "created_at_us": 1764000000123456,
                "changed_at_us": 1764000001000000},
               {"id": 8, "order_id": "01a2137d-8c5e-7712-ab36-a9b261b86c80",
                "user_id": "01a2137d-8c5e-7712-ab36-a9b261b86c7f", "product_name": "Gadget",
                "amount": "5", "status": "COMPLETED", "created_at_us": 1764000000000000,
                "changed_at_us": 1764000002000000}]"#,
        )
        .unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1].id, 8);
        assert_eq!(changes[1].order.status.as_str(), "COMPLETED");
        let change = &changes[0];
        assert_eq!(change.id, 7);
        assert_eq!(change.order.product_name, "Widget \"x\"");
        assert_eq!(change.order.amount.to_string(), "19.90");
        assert_eq!(change.order.status.as_str(), "PROCESSING");
        assert_eq!(
            change.order.created_at.timestamp_micros(),
            1_764_000_000_123_456
        );
        assert_eq!(
            change.order.updated_at.timestamp_micros(),
            1_764_000_001_000_000
        );
        assert!(StatusChange::parse(r#"[{"id": 1}]"#).is_err());
    }
}
