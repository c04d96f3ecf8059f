//! Stall detection as data plus a clock: for each partition, since when it has had work without
//! its position moving. Idle partitions are never stalled; a commit resets the clock.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// Per partition, the start of the current stretch of work without progress.
#[derive(Debug, Default)]
pub struct Progress {
    since: BTreeMap<u32, Instant>,
}

impl Progress {
    /// A batch covering `partitions` was committed at `now`.
    pub fn moved(&mut self, partitions: &[u32], now: Instant) {
        for partition in partitions {
            self.since.insert(*partition, now);
        }
    }

    /// How long `partition` has had work without progress (zero when it has none).
    pub fn age(&mut self, partition: u32, busy: bool, now: Instant) -> Duration {
        if !busy {
            self.since.insert(partition, now);
            return Duration::ZERO;
        }
        now.saturating_duration_since(*self.since.entry(partition).or_insert(now))
    }

    /// Forgets partitions not kept (no longer owned).
    pub fn forget(&mut self, keep: impl Fn(u32) -> bool) {
        self.since.retain(|partition, _| keep(*partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_work_without_progress_ages() {
        let mut progress = Progress::default();
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        assert_eq!(progress.age(0, false, start), Duration::ZERO, "idle");
        assert_eq!(
            progress.age(0, false, later(600)),
            Duration::ZERO,
            "idle for long is fine"
        );
        assert_eq!(
            progress.age(0, true, later(601)),
            Duration::from_secs(1),
            "work since the last idle look"
        );
        assert_eq!(progress.age(0, true, later(900)), Duration::from_secs(300));
        progress.moved(&[0], later(905));
        assert_eq!(
            progress.age(0, true, later(910)),
            Duration::from_secs(5),
            "a commit resets"
        );
        assert_eq!(
            progress.age(7, true, later(910)),
            Duration::ZERO,
            "a new partition starts now"
        );
        progress.forget(|partition| partition == 7);
        assert_eq!(progress.age(0, true, later(920)), Duration::ZERO, "forgotten");
    }
}
