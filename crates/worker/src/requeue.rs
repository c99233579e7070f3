//! `worker requeue`: re-drives parked or stuck orders by hand.

use std::time::Duration;

use orders_core::{db::orders as db, domain::OrderId};
use sqlx::PgPool;

/// Orders re-driven per statement.
const BATCH: usize = 1000;

/// Re-drives `ids`, or with `stuck` set (the overdue threshold) every stuck order, at most `limit` of them,
/// and prints one line per order re-driven to stdout, then a summary.
pub async fn run(
    db: &PgPool,
    ids: &[OrderId],
    stuck: Option<Duration>,
    limit: i64,
) -> anyhow::Result<()> {
    // One snapshot, taken before anything changes: re-driven orders are not picked again.
    let ids = match stuck {
        Some(overdue) => db::stuck_orders(db, overdue, limit).await?,
        None => ids.to_vec(),
    };
    let mut redriven = 0;
    for batch in ids.chunks(BATCH) {
        for order in db::requeue(db, batch).await? {
            redriven += 1;
            println!(
                "{}\t{}\tattempts={}\t{}",
                order.id,
                order.status.as_str(),
                order.attempts,
                order.last_error.as_deref().unwrap_or("-"),
            );
        }
    }
    let skipped = ids.len() - redriven;
    println!(
        "re-drove {redriven} order(s); a running worker's reconciler queues them within RECONCILE_INTERVAL_MS{}",
        if skipped > 0 {
            format!("; {skipped} left alone (finished, held by a live worker, or unknown)")
        } else {
            String::new()
        }
    );
    Ok(())
}
