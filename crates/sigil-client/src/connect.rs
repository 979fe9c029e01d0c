//! The one way to open a gRPC channel over a Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::address::{AddressError, socket_path};

/// Why no channel could be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Connecting failed (no socket at the path, nobody listening, no
    /// permission, or the HTTP/2 handshake failed); the text and causes
    /// are the transport's own.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Opens channels to one Unix socket.
#[derive(Debug, Clone)]
pub struct UnixConnector {
    path: PathBuf,
    busy_retries: u32,
}

/// The wait between two attempts while the listener's backlog is full.
const BUSY_WAIT: Duration = Duration::from_millis(1);

impl UnixConnector {
    /// A connector to the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            busy_retries: 0,
        }
    }

    /// A connector to the socket named by `addr` (`unix:///path`, `unix:/path` or `/path`).
    pub fn from_address(addr: &str) -> Result<Self, AddressError> {
        Ok(Self::new(socket_path(addr)?))
    }

    /// Retries a connect up to `attempts` times, 1 ms apart, while the
    /// listener's backlog is full (a burst of many clients at once can fill
    /// it); by default a full backlog fails at once.
    pub fn retry_when_busy(mut self, attempts: u32) -> Self {
        self.busy_retries = attempts;
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a channel (one HTTP/2 connection, reopened by tonic when it breaks).
    pub async fn connect(&self) -> Result<Channel, ConnectError> {
        let path = self.path.clone();
        let retries = self.busy_retries;
        // The URI is never used for routing: every connection goes to the socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(open(path, retries).await?)) }
            }))
            .await?;
        Ok(channel)
    }
}

// Owned, so the connecting future borrows nothing from its caller.
async fn open(path: PathBuf, busy_retries: u32) -> std::io::Result<UnixStream> {
    let mut attempt = 0;
    loop {
        match UnixStream::connect(path.clone()).await {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && attempt < busy_retries => {
                attempt += 1;
                tokio::time::sleep(BUSY_WAIT).await;
            }
            r => return r,
        }
    }
}

/// Opens a channel to the Unix socket at `path`.
pub async fn channel(path: &Path) -> Result<Channel, ConnectError> {
    UnixConnector::new(path).connect().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_is_a_transport_error_naming_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let err = channel(&dir.path().join("absent.sock")).await.unwrap_err();
        let mut chain = err.to_string();
        let mut cur = std::error::Error::source(&err);
        while let Some(s) = cur {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            cur = s.source();
        }
        assert!(chain.contains("No such file or directory"), "{chain}");
    }

    #[test]
    fn addresses_become_paths() {
        let c = UnixConnector::from_address("unix:///tmp/a.sock").unwrap();
        assert_eq!(c.path(), Path::new("/tmp/a.sock"));
        assert!(UnixConnector::from_address("tcp://127.0.0.1:1").is_err());
    }
}
