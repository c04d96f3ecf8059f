//! The response cache: serialized answers keyed by the normalized query.
//!
//! - Single flight: concurrent identical misses wait for one loader (moka `try_get_with`), so
//!   they cause one ClickHouse query. Failures are not cached.
//! - TTL by freshness: an answer whose range touches the last two minutes (rollups still
//!   filling) lives `fresh_ttl` (~1 s); a closed historical range lives `historical_ttl`.
//! - Bounded in bytes: the weigher counts key and body; moka evicts by TinyLFU beyond capacity.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::Expiry;

use crate::error::Error;
use crate::telemetry;

/// Fixed per-entry bookkeeping counted on top of key and body.
const ENTRY_OVERHEAD_BYTES: usize = 128;

/// One cached answer.
#[derive(Debug)]
pub struct Cached {
    pub body: Bytes,
    /// Strong validator, quoted: `"<fnv1a-64 of the body>"`.
    pub etag: String,
    /// The range touched the last two minutes when the answer was computed.
    pub fresh: bool,
}

impl Cached {
    pub fn new(body: Bytes, fresh: bool) -> Self {
        let etag = format!("\"{:016x}\"", chute_common::hash::fnv1a64(body.iter().copied()));
        Self { body, etag, fresh }
    }
}

struct FreshnessExpiry {
    fresh_ttl: Duration,
    historical_ttl: Duration,
}

impl Expiry<String, Arc<Cached>> for FreshnessExpiry {
    fn expire_after_create(&self, _key: &String, value: &Arc<Cached>, _created_at: Instant) -> Option<Duration> {
        Some(if value.fresh {
            self.fresh_ttl
        } else {
            self.historical_ttl
        })
    }
}

#[derive(Clone)]
pub struct ResponseCache {
    entries: moka::future::Cache<String, Arc<Cached>>,
    bytes: Arc<AtomicU64>,
    fresh_ttl: Duration,
    historical_ttl: Duration,
}

impl ResponseCache {
    pub fn new(capacity_bytes: u64, fresh_ttl: Duration, historical_ttl: Duration) -> Self {
        let bytes = Arc::new(AtomicU64::new(0));
        let tracked = bytes.clone();
        let entries = moka::future::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|key: &String, value: &Arc<Cached>| weight(key, value))
            .expire_after(FreshnessExpiry {
                fresh_ttl,
                historical_ttl,
            })
            .eviction_listener(move |key: Arc<String>, value: Arc<Cached>, cause| {
                let size = u64::from(weight(&key, &value));
                let left = tracked.fetch_sub(size, Ordering::Relaxed).saturating_sub(size);
                telemetry::cache_bytes(left);
                if cause == RemovalCause::Size {
                    telemetry::cache_evicted(size);
                }
            })
            .build();
        Self {
            entries,
            bytes,
            fresh_ttl,
            historical_ttl,
        }
    }

    /// The cached answer for `key`, or the one `load` produces (run once for all concurrent
    /// callers of the same key). A caller that did not run `load` counts as a hit.
    pub async fn get_or_load<F>(&self, key: String, fresh: bool, load: F) -> Result<Arc<Cached>, Arc<Error>>
    where
        F: Future<Output = Result<Bytes, Error>>,
    {
        let loaded = AtomicBool::new(false);
        let result = self
            .entries
            .try_get_with_by_ref(&key, async {
                loaded.store(true, Ordering::Relaxed);
                let cached = Arc::new(Cached::new(load.await?, fresh));
                let size = u64::from(weight(&key, &cached));
                let total = self.bytes.fetch_add(size, Ordering::Relaxed) + size;
                telemetry::cache_bytes(total);
                Ok::<_, Error>(cached)
            })
            .await;
        if loaded.load(Ordering::Relaxed) {
            telemetry::cache_miss();
        } else {
            telemetry::cache_hit();
        }
        result
    }

    /// How long a browser or proxy may reuse an answer (the cache's own TTL for it).
    pub fn max_age(&self, cached: &Cached) -> Duration {
        if cached.fresh {
            self.fresh_ttl
        } else {
            self.historical_ttl
        }
    }

    /// Bytes held (key + body + overhead per entry), as tracked by inserts and removals.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Runs moka's pending maintenance (expiry, eviction notifications); tests use it.
    pub async fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks().await;
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }
}

fn weight(key: &str, value: &Cached) -> u32 {
    u32::try_from(key.len() + value.body.len() + value.etag.len() + ENTRY_OVERHEAD_BYTES).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn cache() -> ResponseCache {
        ResponseCache::new(1 << 20, Duration::from_millis(50), Duration::from_secs(60))
    }

    #[tokio::test]
    async fn concurrent_identical_misses_load_once() {
        let cache = cache();
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, loads) = (cache.clone(), loads.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load("k".into(), false, async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Bytes::from_static(b"{}"))
                    })
                    .await
                    .unwrap()
            }));
        }
        for task in tasks {
            assert_eq!(&task.await.unwrap().body[..], b"{}");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn fresh_answers_expire_quickly_and_errors_are_not_cached() {
        let cache = cache();
        let load = |body: &'static [u8]| async move { Ok(Bytes::from_static(body)) };
        cache.get_or_load("fresh".into(), true, load(b"1")).await.unwrap();
        cache.get_or_load("old".into(), false, load(b"1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        let fresh = cache.get_or_load("fresh".into(), true, load(b"2")).await.unwrap();
        assert_eq!(&fresh.body[..], b"2");
        let old = cache.get_or_load("old".into(), false, load(b"2")).await.unwrap();
        assert_eq!(&old.body[..], b"1");

        let failed = cache
            .get_or_load("e".into(), false, async { Err(Error::invalid("x", "no")) })
            .await;
        assert!(failed.is_err());
        let retried = cache.get_or_load("e".into(), false, load(b"ok")).await.unwrap();
        assert_eq!(&retried.body[..], b"ok");
    }

    #[tokio::test]
    async fn capacity_is_bounded_in_bytes() {
        let cache = ResponseCache::new(64 * 1024, Duration::from_secs(60), Duration::from_secs(60));
        for i in 0..100 {
            cache
                .get_or_load(format!("k{i}"), false, async { Ok(Bytes::from(vec![b'x'; 4096])) })
                .await
                .unwrap();
        }
        cache.run_pending_tasks().await;
        assert!(cache.bytes() <= 64 * 1024, "{} bytes", cache.bytes());
        assert!(cache.entry_count() < 100);
    }

    #[test]
    fn etags_follow_the_body() {
        let a = Cached::new(Bytes::from_static(b"a"), false);
        let b = Cached::new(Bytes::from_static(b"b"), false);
        assert_ne!(a.etag, b.etag);
        assert_eq!(a.etag, Cached::new(Bytes::from_static(b"a"), true).etag);
        assert!(a.etag.starts_with('"') && a.etag.ends_with('"'));
    }
}
