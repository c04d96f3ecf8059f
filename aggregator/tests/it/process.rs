//! The aggregator process itself: how it runs, apart from what it does.

use crate::support::Stack;

/// The aggregator restarts itself with glibc's mmap threshold fixed, so freed batch-sized
/// buffers go back to the system (`chute_common::service::reexec_with_bounded_malloc`); an
/// operator's own value is kept.
#[tokio::test]
async fn the_aggregator_runs_with_a_fixed_mmap_threshold() {
    let stack = Stack::start("process_malloc").await;
    let aggregator = stack.aggregator(&[]);
    // Once it serves, the re-exec (before anything else in main) is behind it.
    for _ in 0..300 {
        if crate::support::http_get(&aggregator.admin, "/healthz").await.0 == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let pid = aggregator.child.id().expect("running");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let threshold = environ
        .split(|byte| *byte == 0)
        .find_map(|entry| entry.strip_prefix(b"MALLOC_MMAP_THRESHOLD_="))
        .map(|value| String::from_utf8_lossy(value).into_owned());
    let expected = std::env::var("MALLOC_MMAP_THRESHOLD_").unwrap_or_else(|_| "131072".to_owned());
    assert_eq!(threshold.as_deref(), Some(expected.as_str()));
    assert_eq!(crate::support::http_get(&aggregator.admin, "/healthz").await.0, 200);
    aggregator.terminate().await;
}
