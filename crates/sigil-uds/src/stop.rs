//! Shutdown that no client can hold up.
//!
//! tonic's graceful shutdown waits for every connection to finish, and hyper
//! finishes an HTTP/2 connection only once its client has sent the preface
//! and its streams are done. A client that connects and never sends a byte,
//! or one that stops reading, would hold a stopping agent or server for
//! ever. [`serve_draining`] gives connections a drain time once the service
//! begins to stop, then cancels a second token; every connection wrapped by
//! [`stoppable`] sees that token and ends: its reads end and its writes fail,
//! so hyper drops it, whatever state it is in. A connection looks at the
//! token only when it would wait for its client, so reads and writes that
//! are ready cost nothing more.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// Wraps every connection of an accept stream in a [`Stoppable`] ended by
/// `stop`.
pub fn stoppable<S, C, E>(
    accepted: S,
    stop: CancellationToken,
) -> impl Stream<Item = Result<Stoppable<C>, E>>
where
    S: Stream<Item = Result<C, E>>,
{
    accepted.map(move |conn| conn.map(|c| Stoppable::new(c, stop.clone())))
}

/// Runs `serve` (a tonic serve future whose graceful shutdown starts when
/// `stopping` is cancelled) to its end; if it has not ended `drain` after
/// `stopping`, cancels `stop`, which ends the connections wrapped by
/// [`stoppable`] with it, and then waits for `serve` to notice.
pub async fn serve_draining<F: Future>(
    serve: F,
    stopping: CancellationToken,
    stop: CancellationToken,
    drain: Duration,
    what: &'static str,
) -> F::Output {
    let mut serve = std::pin::pin!(serve);
    tokio::select! {
        out = &mut serve => out,
        () = async {
            stopping.cancelled().await;
            tokio::time::sleep(drain).await;
        } => {
            tracing::info!(?drain, "closing {what} connections still open after the drain time");
            stop.cancel();
            serve.await
        }
    }
}

/// A connection that ends once its token is cancelled (see the module docs);
/// connection info is that of the wrapped connection.
#[derive(Debug)]
pub struct Stoppable<C> {
    inner: C,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    stopped: bool,
}

impl<C> Stoppable<C> {
    /// Wraps `inner`, to be ended when `stop` is cancelled.
    pub fn new(inner: C, stop: CancellationToken) -> Self {
        Self {
            inner,
            stop: Box::pin(stop.cancelled_owned()),
            stopped: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &C {
        &self.inner
    }

    /// Whether the connection was ended; registers the task to be woken
    /// when it is. Called only when the connection would wait.
    fn stopped(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.stopped && self.stop.as_mut().poll(cx).is_ready() {
            tracing::debug!("ending a connection still open after the drain time");
            self.stopped = true;
        }
        self.stopped
    }
}

fn ended() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the service is stopping")
}

impl<C: AsyncRead + Unpin> AsyncRead for Stoppable<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stopped {
            return Poll::Ready(Ok(()));
        }
        // The token is looked at only when the connection would wait: a
        // ready read costs nothing more.
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending if this.stopped(cx) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Stoppable<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.stopped {
            return Poll::Ready(Err(ended()));
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending if this.stopped(cx) => Poll::Ready(Err(ended())),
            other => other,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.stopped {
            return Poll::Ready(Err(ended()));
        }
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending if this.stopped(cx) => Poll::Ready(Err(ended())),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<C: Connected> Connected for Stoppable<C> {
    type ConnectInfo = C::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A read waiting on a live client is woken and ends when the token is
    /// cancelled; writes fail from then on, and the client sees the end.
    #[tokio::test]
    async fn the_token_ends_a_waiting_reader_and_later_writes() {
        let stop = CancellationToken::new();
        let (mut client, server) = tokio::io::duplex(1 << 12);
        let mut conn = Stoppable::new(server, stop.clone());
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 5);
        let reader = tokio::spawn(async move {
            let n = conn.read(&mut [0u8; 16]).await.unwrap();
            (n, conn)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "ended before the token");
        stop.cancel();
        let (n, mut conn) = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the token woke the reader")
            .unwrap();
        assert_eq!(n, 0);
        let err = conn.write(b"late").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        drop(conn);
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    }

    /// A serve that ends by itself is not delayed by the drain time; one
    /// that does not end gets the stop token after it.
    #[tokio::test]
    async fn the_drain_starts_only_when_stopping_and_only_if_needed() {
        let stopping = CancellationToken::new();
        let stop = CancellationToken::new();
        let quick = {
            let stopping = stopping.clone();
            async move { stopping.cancelled().await }
        };
        stopping.cancel();
        let started = tokio::time::Instant::now();
        serve_draining(
            quick,
            stopping,
            stop.clone(),
            Duration::from_secs(30),
            "test",
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!stop.is_cancelled());

        let stopping = CancellationToken::new();
        let stuck = {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        };
        stopping.cancel();
        tokio::time::timeout(
            Duration::from_secs(10),
            serve_draining(
                stuck,
                stopping,
                stop.clone(),
                Duration::from_millis(100),
                "test",
            ),
        )
        .await
        .expect("the stop token ended the serve");
        assert!(stop.is_cancelled());
    }
}
