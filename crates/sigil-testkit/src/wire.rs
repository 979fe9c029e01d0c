//! Traffic as it is on the wire, for tests of what hostile or broken clients
//! do: gRPC calls whose body is not the protobuf message the method expects,
//! and whether the other end closed a connection.

use std::time::Duration;

use bytes::{Buf, BufMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// A codec that sends and receives message bodies as bytes, unparsed.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

/// The encoder of [`RawCodec`]: writes the bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

/// The decoder of [`RawCodec`]: returns the bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let out = src.chunk().to_vec();
        src.advance(out.len());
        Ok(Some(out))
    }
}

/// Calls the unary method `path` (`/package.Service/Method`) on `channel`
/// with `request`'s bytes as the message. A channel that is not ready is
/// reported as `Unavailable`.
pub async fn unary(
    channel: Channel,
    path: &'static str,
    request: Request<Vec<u8>>,
) -> Result<Response<Vec<u8>>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    grpc.unary(request, PathAndQuery::from_static(path), RawCodec)
        .await
}

/// Whether the other end closed `conn` (end of stream or reset) within
/// `within`; silence or bytes received count as not closed.
pub async fn closed_by_peer<C: AsyncRead + Unpin>(conn: &mut C, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, conn.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Whether the other end closed `conn` (end of stream or reset) within
/// `within`, whatever it sent before: bytes received are read and dropped.
pub async fn closed_after_reading<C: AsyncRead + Unpin>(conn: &mut C, within: Duration) -> bool {
    let drain = async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, drain).await.is_ok()
}
