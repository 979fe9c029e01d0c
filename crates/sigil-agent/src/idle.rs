//! Closes connections of the agent's socket that stay idle: no open stream
//! (and so no call in progress) for `[agent.limits] idle_timeout`.
//!
//! A connection costs the agent two open files and a slot of its uid's
//! `max_connections_per_uid`; a caller that connects and then does nothing
//! would pin both for as long as it likes. hyper has no idle timeout for
//! HTTP/2 servers, so [`Idle`] watches the connection's frames itself: it
//! counts the streams the client opens (HEADERS on a new stream ID) and
//! those that end (the agent's END_STREAM, or RST_STREAM from either side),
//! and once none has been open for the timeout it ends the connection's
//! input, which makes hyper close it and give its slots back.
//!
//! Only streams count as activity. PINGs, SETTINGS or WINDOW_UPDATEs do not,
//! or a caller could keep a socket forever by sending them. A stream is
//! never cut for being quiet: FetchX509SVID may push nothing for hours.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

/// The client connection preface (RFC 9113 §3.4), which precedes its frames.
const CLIENT_PREFACE_LEN: usize = 24;
/// Length of an HTTP/2 frame header (RFC 9113 §4.1).
const FRAME_HEADER_LEN: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const END_STREAM: u8 = 0x1;

/// Wraps every connection of an accept stream in an [`Idle`] closing it after
/// `timeout` without an open stream.
pub fn incoming<S, C>(accepted: S, timeout: Duration) -> impl Stream<Item = io::Result<Idle<C>>>
where
    S: Stream<Item = io::Result<C>>,
{
    accepted.map(move |conn| conn.map(|c| Idle::new(c, timeout)))
}

/// The type, flags and stream of one frame.
#[derive(Debug, Clone, Copy)]
struct FrameHead {
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Finds frame headers in one direction of a connection, whatever the
/// chunks its bytes come in; payloads are skipped unread.
#[derive(Debug)]
struct FrameScanner {
    /// Bytes still to pass over: the preface, then each frame's payload.
    skip: usize,
    head: [u8; FRAME_HEADER_LEN],
    have: usize,
}

impl FrameScanner {
    fn new(preface: usize) -> Self {
        Self {
            skip: preface,
            head: [0; FRAME_HEADER_LEN],
            have: 0,
        }
    }

    fn feed(&mut self, mut data: &[u8], mut on_frame: impl FnMut(FrameHead)) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = data.get(n..).unwrap_or_default();
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.have).min(data.len());
            let (part, rest) = data.split_at(n);
            if let Some(dst) = self.head.get_mut(self.have..self.have + n) {
                dst.copy_from_slice(part);
            }
            self.have += n;
            data = rest;
            if self.have == FRAME_HEADER_LEN {
                let h = self.head;
                self.have = 0;
                self.skip =
                    (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                on_frame(FrameHead {
                    kind: h[3],
                    flags: h[4],
                    stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                });
            }
        }
    }
}

/// The streams of a connection that are open.
#[derive(Debug, Default)]
struct Streams {
    open: HashSet<u32>,
    /// The highest stream ID the client opened: a new stream must have a
    /// higher one (RFC 9113 §5.1.1), so HEADERS on an older, possibly
    /// already closed stream (trailers, or a replay meant to keep the
    /// connection busy) never counts as opening one.
    highest: u32,
    /// Set when the last open stream ended; the idle timer restarts then.
    emptied: bool,
}

impl Streams {
    fn client_sent(&mut self, f: FrameHead) {
        match f.kind {
            HEADERS if f.stream > self.highest => {
                self.highest = f.stream;
                self.open.insert(f.stream);
            }
            RST_STREAM => self.end(f.stream),
            _ => {}
        }
    }

    fn agent_sent(&mut self, f: FrameHead) {
        match f.kind {
            DATA | HEADERS if f.flags & END_STREAM != 0 => self.end(f.stream),
            RST_STREAM => self.end(f.stream),
            _ => {}
        }
    }

    fn end(&mut self, stream: u32) {
        if self.open.remove(&stream) && self.open.is_empty() {
            self.emptied = true;
        }
    }
}

/// A connection closed once it has had no open stream for its timeout (see
/// the module docs); connection info is that of the wrapped connection.
#[derive(Debug)]
pub struct Idle<C> {
    inner: C,
    timeout: Duration,
    /// When the connection counts as idle, if no stream is open by then.
    deadline: Pin<Box<Sleep>>,
    from_client: FrameScanner,
    from_agent: FrameScanner,
    streams: Streams,
    /// Set once the input was ended for idleness: it stays ended.
    closed: bool,
}

impl<C> Idle<C> {
    /// Wraps a connection just accepted: its idle time starts now.
    pub fn new(inner: C, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            from_client: FrameScanner::new(CLIENT_PREFACE_LEN),
            from_agent: FrameScanner::new(0),
            streams: Streams::default(),
            closed: false,
        }
    }

    /// Restarts the idle time when the last open stream has just ended, and
    /// has the deadline wake this task: h2 writes a stream's end after it
    /// last polled the input, so the read side may not look again before
    /// something else wakes the connection.
    fn restart_if_emptied(&mut self, cx: &mut Context<'_>) {
        if std::mem::take(&mut self.streams.emptied) {
            self.deadline.as_mut().reset(Instant::now() + self.timeout);
            // Just reset to a later instant, it cannot be due: this only
            // registers the waker.
            let _ = self.deadline.as_mut().poll(cx);
        }
    }

    fn agent_wrote(&mut self, data: &[u8], cx: &mut Context<'_>) {
        let streams = &mut self.streams;
        self.from_agent.feed(data, |f| streams.agent_sent(f));
        self.restart_if_emptied(cx);
    }
}

impl<C: AsyncRead + Unpin> AsyncRead for Idle<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        if let Poll::Ready(read) = Pin::new(&mut this.inner).poll_read(cx, buf) {
            if read.is_ok() {
                let streams = &mut this.streams;
                let new = buf.filled().get(before..).unwrap_or_default();
                this.from_client.feed(new, |f| streams.client_sent(f));
                this.restart_if_emptied(cx);
            }
            return Poll::Ready(read);
        }
        // Waiting for the client: the deadline wakes this task too, and
        // while a stream is open it is not even looked at.
        if this.streams.open.is_empty() && this.deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!(
                timeout = ?this.timeout,
                "closing a connection without an open stream for the idle timeout"
            );
            this.closed = true;
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Idle<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.agent_wrote(buf.get(..n).unwrap_or_default(), cx);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            this.agent_wrote(b.get(..take).unwrap_or_default(), cx);
            left -= take;
        }
        Poll::Ready(Ok(n))
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

impl<C: Connected> Connected for Idle<C> {
    type ConnectInfo = C::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            kind,
            flags,
        ];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend(std::iter::repeat_n(0xAA, payload));
        f
    }

    /// Feeds `bytes` one chunk size at a time, to catch headers split
    /// across reads.
    fn heads(preface: usize, bytes: &[u8], chunk: usize) -> Vec<(u8, u8, u32)> {
        let mut s = FrameScanner::new(preface);
        let mut out = Vec::new();
        for c in bytes.chunks(chunk) {
            s.feed(c, |f| out.push((f.kind, f.flags, f.stream)));
        }
        out
    }

    #[test]
    fn frames_are_found_whatever_the_chunks() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, 0, 18));
        bytes.extend(frame(HEADERS, 0x4, 1, 300));
        bytes.extend(frame(DATA, END_STREAM, 1, 0));
        bytes.extend(frame(RST_STREAM, 0, 0x8000_0003, 4));
        let want = vec![
            (0x4, 0, 0),
            (HEADERS, 0x4, 1),
            (DATA, END_STREAM, 1),
            (RST_STREAM, 0, 3),
        ];
        for chunk in [1, 2, 7, 9, 10, 64, 4096] {
            assert_eq!(heads(CLIENT_PREFACE_LEN, &bytes, chunk), want, "{chunk}");
        }
    }

    fn head(kind: u8, flags: u8, stream: u32) -> FrameHead {
        FrameHead {
            kind,
            flags,
            stream,
        }
    }

    #[test]
    fn streams_open_on_new_ids_and_end_either_way() {
        let mut s = Streams::default();
        s.client_sent(head(HEADERS, END_STREAM, 1));
        s.client_sent(head(HEADERS, 0, 3));
        s.client_sent(head(HEADERS, 0, 5));
        assert_eq!(s.open.len(), 3);
        // Data from the agent without END_STREAM ends nothing.
        s.agent_sent(head(DATA, 0, 1));
        s.agent_sent(head(HEADERS, END_STREAM, 1));
        s.agent_sent(head(RST_STREAM, 0, 3));
        s.client_sent(head(RST_STREAM, 0, 5));
        assert!(s.open.is_empty() && s.emptied);
        // HEADERS on a stream already used (trailers, replays) open nothing.
        s.emptied = false;
        s.client_sent(head(HEADERS, 0, 3));
        s.client_sent(head(HEADERS, 0, 5));
        assert!(s.open.is_empty() && !s.emptied);
    }

    /// On real time (the workspace's tokio has no test clock), with only
    /// lower bounds on when the input ends.
    #[tokio::test]
    async fn a_silent_connection_ends_after_the_timeout_and_an_open_stream_keeps_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeout = Duration::from_millis(300);
        let (client, agent) = tokio::io::duplex(1 << 16);
        let mut conn = Idle::new(agent, timeout);
        let mut buf = [0u8; 64];
        let start = Instant::now();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
        assert!(start.elapsed() >= timeout);
        // It stays ended.
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);

        let (mut client2, agent) = tokio::io::duplex(1 << 16);
        let mut conn = Idle::new(agent, timeout);
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(HEADERS, 0x4, 1, 5));
        client2.write_all(&hello).await.unwrap();
        let mut got = vec![0u8; hello.len()];
        conn.read_exact(&mut got).await.unwrap();
        // A stream is open: ten timeouts pass without the input ending.
        let quiet = tokio::time::timeout(10 * timeout, conn.read(&mut buf)).await;
        assert!(quiet.is_err(), "a connection with an open stream was ended");
        // The agent ends the stream: the idle time starts from then.
        let ended = Instant::now();
        conn.write_all(&frame(HEADERS, END_STREAM | 0x4, 1, 3))
            .await
            .unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
        assert!(ended.elapsed() >= timeout);
        drop(client);
    }
}
