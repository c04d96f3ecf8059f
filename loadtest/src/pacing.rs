//! Open-loop pacing: when each request is *meant* to be sent.
//!
//! Latency in an open-loop run is measured from the intended send time, not from the moment
//! the request actually left: when the system (or the generator) stalls, requests queue up and
//! their waiting counts as latency. Measuring from the actual send time would hide exactly the
//! stalls a latency target is about (coordinated omission).

use std::time::Duration;

/// A fixed-rate schedule of requests of `events_per_request` events at `events_per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Nanoseconds between two intended sends (fractional: rates need not divide evenly).
    interval_nanos: f64,
}

impl Schedule {
    pub fn new(events_per_second: f64, events_per_request: usize) -> Self {
        debug_assert!(events_per_second > 0.0 && events_per_request > 0);
        Self {
            interval_nanos: events_per_request as f64 * 1e9 / events_per_second,
        }
    }

    /// Requests per second.
    pub fn request_rate(&self) -> f64 {
        1e9 / self.interval_nanos
    }

    /// Intended send time of request `index` (0-based), relative to the run's start.
    pub fn intended_offset(&self, index: u64) -> Duration {
        Duration::from_nanos((index as f64 * self.interval_nanos).round() as u64)
    }

    /// How many requests are due by `elapsed` (those with an intended offset <= elapsed).
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        (elapsed.as_nanos() as f64 / self.interval_nanos).floor() as u64 + 1
    }

    /// Requests in a run of `duration`, capped by an event budget.
    pub fn total_requests(&self, duration: Duration, max_events: Option<u64>, events_per_request: usize) -> u64 {
        let by_time = (duration.as_nanos() as f64 / self.interval_nanos).floor() as u64;
        match max_events {
            Some(events) => by_time.min(events.div_ceil(events_per_request as u64)),
            None => by_time,
        }
    }
}

/// Requests a closed-loop run may send at most: the event budget in whole requests, if any.
pub fn request_budget(max_events: Option<u64>, events_per_request: usize) -> u64 {
    max_events.map_or(u64::MAX, |events| events.div_ceil(events_per_request.max(1) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_offsets_follow_the_rate_exactly() {
        // 50,000 events/s in requests of 100: 500 requests/s, one every 2 ms.
        let schedule = Schedule::new(50_000.0, 100);
        assert_eq!(schedule.intended_offset(0), Duration::ZERO);
        assert_eq!(schedule.intended_offset(1), Duration::from_millis(2));
        assert_eq!(schedule.intended_offset(500), Duration::from_secs(1));
        assert!((schedule.request_rate() - 500.0).abs() < 1e-9);
    }

    #[test]
    fn fractional_intervals_do_not_drift() {
        // 3 requests per second: 333.33.. ms apart; request 3000 is at exactly 1000 s.
        let schedule = Schedule::new(3.0, 1);
        assert_eq!(schedule.intended_offset(3000), Duration::from_secs(1000));
        assert_eq!(schedule.intended_offset(1), Duration::from_nanos(333_333_333));
    }

    #[test]
    fn due_requests_catch_up_after_a_stall() {
        let schedule = Schedule::new(1000.0, 10); // 100 requests/s, every 10 ms
        assert_eq!(schedule.due_by(Duration::ZERO), 1);
        assert_eq!(schedule.due_by(Duration::from_millis(9)), 1);
        assert_eq!(schedule.due_by(Duration::from_millis(10)), 2);
        // A 1 s stall: 101 requests are due at once, each still timed from its own slot.
        assert_eq!(schedule.due_by(Duration::from_secs(1)), 101);
    }

    #[test]
    fn totals_respect_duration_and_event_budget() {
        let schedule = Schedule::new(10_000.0, 100);
        assert_eq!(schedule.total_requests(Duration::from_secs(30), None, 100), 3000);
        assert_eq!(schedule.total_requests(Duration::from_secs(30), Some(1050), 100), 11);
        assert_eq!(request_budget(Some(1050), 100), 11);
        assert_eq!(request_budget(None, 100), u64::MAX);
    }
}
