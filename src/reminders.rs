//! Service-time reminders (设备使用时长): 30, 7 and 1 days before a cabinet's service ends, and
//! once when it has ended, a `service_expiring` event on the feed of its merchant (and the
//! platform's). Each reminder is recorded on the cabinet before it is sent, for the expiry it
//! is about, so a pass run again (or on another node, issue 21) does not repeat it, and an
//! extension starts the reminders afresh. One pass holds nothing between passes: it can run
//! under a leader lease on exactly one node.

use serde::Serialize;

use crate::feed::Feed;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::views::rfc3339;

const DAY_MS: i64 = 86_400_000;

/// The reminders, days before expiry, farthest first.
pub const REMINDER_DAYS: [i64; 3] = [30, 7, 1];

/// A `service_expiring` event.
#[derive(Debug, Serialize)]
struct Expiring<'a> {
    cabinet_id: &'a str,
    merchant_id: &'a str,
    service_expires_at: Option<String>,
    /// Whole days left, rounded up; 0 once expired.
    days_left: i64,
    /// Which reminder this is: 30, 7, 1, or 0 (expired: the cabinet refuses sessions with
    /// `service_expired`).
    reminder: i64,
}

/// The reminder due `left_ms` before expiry: the nearest threshold already reached, or 0 once
/// expired; `None` beyond the first.
pub fn reminder_for(left_ms: i64) -> Option<i64> {
    if left_ms <= 0 {
        return Some(0);
    }
    REMINDER_DAYS
        .iter()
        .rev()
        .copied()
        .find(|d| left_ms <= d * DAY_MS)
}

/// One pass at `now` (Unix ms); answers how many reminders it sent.
pub async fn remind(store: &Store, feed: &Feed, metrics: &Metrics, now: i64) -> usize {
    let due = match store
        .cabinets_expiring(now + REMINDER_DAYS[0] * DAY_MS + 1)
        .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cabinets expiring not read");
            return 0;
        }
    };
    let mut sent = 0;
    for (c, reminded) in due {
        let Some(exp) = c.service_expires_at else {
            continue;
        };
        let Some(reminder) = reminder_for(exp - now) else {
            continue;
        };
        if reminded.is_some_and(|r| r <= reminder) {
            continue;
        }
        match store.note_service_reminder(&c.id, exp, reminder).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::error!(cabinet_id = %c.id, error = %e, "service reminder not recorded; sent on the next pass");
                continue;
            }
        }
        let days_left = ((exp - now).max(0) + DAY_MS - 1) / DAY_MS;
        feed.publish(
            &c.merchant_id,
            "service_expiring",
            &Expiring {
                cabinet_id: &c.id,
                merchant_id: &c.merchant_id,
                service_expires_at: rfc3339(exp),
                days_left,
                reminder,
            },
        );
        metrics
            .service_reminders
            .with_label_values(&[&reminder.to_string()])
            .inc();
        tracing::info!(cabinet_id = %c.id, days_left, reminder, "service reminder");
        sent += 1;
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_reminder_reached_is_due() {
        assert_eq!(reminder_for(31 * DAY_MS), None);
        assert_eq!(reminder_for(30 * DAY_MS), Some(30));
        assert_eq!(reminder_for(8 * DAY_MS), Some(30));
        assert_eq!(reminder_for(7 * DAY_MS), Some(7));
        assert_eq!(reminder_for(DAY_MS + 1), Some(7));
        assert_eq!(reminder_for(DAY_MS), Some(1));
        assert_eq!(reminder_for(1), Some(1));
        assert_eq!(reminder_for(0), Some(0));
        assert_eq!(reminder_for(-DAY_MS), Some(0));
    }
}
