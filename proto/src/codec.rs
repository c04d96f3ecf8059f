//! A tonic codec assembled from one encoder and one decoder.
//!
//! Chute's two hand-made gRPC codecs each write one direction themselves and leave the other to
//! prost: the ingestor's OTLP services decode exports item by item and encode the answer with
//! [`ProstEncoder`]; the load generator sends pre-encoded requests and decodes the answer with
//! [`ProstDecoder`]. [`PairCodec`] is the glue both would otherwise write.

use std::marker::PhantomData;

use tonic::codec::{Codec, Decoder, Encoder};
use tonic::Status;
pub use tonic_prost::{ProstDecoder, ProstEncoder};

/// The codec whose encoder is `E` and decoder `D` (each made with `Default`).
pub struct PairCodec<E, D>(PhantomData<fn() -> (E, D)>);

impl<E, D> Default for PairCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<E, D> Codec for PairCodec<E, D>
where
    E: Encoder<Error = Status> + Default + Send + 'static,
    E::Item: Send + 'static,
    D: Decoder<Error = Status> + Default + Send + 'static,
    D::Item: Send + 'static,
{
    type Encode = E::Item;
    type Decode = D::Item;
    type Encoder = E;
    type Decoder = D;

    fn encoder(&mut self) -> E {
        E::default()
    }

    fn decoder(&mut self) -> D {
        D::default()
    }
}
