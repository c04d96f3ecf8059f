//! The Chute contract: `chute.v1` gRPC messages and service, plus the `EventBatch` payload that
//! travels through JetStream. Generated at build time from `proto/chute/v1/*.proto`.
//!
//! [`codec`] holds [`codec::PairCodec`], the tonic codec behind Chute's two hand-made gRPC codecs
//! (the ingestor's lenient OTLP decoder, the load generator's pre-encoded requests).

pub mod codec;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("chute.v1");
}

/// Encoded `FileDescriptorSet` for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chute_descriptor.bin"));

/// The `EventBatch.version` this build writes and understands.
pub const BATCH_VERSION: u32 = 1;
