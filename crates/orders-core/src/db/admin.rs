//! What the operations console reads and does: roles, the order search, one order with its history, operator
//! actions and their audit log, and the overview's figures.
//!
//! The search walks an index in the order it answers (newest first), a page at a time, whichever filter leads:
//! the primary key (`id`), the user's orders (`email`), the product-name index (`product`: each name the prefix
//! covers apart, when it covers a few), the creation-time index (time ranges and no filter), or the partial indexes
//! of finished, unfinished and parked orders. Its statement is built from fixed fragments for the filters given,
//! with every value bound, and it is planned for its values (`plan_cache_mode = force_custom_plan`): a prefix given
//! as a parameter is only a range of the product index when the planner sees its value, and a generic plan would
//! read the table.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder};
use uuid::Uuid;

use super::orders::OrderCursor;
use crate::domain::{Email, Order, OrderId, OrderStatus, Role, UserId};

/// A user as the admin API sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Their id.
    pub id: UserId,
    /// Their lower-cased email.
    pub email: String,
    /// Their display name.
    pub name: String,
    /// Their role now.
    pub role: Role,
}

/// A user and their role, read fresh (every admin request does, so that a demotion takes effect at once).
/// `None` when the user no longer exists.
pub async fn find_member(
    executor: impl PgExecutor<'_>,
    id: UserId,
) -> sqlx::Result<Option<Member>> {
    let row = sqlx::query!(
        r#"select id as "id: UserId", email, name, role from users where id = $1"#,
        id as UserId,
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|row| Member {
        id: row.id,
        email: row.email,
        name: row.name,
        // The constraint `users_role_known` admits only the three roles; anything else grants nothing.
        role: Role::parse(&row.role).unwrap_or(Role::Customer),
    }))
}

/// A role change: the role before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleChange {
    /// The user.
    pub id: UserId,
    /// Their role before.
    pub before: Role,
    /// Their role now.
    pub after: Role,
}

/// Gives the user with this email `role`. `None` when no user has that email.
pub async fn set_role(
    executor: impl PgExecutor<'_>,
    email: &Email,
    role: Role,
) -> sqlx::Result<Option<RoleChange>> {
    let row = sqlx::query!(
        r#"
        update users u set role = $2
        from (select id, role from users where email = $1 for update) before
        where u.id = before.id
        returning u.id as "id: UserId", before.role as before
        "#,
        email.as_str(),
        role.as_str(),
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|row| RoleChange {
        id: row.id,
        before: Role::parse(&row.before).unwrap_or(Role::Customer),
        after: role,
    }))
}

/// The filters of the admin search. Each one given narrows the result; none lists every order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFilter {
    /// One order by id.
    pub id: Option<OrderId>,
    /// The orders of the user with this email.
    pub email: Option<Email>,
    /// Orders with this status.
    pub status: Option<OrderStatus>,
    /// `Some(true)`: parked orders only; `Some(false)`: unparked ones only.
    pub parked: Option<bool>,
    /// Orders whose product name starts with this text (case-sensitive).
    pub product_prefix: Option<String>,
    /// Orders created at or after this time.
    pub created_from: Option<DateTime<Utc>>,
    /// Orders created before this time.
    pub created_to: Option<DateTime<Utc>>,
}

/// An order in the admin search's results.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FoundOrder {
    /// The order.
    #[sqlx(flatten)]
    pub order: Order,
    /// Its owner's email.
    pub user_email: String,
    /// Attempts the worker has made.
    pub attempts: i32,
    /// When it was parked (its attempts ran out), if it is.
    pub parked_at: Option<DateTime<Utc>>,
}

impl From<&FoundOrder> for OrderCursor {
    fn from(order: &FoundOrder) -> Self {
        Self {
            created_at: order.order.created_at,
            id: order.order.id,
        }
    }
}

/// `text` with the characters `like` treats specially escaped, so that it matches itself only.
fn like_prefix(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Appends the filters and the cursor, as a `where` clause, to a statement over `orders o`.
fn push_filters(
    query: &mut QueryBuilder<Postgres>,
    filter: &OrderFilter,
    cursor: Option<OrderCursor>,
) {
    query.push(" where true");
    if let Some(id) = filter.id {
        query.push(" and o.id = ").push_bind(id.0);
    }
    if let Some(email) = &filter.email {
        // An InitPlan: one probe of the unique email index, then the user's own index of orders.
        query
            .push(" and o.user_id = (select u.id from users u where u.email = ")
            .push_bind(email.as_str().to_owned())
            .push(")");
    }
    if let Some(status) = filter.status {
        query.push(" and o.status = ").push_bind(status);
    }
    match filter.parked {
        Some(true) => query.push(" and o.parked_at is not null"),
        Some(false) => query.push(" and o.parked_at is null"),
        None => query,
    };
    if let Some(prefix) = &filter.product_prefix {
        query
            .push(" and o.product_name like ")
            .push_bind(like_prefix(prefix));
    }
    if let Some(from) = filter.created_from {
        query.push(" and o.created_at >= ").push_bind(from);
    }
    if let Some(to) = filter.created_to {
        query.push(" and o.created_at < ").push_bind(to);
    }
    if let Some(cursor) = cursor {
        query
            .push(" and (o.created_at, o.id) < (")
            .push_bind(cursor.created_at)
            .push(", ")
            .push_bind(cursor.id.0)
            .push(")");
    }
}

/// Most product names a prefix may cover for the search to read each name's newest orders on its own.
const MAX_NAMES_APART: usize = 32;

/// The distinct product names starting with `prefix`, up to `max` of them (and one more, when there are more): a
/// walk of the product index from one name to the next, one probe per name however many orders each has.
async fn product_names(
    conn: &mut PgConnection,
    prefix: &str,
    max: usize,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "with recursive names(name) as ( \
             (select o.product_name from orders o where o.product_name like $1 \
              order by o.product_name using ~<~ limit 1) \
           union all \
             (select (select o.product_name from orders o where o.product_name like $1 and o.product_name ~>~ names.name \
                      order by o.product_name using ~<~ limit 1) \
              from names where names.name is not null)) \
         select name from names where name is not null limit $2",
    )
    .bind(like_prefix(prefix))
    .bind(i64::try_from(max + 1).unwrap_or(i64::MAX))
    .fetch_all(conn)
    .await
}

/// Appends the statement that selects the ids (`id`) of up to `limit` orders matching `filter`, newest first, after
/// `cursor`. With the product names a prefix covers (`names`), it reads each name's newest orders apart, each a
/// range of the product index already in order, and merges them: the prefix as one range of that index is every
/// order of every name, sorted.
fn push_page_ids(
    query: &mut QueryBuilder<Postgres>,
    filter: &OrderFilter,
    cursor: Option<OrderCursor>,
    limit: i64,
    names: Option<Vec<String>>,
) {
    match names {
        None => {
            query.push("select o.id from orders o");
            push_filters(query, filter, cursor);
            query
                .push(" order by o.created_at desc, o.id desc limit ")
                .push_bind(limit);
        }
        Some(names) => {
            let others = OrderFilter {
                product_prefix: None,
                ..filter.clone()
            };
            query
                .push("select p.id from unnest(")
                .push_bind(names)
                .push(
                    "::text[]) n(name) cross join lateral (select o.id, o.created_at from orders o",
                );
            push_filters(query, &others, cursor);
            query
                .push(" and o.product_name = n.name order by o.created_at desc, o.id desc limit ")
                .push_bind(limit)
                .push(") p order by p.created_at desc, p.id desc limit ")
                .push_bind(limit);
        }
    }
}

/// Up to `limit` orders matching `filter`, newest first, after `cursor`.
pub async fn search_orders(
    conn: &mut PgConnection,
    filter: &OrderFilter,
    cursor: Option<OrderCursor>,
    limit: i64,
) -> sqlx::Result<Vec<FoundOrder>> {
    let mut tx = begin_search(conn).await?;
    let names = names_apart(&mut tx, filter).await?;
    if names.as_ref().is_some_and(Vec::is_empty) {
        return Ok(Vec::new());
    }
    // The page's ids first, from an index alone where the filters allow (the product-name, the user's and the
    // creation-time indexes hold `created_at` and `id`), then its rows by primary key.
    let mut query = QueryBuilder::new(
        "select o.id, o.user_id, u.email as user_email, o.product_name, o.amount, o.status, o.created_at, \
         o.updated_at, o.attempts, o.parked_at from (",
    );
    push_page_ids(&mut query, filter, cursor, limit, names);
    query.push(
        ") page join orders o on o.id = page.id join users u on u.id = o.user_id \
         order by o.created_at desc, o.id desc",
    );
    let found = query
        .build_query_as::<FoundOrder>()
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(found)
}

/// The ids of up to `limit` orders matching `filter`, newest first (what an action on a search acts on).
pub async fn search_order_ids(
    conn: &mut PgConnection,
    filter: &OrderFilter,
    limit: i64,
) -> sqlx::Result<Vec<OrderId>> {
    let mut tx = begin_search(conn).await?;
    let names = names_apart(&mut tx, filter).await?;
    if names.as_ref().is_some_and(Vec::is_empty) {
        return Ok(Vec::new());
    }
    let mut query = QueryBuilder::new("");
    push_page_ids(&mut query, filter, None, limit, names);
    let ids = query
        .build_query_scalar::<Uuid>()
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ids.into_iter().map(OrderId).collect())
}

/// How many orders match `filter`, counting at most `cap` of them.
pub async fn count_orders(
    conn: &mut PgConnection,
    filter: &OrderFilter,
    cap: i64,
) -> sqlx::Result<i64> {
    let mut tx = begin_search(conn).await?;
    let mut query = QueryBuilder::new("select count(*) from (select from orders o");
    push_filters(&mut query, filter, None);
    query.push(" limit ").push_bind(cap).push(") matching");
    let count = query
        .build_query_scalar::<i64>()
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(count)
}

/// A search's transaction, planned for its values (`plan_cache_mode = force_custom_plan`).
async fn begin_search(conn: &mut PgConnection) -> sqlx::Result<sqlx::Transaction<'_, Postgres>> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("set local plan_cache_mode = force_custom_plan")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The product names to read apart ([`push_page_ids`]): when a product-name prefix leads the search and covers at
/// most [`MAX_NAMES_APART`] names. `None`: search the prefix as one range. An id or an email is narrower than any
/// prefix, and so are the unfinished and the parked orders, which have small indexes of their own: with one of
/// those, the planner chooses.
async fn names_apart(
    conn: &mut PgConnection,
    filter: &OrderFilter,
) -> sqlx::Result<Option<Vec<String>>> {
    let Some(prefix) = filter.product_prefix.as_deref() else {
        return Ok(None);
    };
    let unfinished = matches!(
        filter.status,
        Some(OrderStatus::Pending | OrderStatus::Processing)
    );
    if filter.id.is_some() || filter.email.is_some() || unfinished || filter.parked == Some(true) {
        return Ok(None);
    }
    let names = product_names(conn, prefix, MAX_NAMES_APART).await?;
    Ok((names.len() <= MAX_NAMES_APART).then_some(names))
}

/// Everything the console shows of one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderDetail {
    /// The order as its owner sees it.
    pub order: Order,
    /// Its owner's email.
    pub user_email: String,
    /// Attempts the worker has made.
    pub attempts: i32,
    /// The claim token of the worker holding it, while `PROCESSING`.
    pub locked_by: Option<String>,
    /// When that worker's lease ends.
    pub lease_until: Option<DateTime<Utc>>,
    /// When its job was last pushed to Redis (`None`: not pushed, or the push failed).
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When it was parked, if it is.
    pub parked_at: Option<DateTime<Utc>>,
    /// Why its last attempt failed, if one did.
    pub last_error: Option<String>,
}

/// One order with its worker-side fields, whoever owns it.
pub async fn find_order_detail(
    executor: impl PgExecutor<'_>,
    id: OrderId,
) -> sqlx::Result<Option<OrderDetail>> {
    let row = sqlx::query!(
        r#"
        select o.id as "id: OrderId", o.user_id as "user_id: UserId", o.product_name, o.amount,
               o.status as "status: OrderStatus", o.created_at, o.updated_at, u.email as user_email,
               o.attempts, o.locked_by, o.lease_until, o.enqueued_at, o.parked_at, o.last_error
        from orders o join users u on u.id = o.user_id
        where o.id = $1
        "#,
        id as OrderId,
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|row| OrderDetail {
        order: Order {
            id: row.id,
            user_id: row.user_id,
            product_name: row.product_name,
            amount: row.amount,
            status: row.status,
            created_at: row.created_at,
            updated_at: row.updated_at,
        },
        user_email: row.user_email,
        attempts: row.attempts,
        locked_by: row.locked_by,
        lease_until: row.lease_until,
        enqueued_at: row.enqueued_at,
        parked_at: row.parked_at,
        last_error: row.last_error,
    }))
}

/// One status change in an order's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The change's id (the same as the live stream's event id).
    pub id: i64,
    /// The status it moved to.
    pub status: OrderStatus,
    /// Who made it: a worker's claim token, `operator:<email>`, or nobody recorded (the owner).
    pub changed_by: Option<String>,
    /// When.
    pub changed_at: DateTime<Utc>,
}

/// Every status change of an order, oldest first.
pub async fn order_history(
    executor: impl PgExecutor<'_>,
    id: OrderId,
) -> sqlx::Result<Vec<HistoryEntry>> {
    sqlx::query_as!(
        HistoryEntry,
        r#"
        select id, status as "status: OrderStatus", changed_by, changed_at
        from order_status_history where order_id = $1 order by id
        "#,
        id as OrderId,
    )
    .fetch_all(executor)
    .await
}

/// An order's status and whether it is parked, for answering what an action did to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderState {
    /// The order.
    pub id: OrderId,
    /// Its status.
    pub status: OrderStatus,
    /// Whether it is parked.
    pub parked: bool,
}

/// The state of each of these orders that exists.
pub async fn order_states(
    executor: impl PgExecutor<'_>,
    ids: &[OrderId],
) -> sqlx::Result<Vec<OrderState>> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    sqlx::query_as!(
        OrderState,
        r#"
        select id as "id: OrderId", status as "status: OrderStatus", parked_at is not null as "parked!"
        from orders where id = any($1)
        "#,
        &ids[..],
    )
    .fetch_all(executor)
    .await
}

/// Records that these orders' jobs were just pushed, so that the reconciler does not push them again soon.
pub async fn mark_enqueued(executor: impl PgExecutor<'_>, ids: &[OrderId]) -> sqlx::Result<()> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    sqlx::query!(
        "update orders set enqueued_at = now() where id = any($1) and status = 'PENDING' and enqueued_at is null",
        &ids[..]
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// One operator action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEntry<'a> {
    /// Who acted.
    pub actor_id: UserId,
    /// Their email then.
    pub actor_email: &'a str,
    /// What they did (`redrive`, `cancel`).
    pub action: &'a str,
    /// The orders it touched or was asked to touch.
    pub order_ids: &'a [OrderId],
    /// The request as sent.
    pub request: &'a serde_json::Value,
    /// What became of each order.
    pub result: &'a serde_json::Value,
}

/// A row of the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Its id: newer entries have larger ids.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who acted.
    pub actor_id: Uuid,
    /// Their email then.
    pub actor_email: String,
    /// What they did.
    pub action: String,
    /// The orders concerned.
    pub order_ids: Vec<Uuid>,
    /// The request as sent.
    pub request: serde_json::Value,
    /// What became of each order.
    pub result: serde_json::Value,
}

/// Writes one audit entry (in the action's transaction, when it has one); returns its id.
pub async fn insert_audit(
    executor: impl PgExecutor<'_>,
    entry: &NewAuditEntry<'_>,
) -> sqlx::Result<i64> {
    let ids: Vec<Uuid> = entry.order_ids.iter().map(|id| id.0).collect();
    sqlx::query_scalar!(
        r#"
        insert into audit_log (actor_id, actor_email, action, order_ids, request, result)
        values ($1, $2, $3, $4, $5, $6)
        returning id
        "#,
        entry.actor_id as UserId,
        entry.actor_email,
        entry.action,
        &ids[..],
        entry.request,
        entry.result,
    )
    .fetch_one(executor)
    .await
}

/// Up to `limit` audit entries older than `before` (an id), newest first: a walk down the primary key; or, for
/// `order`, the entries that name it, found in `audit_log_order_ids_idx`.
pub async fn list_audit(
    executor: impl PgExecutor<'_>,
    order: Option<OrderId>,
    before: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<AuditEntry>> {
    let before = before.unwrap_or(i64::MAX);
    match order {
        None => {
            sqlx::query_as!(
                AuditEntry,
                r#"
                select id, at, actor_id, actor_email, action, order_ids, request, result
                from audit_log where id < $1 order by id desc limit $2
                "#,
                before,
                limit,
            )
            .fetch_all(executor)
            .await
        }
        Some(order) => {
            sqlx::query_as!(
                AuditEntry,
                r#"
                select id, at, actor_id, actor_email, action, order_ids, request, result
                from audit_log where order_ids @> array[$1::uuid] and id < $2 order by id desc limit $3
                "#,
                order as OrderId,
                before,
                limit,
            )
            .fetch_all(executor)
            .await
        }
    }
}

/// The finished orders counted in full, and the newest status change they include.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishedTotals {
    /// `COMPLETED` orders.
    pub completed: i64,
    /// `CANCELLED` orders.
    pub cancelled: i64,
    /// The newest `order_status_history` id the counts include: changes after it are counted with
    /// [`finished_since`].
    pub last_change: i64,
}

/// Counts the finished orders in full (one scan of the table, about a second for 5,000,000 orders on two cores: run
/// it rarely), in one snapshot with the id of the newest status change. Status changes get their ids in commit
/// order, so every change with a larger id committed after this snapshot, and none with a smaller one did.
pub async fn finished_totals(executor: impl PgExecutor<'_>) -> sqlx::Result<FinishedTotals> {
    sqlx::query_as!(
        FinishedTotals,
        r#"
        select count(*) filter (where status = 'COMPLETED') as "completed!",
               count(*) filter (where status = 'CANCELLED') as "cancelled!",
               (select coalesce(max(id), 0) from order_status_history) as "last_change!"
        from orders
        "#
    )
    .fetch_one(executor)
    .await
}

/// The orders finished by the status changes after `after` (a history id): a short walk of the history's
/// primary key. Finished orders never change again, so adding these to [`finished_totals`] keeps the totals
/// exact (orders deleted with their user since are still counted, until the next full count).
pub async fn finished_since(
    executor: impl PgExecutor<'_>,
    after: i64,
) -> sqlx::Result<FinishedTotals> {
    sqlx::query_as!(
        FinishedTotals,
        r#"
        select count(*) filter (where status = 'COMPLETED') as "completed!",
               count(*) filter (where status = 'CANCELLED') as "cancelled!",
               coalesce(max(id), $1) as "last_change!"
        from order_status_history where id > $1
        "#,
        after,
    )
    .fetch_one(executor)
    .await
}

/// The unfinished orders, each count read from a partial index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unfinished {
    /// `PENDING` orders.
    pub pending: i64,
    /// `PROCESSING` orders.
    pub processing: i64,
    /// Parked orders (waiting for an operator).
    pub parked: i64,
    /// `PENDING` orders, not parked, whose job is not in Redis: the backlog the reconciler feeds in as the queue
    /// makes room.
    pub waiting_in_postgres: i64,
    /// When the oldest `PENDING` order was created.
    pub oldest_pending: Option<DateTime<Utc>>,
}

/// Counts the unfinished orders.
pub async fn unfinished(executor: impl PgExecutor<'_>) -> sqlx::Result<Unfinished> {
    sqlx::query_as!(
        Unfinished,
        r#"
        select (select count(*) from orders where status = 'PENDING') as "pending!",
               (select count(*) from orders where status = 'PROCESSING') as "processing!",
               (select count(*) from orders where parked_at is not null) as "parked!",
               (select count(*) from orders
                 where status = 'PENDING' and parked_at is null and enqueued_at is null) as "waiting_in_postgres!",
               (select min(created_at) from orders where status = 'PENDING') as oldest_pending
        "#
    )
    .fetch_one(executor)
    .await
}

/// Orders completed in one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteCount {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Orders completed in it.
    pub completed: i64,
}

/// Orders completed in each of the last 60 minutes (the current one last, so far), zeros included: one range of
/// `orders_completed_idx`, read from the index alone.
pub async fn completed_per_minute(executor: impl PgExecutor<'_>) -> sqlx::Result<Vec<MinuteCount>> {
    sqlx::query_as!(
        MinuteCount,
        r#"
        with done as (
            select date_trunc('minute', updated_at) as minute, count(*) as completed
            from orders
            where status = 'COMPLETED' and updated_at >= date_trunc('minute', now()) - interval '59 minutes'
            group by 1
        )
        select m.minute as "minute!", coalesce(done.completed, 0) as "completed!"
        from generate_series(date_trunc('minute', now()) - interval '59 minutes', date_trunc('minute', now()),
                             interval '1 minute') as m(minute)
        left join done on done.minute = m.minute
        order by m.minute
        "#
    )
    .fetch_all(executor)
    .await
}

/// Create-to-complete latency of the orders completed in the last hour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Orders completed in the last hour.
    pub completed: i64,
    /// Median, in milliseconds (`None` without any).
    pub p50_ms: Option<f64>,
    /// 99th percentile, in milliseconds.
    pub p99_ms: Option<f64>,
}

/// The latency percentiles of the last hour's completions (read from `orders_completed_idx` alone).
pub async fn latency_last_hour(executor: impl PgExecutor<'_>) -> sqlx::Result<Latency> {
    sqlx::query_as!(
        Latency,
        r#"
        select count(*) as "completed!",
               percentile_cont(0.5) within group (order by ms) as p50_ms,
               percentile_cont(0.99) within group (order by ms) as p99_ms
        from (
            select extract(epoch from updated_at - created_at)::float8 * 1000 as ms
            from orders where status = 'COMPLETED' and updated_at >= now() - interval '1 hour'
        ) completions
        "#
    )
    .fetch_one(executor)
    .await
}

#[cfg(test)]
mod tests {
    use super::like_prefix;

    #[test]
    fn a_prefix_matches_itself_only() {
        assert_eq!(like_prefix("Wid"), "Wid%");
        assert_eq!(like_prefix("50%_off\\"), "50\\%\\_off\\\\%");
    }
}
