//! Exponential backoff: the one schedule every retry in the hub follows, whether it waits in
//! place (a provider call, a storage write) or is scheduled for later (collection).

use std::time::Duration;

/// Doubling waits from `first`, capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    /// Waits of `first`, twice that, … up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            next: first,
            first,
            max,
        }
    }

    /// Back to the first wait (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// The wait, in ms, before the `attempt`-th retry of a scheduled job: `base_ms` × 2^attempt,
/// the exponent capped at 6 (64 × base).
pub fn scheduled(base_ms: i64, attempt: i64) -> i64 {
    base_ms.saturating_mul(1i64 << attempt.clamp(0, 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let waits: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, vec![50, 100, 200, 300, 300]);
    }

    #[test]
    fn scheduled_retries_double_up_to_sixty_four_times_the_base() {
        assert_eq!(scheduled(1000, 1), 2000);
        assert_eq!(scheduled(1000, 6), 64_000);
        assert_eq!(scheduled(1000, 40), 64_000);
        assert_eq!(scheduled(1000, -3), 1000);
        assert_eq!(scheduled(i64::MAX, 3), i64::MAX);
    }
}
