//! gRPC on Unix sockets for every client stack.
//!
//! Over a Unix socket there is no host name, and each gRPC stack fills the
//! HTTP/2 `:authority` pseudo-header its own way: grpc-go sends `localhost`,
//! gRPC C-core (Python, C++, Ruby, PHP, C#) the percent-encoded socket path
//! (`tmp%2Fagent.sock`), grpc-java the raw path (`/run/sigil/api.sock`).
//! h2, under tonic, resets every stream whose `:authority` does not parse as
//! a URI authority (RFC 3986 §3.2), so the last two never reached a service.
//! h2 has no option to relax that check, hence this shim (the choice is
//! explained in docs/design-notes.md, "The :authority shim").
//!
//! [`AuthorityShim`] wraps an accepted connection and rewrites, on the way
//! in, every request header block whose `:authority` h2 would refuse, so that
//! it reads `localhost`. It works on HTTP/2 frames only and knows nothing of
//! HTTP semantics: the client preface and every frame other than
//! HEADERS/CONTINUATION pass through byte for byte, and so does every header
//! block until the first one that needs rewriting (see [`Rewriter`]). The
//! server-to-client direction is untouched.
//!
//! `:authority` carries nothing sigil relies on: callers are identified by
//! the kernel's peer credentials, never by what they send.
//!
//! [`stop`] bounds the shutdown of sigil's gRPC servers (Unix socket or
//! TLS): no client can hold it by keeping a connection open.

mod frame;
mod huffman;
mod io;
pub mod stop;

pub use frame::{DEFAULT_MAX_HEADER_LIST_SIZE, Rewriter, ShimError};
pub use io::AuthorityShim;

/// The `:authority` a refused value is replaced with, the one grpc-go sends.
pub const REPLACEMENT_AUTHORITY: &str = "localhost";

/// Whether h2 accepts `value` as `:authority`: exactly its own test,
/// `http::uri::Authority` parsing.
pub fn authority_is_valid(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Wraps every connection of an accept stream (as given to tonic's
/// `serve_with_incoming`) in an [`AuthorityShim`]. Wrap after anything that
/// reads the connection's peer credentials: the shim passes its
/// `connect_info` through.
pub fn incoming<S, C, E>(
    accepted: S,
) -> impl tokio_stream::Stream<Item = Result<AuthorityShim<C>, E>>
where
    S: tokio_stream::Stream<Item = Result<C, E>>,
{
    tokio_stream::StreamExt::map(accepted, |conn| conn.map(AuthorityShim::new))
}
