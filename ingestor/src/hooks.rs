//! Test seams (feature `test-util`): the receive clock and lost publishes, so integration tests
//! can replay exactly the failure a retry must survive.
//!
//! Without the feature, [`Hooks`] is an empty struct whose methods are the production behaviour
//! (the wall clock; no publish is lost), so the seams cost nothing in a release build.

#[cfg(feature = "test-util")]
use std::sync::{Arc, Mutex};

use chute_common::validate::unix_nanos_now;

/// The production behaviour: nothing to configure.
#[cfg(not(feature = "test-util"))]
#[derive(Clone, Debug, Default)]
pub struct Hooks {}

#[cfg(not(feature = "test-util"))]
impl Hooks {
    /// The receive time of a request, unix nanoseconds.
    #[inline(always)]
    pub(crate) fn received_unix_nanos(&self) -> i64 {
        unix_nanos_now()
    }

    /// Whether to lose this publish of chunk `chunk_index` instead of sending it.
    #[inline(always)]
    pub(crate) fn lose_publish(&self, _chunk_index: u32) -> bool {
        false
    }

    /// Whether to answer UNAVAILABLE to an OTLP export that was stored.
    #[inline(always)]
    pub(crate) fn fail_after_store(&self) -> bool {
        false
    }
}

/// Seams a test sets before starting the ingestor (`chute_ingestor::run_with_hooks`).
#[cfg(feature = "test-util")]
#[derive(Clone, Default)]
pub struct Hooks {
    receive_clock: Option<Arc<dyn Fn() -> i64 + Send + Sync>>,
    /// Chunk indices whose next publish is lost, one entry per loss.
    lost_publishes: Arc<Mutex<Vec<u32>>>,
    /// OTLP exports still to be answered UNAVAILABLE after they were stored.
    failures_after_store: Arc<Mutex<u32>>,
}

#[cfg(feature = "test-util")]
impl Hooks {
    /// Receive times come from `clock` (unix nanoseconds) instead of the wall clock.
    pub fn with_receive_clock(mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.receive_clock = Some(Arc::new(clock));
        self
    }

    /// The next publish of chunk `chunk_index` (of whichever request comes first) is never sent:
    /// the ingestor waits out its publish timeout and fails the call as if the PubAck never came.
    pub fn lose_next_publish(self, chunk_index: u32) -> Self {
        self.lost_publishes.lock().expect("hooks lock").push(chunk_index);
        self
    }

    /// The next `count` OTLP exports are stored and then answered UNAVAILABLE (gRPC) or 503
    /// (HTTP), as when the answer is lost after the PubAcks: the exporter retries them.
    pub fn fail_next_exports_after_store(self, count: u32) -> Self {
        *self.failures_after_store.lock().expect("hooks lock") += count;
        self
    }

    pub(crate) fn received_unix_nanos(&self) -> i64 {
        match &self.receive_clock {
            Some(clock) => clock(),
            None => unix_nanos_now(),
        }
    }

    pub(crate) fn lose_publish(&self, chunk_index: u32) -> bool {
        let mut lost = self.lost_publishes.lock().expect("hooks lock");
        match lost.iter().position(|&index| index == chunk_index) {
            Some(position) => {
                lost.remove(position);
                true
            }
            None => false,
        }
    }

    pub(crate) fn fail_after_store(&self) -> bool {
        let mut remaining = self.failures_after_store.lock().expect("hooks lock");
        let fail = *remaining > 0;
        *remaining = remaining.saturating_sub(1);
        fail
    }
}

#[cfg(feature = "test-util")]
impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("receive_clock", &self.receive_clock.is_some())
            .field("lost_publishes", &self.lost_publishes)
            .field("failures_after_store", &self.failures_after_store)
            .finish()
    }
}
