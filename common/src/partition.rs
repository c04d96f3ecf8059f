//! Which partition (`events.<partition>` subject) a request goes to.
//!
//! The hash is FNV-1a 64 ([`crate::hash`]) — fixed forever, because the partition of a retried
//! request must not change between ingestor versions (JetStream's duplicate window works per
//! message id, and the aggregator's ordering guarantee is per partition).

use crate::hash::fnv1a64;

/// Stable partition of a request with an idempotency key: FNV-1a(tenant, 0xFF, key) mod P.
pub fn partition_for(tenant: &str, idempotency_key: &str, partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    let hash = fnv1a64(tenant.bytes().chain([0xFF]).chain(idempotency_key.bytes()));
    (hash % u64::from(partitions)) as u32
}

/// A partition for a request without idempotency key: any one, spread uniformly.
pub fn random_partition(partitions: u32) -> u32 {
    rand::random_range(0..partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_known_values() {
        // Pinned: changing these breaks retries across an upgrade.
        assert_eq!(partition_for("acme", "req-1", 16), partition_for("acme", "req-1", 16));
        assert_eq!(partition_for("", "", 1), 0);
        let pinned: Vec<u32> = ["a", "b", "c", "d"]
            .iter()
            .map(|key| partition_for("acme", key, 16))
            .collect();
        assert_eq!(pinned, vec![3, 6, 9, 12]);
        assert_eq!(partition_for("acme", "req-1", 1000), 698);
        assert_eq!(partition_for("globex", "order-42", 1000), 882);
        assert_eq!(partition_for("", "", 1000), 646);
    }

    #[test]
    fn tenant_and_key_are_separated() {
        let spread: std::collections::HashSet<u32> = (0..64)
            .map(|i| partition_for("acme", &format!("key-{i}"), 16))
            .collect();
        assert!(
            spread.len() > 10,
            "64 keys should hit most of 16 partitions, got {spread:?}"
        );
        assert!((0..1000).all(|_| random_partition(16) < 16));
    }
}
