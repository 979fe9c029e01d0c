//! The shim as a connection: reads go through a [`Rewriter`], writes go
//! straight to the client.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::frame::Rewriter;

/// Buffered output above this is released once drained, so that one large
/// header block does not pin memory for the connection's lifetime.
const KEEP_CAPACITY: usize = 16 * 1024;

/// An accepted Unix-socket connection whose incoming HTTP/2 header blocks
/// have any `:authority` h2 would refuse replaced (see the crate docs).
/// Connection info (peer credentials) is that of the wrapped connection.
#[derive(Debug)]
pub struct AuthorityShim<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet handed to the reader.
    out: Vec<u8>,
    out_pos: usize,
    /// Set once the client broke HTTP/2: every later read fails too.
    failed: Option<String>,
}

impl<S> AuthorityShim<S> {
    /// Wraps a connection with the default header bound.
    pub fn new(inner: S) -> Self {
        Self::with_rewriter(inner, Rewriter::default())
    }

    /// Wraps a connection with a given rewriter (for its header bound).
    pub fn with_rewriter(inner: S, rewriter: Rewriter) -> Self {
        Self {
            inner,
            rewriter,
            out: Vec::new(),
            out_pos: 0,
            failed: None,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityShim<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(e) = &this.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e.clone())));
            }
            if let Some(ready) = this.out.get(this.out_pos..).filter(|r| !r.is_empty()) {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(ready.get(..n).unwrap_or_default());
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                    if this.out.capacity() > KEEP_CAPACITY {
                        this.out.shrink_to(KEEP_CAPACITY);
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Read into the caller's buffer, then take the bytes back out to
            // rewrite them: no buffer of our own per idle connection.
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let Some(read) = buf.filled().get(before..).filter(|r| !r.is_empty()) else {
                // End of stream: a partial frame held back is dropped, as the
                // server could not have used it either.
                return Poll::Ready(Ok(()));
            };
            let read = read.to_vec();
            buf.set_filled(before);
            if let Err(e) = this.rewriter.push(&read, &mut this.out) {
                tracing::debug!(error = %e, "closing a connection that broke HTTP/2");
                this.failed = Some(e.to_string());
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityShim<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for AuthorityShim<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
