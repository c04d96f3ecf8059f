//! The Chute contract: `chute.v1` gRPC messages and service, plus the `EventBatch` payload that
//! travels through JetStream. Generated at build time from `proto/chute/v1/*.proto`.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("chute.v1");
}

/// Encoded `FileDescriptorSet` for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chute_descriptor.bin"));

/// The `EventBatch.version` this build writes and understands.
pub const BATCH_VERSION: u32 = 1;
