//! FNV-1a 64, the one non-cryptographic hash of Chute: the partition of a request
//! ([`crate::partition`]), the checksum of a migration file (`chute_schema::ledger`) and the
//! query API's ETags.
//!
//! Its output is fixed forever: a retried request must land in the same partition across
//! ingestor versions, and `schema_migrations` of every install holds checksums computed with it.
//! It detects changes and spreads keys; it is not a security measure.

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`, taken in order (chain iterators to hash several pieces as one).
pub fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash = OFFSET_BASIS;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values of FNV-1a 64 (as published with the algorithm); partitions, recorded
    /// checksums and ETags all depend on them.
    #[test]
    fn reference_values() {
        assert_eq!(fnv1a64(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(*b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn pieces_hash_like_their_concatenation() {
        let pieces = "acme".bytes().chain([0xFF]).chain("req-1".bytes());
        assert_eq!(fnv1a64(pieces), fnv1a64(b"acme\xFFreq-1".iter().copied()));
        assert_eq!(fnv1a64(b"acme\xFFreq-1".iter().copied()), 0x8a9b_b6bc_13a3_ffda);
    }
}
