//! The loss / duplicate verdict: what ClickHouse holds for a run against what was acknowledged.
//!
//! Pure: the queries live in [`crate::warehouse`].

use serde::{Deserialize, Serialize};

/// Counts of a run's events in ClickHouse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Distinct event ids (`uniqExact(event_id)`).
    pub unique: u64,
    /// Rows (`count()`, no FINAL): more than `unique` means a duplicate row landed.
    pub rows: u64,
}

/// What the load generator knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub acked: u64,
    /// Events of requests that failed in a way that may still have stored them.
    pub unknown: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    /// Every acknowledged event is stored exactly once, nothing else.
    Exact,
    /// Every acknowledged event once, plus some events of failed requests (allowed: the
    /// request failed after storing; a client retry would have confirmed them).
    ExactWithUnacknowledged { extra: u64 },
    /// Acknowledged events are missing.
    Lost { missing: u64 },
    /// More distinct events than were ever sent (`extra` beyond acknowledged + in doubt).
    Unexpected { extra: u64 },
    /// Some event is stored more than once (plain count above distinct count).
    Duplicated { duplicates: u64 },
}

impl Verdict {
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Exact | Self::ExactWithUnacknowledged { .. })
    }
}

/// The verdict; duplicates are the worst news and are reported first, then loss.
pub fn verdict(sent: Sent, stored: Stored) -> Verdict {
    if stored.rows > stored.unique {
        return Verdict::Duplicated {
            duplicates: stored.rows - stored.unique,
        };
    }
    if stored.unique < sent.acked {
        return Verdict::Lost {
            missing: sent.acked - stored.unique,
        };
    }
    let extra = stored.unique - sent.acked;
    match extra {
        0 => Verdict::Exact,
        extra if extra <= sent.unknown => Verdict::ExactWithUnacknowledged { extra },
        extra => Verdict::Unexpected {
            extra: extra - sent.unknown,
        },
    }
}

/// Whether the pipeline has delivered everything it can for now: all acknowledged events are
/// stored and, when some requests ended in doubt, the count has stopped moving.
pub fn drained(sent: Sent, stored: Stored, unchanged_polls: u32) -> bool {
    stored.unique >= sent.acked
        && (sent.unknown == 0 || stored.unique >= sent.acked + sent.unknown || unchanged_polls >= 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(unique: u64, rows: u64) -> Stored {
        Stored { unique, rows }
    }

    fn sent_of(acked: u64, unknown: u64) -> Sent {
        Sent { acked, unknown }
    }

    #[test]
    fn exact_when_counts_match() {
        let sent = sent_of(1000, 0);
        assert_eq!(verdict(sent, stored(1000, 1000)), Verdict::Exact);
        assert!(verdict(sent, stored(1000, 1000)).is_ok());
    }

    #[test]
    fn loss_and_duplicates_are_caught() {
        let sent = sent_of(1000, 0);
        assert_eq!(verdict(sent, stored(990, 990)), Verdict::Lost { missing: 10 });
        assert_eq!(verdict(sent, stored(1000, 1003)), Verdict::Duplicated { duplicates: 3 });
        // A duplicate row hides behind nothing: reported even when events are also missing.
        assert_eq!(verdict(sent, stored(990, 995)), Verdict::Duplicated { duplicates: 5 });
        assert_eq!(verdict(sent, stored(1001, 1001)), Verdict::Unexpected { extra: 1 });
        assert!(!verdict(sent, stored(990, 990)).is_ok());
    }

    #[test]
    fn events_of_failed_requests_may_or_may_not_be_stored() {
        let sent = sent_of(1000, 100);
        assert_eq!(verdict(sent, stored(1000, 1000)), Verdict::Exact);
        assert_eq!(
            verdict(sent, stored(1100, 1100)),
            Verdict::ExactWithUnacknowledged { extra: 100 }
        );
        assert_eq!(verdict(sent, stored(1101, 1101)), Verdict::Unexpected { extra: 1 });
    }

    #[test]
    fn drained_waits_for_every_acknowledged_event() {
        let sure = sent_of(10, 0);
        assert!(!drained(sure, stored(9, 9), 100));
        assert!(drained(sure, stored(10, 10), 0));
        let doubtful = sent_of(10, 5);
        assert!(!drained(doubtful, stored(10, 10), 0));
        assert!(drained(doubtful, stored(10, 10), 4));
        assert!(drained(doubtful, stored(15, 15), 0));
    }
}
