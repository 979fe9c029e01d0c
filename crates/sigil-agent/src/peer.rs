//! Who is at the other end of a Workload API connection, as the kernel tells it.
//!
//! A workload is identified only from what the kernel records about the
//! process that called `connect()` (`SO_PEERCRED` and a pidfd from
//! `SO_PEERPIDFD`), never from anything it sends. Attestation then reads
//! `/proc/<pid>`, and that is only meaningful while the PID still names the
//! process that connected: a caller could connect, hand the socket to a child
//! and exit, so that a more privileged process reusing its PID gets attested
//! in its place. [`PeerInfo`] keeps a pidfd and the start time taken at accept,
//! and [`PeerInfo::check_same_process`], called after attestation, rejects the
//! request unless the original process is still alive under that PID — the
//! same guarantee as SPIRE's peertracker, but without its race: the pidfd
//! comes from `SO_PEERPIDFD` (Linux 6.5 and later), which names the process
//! that called `connect()` even if it has exited since.
//!
//! Older kernels have no `SO_PEERPIDFD`. There a caller can connect, exit
//! before the agent accepts, and have its PID recycled by another process:
//! `pidfd_open(pid)` and the start time read at accept then both describe
//! the newcomer, and nothing can tell. The agent therefore refuses to start
//! on such kernels (see [`decide_pid_attestation`]) unless
//! `[agent] allow_insecure_pid_attestation = true` accepts that race.
//!
//! The agent must run in the host PID namespace (or the workloads'), or the
//! kernel reports PID 0 and every caller is refused.

use std::fs;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Sleep;
use tokio_stream::Stream;

/// Why a caller could not be identified, or is no longer the process that
/// connected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The kernel would not say who the caller is: `SO_PEERCRED` failed, the
    /// caller is in a PID namespace the agent cannot see (PID 0), or the
    /// connection was not accepted through [`incoming`].
    #[error("cannot identify the caller: {0}")]
    Credentials(String),
    /// The process that connected has exited (it may be a zombie not yet
    /// reaped), so nothing read about its PID can be trusted.
    #[error("the calling process {pid} has exited")]
    ProcessGone {
        /// The PID the kernel reported at connect.
        pid: i32,
    },
    /// The PID now names a different process than the one that connected (its
    /// start time changed).
    #[error("PID {pid} now belongs to a different process than the caller")]
    PidReused {
        /// The PID the kernel reported at connect.
        pid: i32,
    },
    /// The process's effective uid or gid in `/proc` differ from those the
    /// kernel recorded at connect, for instance after it executed a setuid
    /// binary, so `/proc` no longer describes the caller.
    #[error("the calling process {pid} changed its uid or gid after connecting")]
    CredentialsChanged {
        /// The PID the kernel reported at connect.
        pid: i32,
    },
    /// Reading the caller's `/proc` entries failed for a reason other than
    /// the process being gone (permissions, a missing `/proc`, bad format).
    #[error("reading /proc for the caller: {0}")]
    Proc(#[source] io::Error),
    /// The blocking task that reads `/proc` panicked or was cancelled.
    #[error("attestation task failed: {0}")]
    Task(String),
    /// The kernel offers no `SO_PEERPIDFD` and the configuration did not
    /// accept the PID-reuse race that leaves open.
    #[error(
        "this kernel has no SO_PEERPIDFD (Linux 6.5 or later): a caller's PID reused between connect and accept would be attested as the new process; upgrade the kernel, or accept the risk with [agent] allow_insecure_pid_attestation = true"
    )]
    NoPeerPidfd,
}

/// Whether the kernel tells which process connected, as a pidfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidfdSupport {
    /// `SO_PEERPIDFD` works: the pidfd pins the process that connected.
    PeerPidfd,
    /// No `SO_PEERPIDFD` (before Linux 6.5): the caller can only be found
    /// by PID after accept, which may by then name another process.
    Missing,
}

/// Asks the kernel for `SO_PEERPIDFD` on a fresh socket pair.
pub fn probe_peer_pidfd() -> io::Result<PidfdSupport> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (a, _b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    Ok(match getsockopt(&a, sockopt::PeerPidfd) {
        Ok(_) => PidfdSupport::PeerPidfd,
        Err(e) => {
            tracing::debug!(error = %e, "SO_PEERPIDFD probe failed");
            PidfdSupport::Missing
        }
    })
}

/// Whether the agent may serve the Workload API with this kernel: always
/// with `SO_PEERPIDFD`; without it only when the operator accepted, with
/// `allow_insecure`, that a PID recycled between connect and accept goes
/// unnoticed.
pub fn decide_pid_attestation(
    support: PidfdSupport,
    allow_insecure: bool,
) -> Result<(), PeerError> {
    match (support, allow_insecure) {
        (PidfdSupport::PeerPidfd, _) => Ok(()),
        (PidfdSupport::Missing, true) => {
            tracing::warn!(
                "no SO_PEERPIDFD on this kernel; allow_insecure_pid_attestation = true: a caller's PID recycled between connect and accept is NOT detected"
            );
            Ok(())
        }
        (PidfdSupport::Missing, false) => Err(PeerError::NoPeerPidfd),
    }
}

/// What the kernel says about the process at the other end of a Unix socket,
/// captured at accept.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Process ID of the caller, in the agent's PID namespace.
    pub pid: i32,
    /// Effective user ID of the caller when it connected.
    pub uid: u32,
    /// Effective group ID of the caller when it connected.
    pub gid: u32,
    /// What ties the PID to the process that connected.
    pin: ProcessPin,
}

/// How [`PeerInfo::check_same_process`] knows the PID still names the
/// caller.
#[derive(Debug, Clone)]
enum ProcessPin {
    /// A pidfd for the exact process that connected. It turns readable when
    /// that process exits, and a PID is handed to another process only once
    /// its holder has exited and been reaped; so while the pidfd is not
    /// readable, the PID is the caller's. Shared because every request on a
    /// connection carries a clone of this value.
    Pidfd(Arc<OwnedFd>),
    /// Only when the kernel offers neither `SO_PEERPIDFD` nor `pidfd_open`:
    /// field 22 of `/proc/<pid>/stat` (clock ticks after boot), read at
    /// accept, compared with the one read after attestation.
    StartTime(u64),
}

impl PeerInfo {
    /// Reads `SO_PEERCRED`, `SO_PEERPIDFD` (falling back to `pidfd_open(pid)`
    /// on older kernels, which does not catch a PID reused before this call:
    /// see the module docs) and the process start time.
    pub fn from_stream(stream: &UnixStream) -> Result<Self, PeerError> {
        let creds = getsockopt(stream, sockopt::PeerCredentials)
            .map_err(|e| PeerError::Credentials(format!("SO_PEERCRED: {e}")))?;
        let pid = creds.pid();
        if pid <= 0 {
            // The kernel reports 0 when the caller's PID namespace is not ours
            // or a descendant of it; its /proc entry is then out of reach.
            return Err(PeerError::Credentials(
                "the caller's PID is not visible from the agent's PID namespace".to_owned(),
            ));
        }
        let pidfd = match getsockopt(stream, sockopt::PeerPidfd) {
            Ok(fd) => Some(fd),
            Err(Errno::ESRCH) => return Err(PeerError::ProcessGone { pid }),
            Err(sockopt_err) => {
                // Before Linux 6.5 there is no SO_PEERPIDFD, and the agent
                // only gets here when allow_insecure_pid_attestation said so.
                // pidfd_open by PID lands on whichever process holds the PID
                // now: if the caller exited and its PID was reused before
                // this accept, the pidfd and the start time read below both
                // describe the newcomer and nothing catches it. Reuse after
                // this point is still caught by the pidfd and start time.
                tracing::debug!(%sockopt_err, pid, "SO_PEERPIDFD unavailable, using pidfd_open");
                match pidfd_open(pid) {
                    Ok(fd) => Some(fd),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        return Err(PeerError::ProcessGone { pid });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, pid, "no pidfd for caller; PID reuse is detected by start time only");
                        None
                    }
                }
            }
        };
        Self::capture(pid, creds.uid(), creds.gid(), pidfd)
    }

    /// Pins a process whose credentials and pidfd are already known: by its
    /// pidfd, or without one by its start time.
    pub(crate) fn capture(
        pid: i32,
        uid: u32,
        gid: u32,
        pidfd: Option<OwnedFd>,
    ) -> Result<Self, PeerError> {
        let pin = match pidfd {
            // Already gone: refused now rather than after attestation.
            Some(fd) if pidfd_exited(&fd)? => return Err(PeerError::ProcessGone { pid }),
            Some(fd) => ProcessPin::Pidfd(Arc::new(fd)),
            None => {
                let stat = read_stat(pid)?;
                if stat.is_dead() {
                    return Err(PeerError::ProcessGone { pid });
                }
                ProcessPin::StartTime(stat.start_time)
            }
        };
        Ok(Self { pid, uid, gid, pin })
    }

    /// After attestation: `Err` unless the process that connected still
    /// holds its PID.
    ///
    /// Call this after every attestor has read `/proc`; success proves all
    /// those reads described the caller. With a pidfd that is one `poll`:
    /// the caller had not exited after the last read, so no other process
    /// can have held its PID during them. The caller's effective uid and gid
    /// are checked against the ones recorded at connect where the
    /// attestor reads them (`/proc/<pid>/status`, before this). Without a
    /// pidfd, the PID is also re-read: its start time must be unchanged,
    /// it must not be a zombie, and its ids must still be the recorded ones.
    pub fn check_same_process(&self) -> Result<(), PeerError> {
        let pid = self.pid;
        let start_time = match &self.pin {
            ProcessPin::Pidfd(fd) if pidfd_exited(fd)? => {
                return Err(PeerError::ProcessGone { pid });
            }
            ProcessPin::Pidfd(_) => return Ok(()),
            ProcessPin::StartTime(t) => *t,
        };
        let stat = read_stat(pid)?;
        if stat.start_time != start_time {
            return Err(PeerError::PidReused { pid });
        }
        // Without a pidfd a zombie still has its /proc entry and start time.
        if stat.is_dead() {
            return Err(PeerError::ProcessGone { pid });
        }
        let status = read_status(pid)?;
        if status.uid != self.uid || status.gid != self.gid {
            return Err(PeerError::CredentialsChanged { pid });
        }
        Ok(())
    }

    /// This peer pinned by its start time only, as if the kernel had given
    /// no pidfd, for tests of that guard.
    #[cfg(test)]
    #[allow(clippy::unwrap_used, reason = "test helper")]
    pub(crate) fn without_pidfd(&self) -> Self {
        Self::capture(self.pid, self.uid, self.gid, None).unwrap()
    }

    /// This peer as if its PID had been handed to another process since it
    /// was captured (another start time; no pidfd), for tests of the
    /// PID-reuse check.
    #[cfg(test)]
    pub(crate) fn with_other_start_time(self) -> Self {
        let mut p = self.without_pidfd();
        if let ProcessPin::StartTime(t) = &mut p.pin {
            *t += 1;
        }
        p
    }

    /// Process `pid` captured as a caller with this process's effective
    /// ids (a child of the test, or the test itself), for tests.
    #[cfg(test)]
    #[allow(clippy::unwrap_used, reason = "test helper")]
    pub(crate) fn with_own_ids(pid: i32, pidfd: Option<OwnedFd>) -> Self {
        Self::capture(
            pid,
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
            pidfd,
        )
        .unwrap()
    }

    /// This process captured as a caller, without a pidfd, for tests.
    #[cfg(test)]
    #[allow(clippy::unwrap_used, reason = "test helper")]
    pub(crate) fn this_process() -> Self {
        Self::with_own_ids(i32::try_from(std::process::id()).unwrap(), None)
    }

    /// Whether a pidfd pins the caller (tells which PID-reuse guard applies).
    pub fn has_pidfd(&self) -> bool {
        matches!(self.pin, ProcessPin::Pidfd(_))
    }
}

/// Whether the process behind a pidfd has exited: the kernel makes a pidfd
/// readable once the process is a zombie or reaped.
fn pidfd_exited(fd: &OwnedFd) -> Result<bool, PeerError> {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => {
                return Ok(fds
                    .first()
                    .and_then(PollFd::revents)
                    .is_some_and(|r| !r.is_empty()));
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(PeerError::Proc(io::Error::from(e))),
        }
    }
}

/// `pidfd_open(2)`, which nix 0.32 does not wrap.
#[expect(
    unsafe_code,
    reason = "pidfd_open has no safe wrapper in nix 0.32 or std"
)]
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and reads or writes no memory of
    // ours; the result is checked before use.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(ret).map_err(|_| io::Error::other("pidfd_open returned a bad fd"))?;
    // SAFETY: a non-negative pidfd_open result is a new descriptor (already
    // close-on-exec) that nothing else owns, so OwnedFd may take it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    /// Field 3: `R`, `S`, `Z` (zombie), `X` (dead), ...
    state: char,
    /// Field 22.
    start_time: u64,
}

impl ProcStat {
    fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may itself hold spaces and `)`, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // fields[0] is field 3 of the file.
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

fn read_stat(pid: i32) -> Result<ProcStat, PeerError> {
    let path = format!("/proc/{pid}/stat");
    read_proc(pid, &path, parse_stat)?.ok_or_else(|| {
        PeerError::Proc(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: unexpected format"),
        ))
    })
}

/// The fields of `/proc/<pid>/status` the attestors use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcStatus {
    /// Effective uid (second column of `Uid:`), the one `SO_PEERCRED` reports.
    pub(crate) uid: u32,
    /// Effective gid (second column of `Gid:`).
    pub(crate) gid: u32,
    /// Supplementary group IDs (`Groups:`), possibly empty.
    pub(crate) groups: Vec<u32>,
}

/// Parses `/proc/<pid>/status`: the second column of `Uid:` and `Gid:`, and
/// `Groups:`. Each key is looked up where a line starts, without splitting
/// the other 50-odd lines: every Workload API call parses this file. The
/// last such line counts, so that even a newline in the process-controlled
/// `Name:`, the first line (the kernel escapes it), could not stand in for
/// the kernel's own lines after it.
fn parse_status(text: &str) -> Option<ProcStatus> {
    let id = |key| {
        status_line(text, key)?
            .split_ascii_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let groups = status_line(text, "\nGroups:")?
        .split_ascii_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<u32>, _>>()
        .ok()?;
    Some(ProcStatus {
        uid: id("\nUid:")?,
        gid: id("\nGid:")?,
        groups,
    })
}

/// The rest of the last line of `text` that starts with `key` (given with
/// its leading newline), after the key.
fn status_line<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = match text.rfind(key) {
        Some(at) => text.get(at + key.len()..)?,
        None => text.strip_prefix(key.strip_prefix('\n')?)?,
    };
    Some(rest.split_once('\n').map_or(rest, |(line, _)| line))
}

/// Reads the caller's effective ids and supplementary groups.
pub(crate) fn read_status(pid: i32) -> Result<ProcStatus, PeerError> {
    let path = format!("/proc/{pid}/status");
    read_proc(pid, &path, parse_status)?.ok_or_else(|| {
        PeerError::Proc(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: unexpected format"),
        ))
    })
}

/// What a `/proc/<pid>/status` or `stat` read is read into, on the stack
/// (status is about 1.5 KiB); a longer file continues on the heap.
const PROC_READ_START: usize = 4096;

/// Reads a `/proc/<pid>/…` file and gives its text to `parse`; a missing
/// entry means the process is gone.
///
/// Every Workload API call reads these files: the usual size is read into
/// a buffer on the stack, with no allocation (a 4 KiB one is not in the
/// allocator's per-thread cache, and during a burst it contended on the
/// arena lock). `File`'s own `read_to_string` would also first `statx` and
/// `lseek` it for a size, which procfs reports as 0.
fn read_proc<R>(pid: i32, path: &str, parse: impl FnOnce(&str) -> R) -> Result<R, PeerError> {
    use std::io::Read;
    let err = |e| proc_error(pid, path, e);
    let mut file = fs::File::open(path).map_err(err)?;
    let mut buf = [0u8; PROC_READ_START];
    let mut len = 0;
    while let Some(room) = buf.get_mut(len..).filter(|r| !r.is_empty()) {
        match file.read(room) {
            Ok(0) => {
                let text = buf.get(..len).unwrap_or_default();
                return Ok(parse(
                    std::str::from_utf8(text).map_err(invalid).map_err(err)?,
                ));
            }
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(e)),
        }
    }
    // Longer than the stack buffer: the rest on the heap.
    let mut text = buf.to_vec();
    file.read_to_end(&mut text).map_err(err)?;
    let text = String::from_utf8(text).map_err(invalid).map_err(err)?;
    Ok(parse(&text))
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Maps an I/O error on `/proc/<pid>/…`: ENOENT (reaped) and ESRCH (exited
/// while open) mean the process is gone; anything else keeps the path.
pub(crate) fn proc_error(pid: i32, path: &str, e: io::Error) -> PeerError {
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        PeerError::ProcessGone { pid }
    } else {
        PeerError::Proc(io::Error::new(e.kind(), format!("{path}: {e}")))
    }
}

/// What the tonic connection layer attaches to every request on a
/// [`PeerStream`].
#[derive(Clone, Debug)]
pub struct PeerConnectInfo {
    /// The caller as captured at accept, or why it could not be captured.
    pub peer: Result<PeerInfo, String>,
}

/// A Unix stream that carries the [`PeerInfo`] captured at accept, so tonic
/// handlers can read it through [`peer_of`].
#[derive(Debug)]
pub struct PeerStream {
    inner: UnixStream,
    info: PeerConnectInfo,
    /// The uid `SO_PEERCRED` reports, kept even when the caller cannot be
    /// identified further (it exited, or its PID is not visible).
    kernel_uid: Option<u32>,
}

impl PeerStream {
    /// Wraps an accepted stream, capturing its peer at once: the earlier the
    /// pidfd is taken, the less room for the caller to exit first.
    pub fn new(stream: UnixStream) -> Self {
        let peer = PeerInfo::from_stream(&stream).map_err(|e| {
            tracing::warn!(error = %e, "could not identify Workload API caller");
            e.to_string()
        });
        let kernel_uid = match &peer {
            Ok(p) => Some(p.uid),
            Err(_) => getsockopt(&stream, sockopt::PeerCredentials)
                .ok()
                .map(|c| c.uid()),
        };
        Self {
            inner: stream,
            info: PeerConnectInfo { peer },
            kernel_uid,
        }
    }

    /// The peer captured at accept.
    pub fn peer(&self) -> &PeerConnectInfo {
        &self.info
    }

    /// The uid of the process that connected, as the kernel recorded it at
    /// `connect()`: known even when that process has exited since (a child
    /// that connected and handed the socket to its parent), and not forgeable,
    /// so connection caps count such a connection against it. `None` only
    /// when the kernel does not answer `SO_PEERCRED`.
    pub fn kernel_uid(&self) -> Option<u32> {
        self.kernel_uid
    }
}

/// Implements `AsyncRead` and `AsyncWrite` for a connection wrapper by
/// passing every call to its `inner` field: `delegate_io!(Wrapper)`, or
/// `delegate_io!([C] Wrapper<C>; read: [C: AsyncRead + Unpin]; write:
/// [C: AsyncWrite + Unpin])` for a generic one.
macro_rules! delegate_io {
    ([$($g:tt)*] $ty:ty; read: [$($rb:tt)*]; write: [$($wb:tt)*]) => {
        impl<$($g)*> ::tokio::io::AsyncRead for $ty
        where
            $($rb)*
        {
            fn poll_read(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &mut ::tokio::io::ReadBuf<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                let inner = ::std::pin::Pin::new(&mut self.get_mut().inner);
                ::tokio::io::AsyncRead::poll_read(inner, cx, buf)
            }
        }

        impl<$($g)*> ::tokio::io::AsyncWrite for $ty
        where
            $($wb)*
        {
            fn poll_write(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                let inner = ::std::pin::Pin::new(&mut self.get_mut().inner);
                ::tokio::io::AsyncWrite::poll_write(inner, cx, buf)
            }

            fn poll_flush(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                let inner = ::std::pin::Pin::new(&mut self.get_mut().inner);
                ::tokio::io::AsyncWrite::poll_flush(inner, cx)
            }

            fn poll_shutdown(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                let inner = ::std::pin::Pin::new(&mut self.get_mut().inner);
                ::tokio::io::AsyncWrite::poll_shutdown(inner, cx)
            }

            fn poll_write_vectored(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                let inner = ::std::pin::Pin::new(&mut self.get_mut().inner);
                ::tokio::io::AsyncWrite::poll_write_vectored(inner, cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                ::tokio::io::AsyncWrite::is_write_vectored(&self.inner)
            }
        }
    };
    ($ty:ty) => {
        $crate::peer::delegate_io!([] $ty; read: []; write: []);
    };
}
pub(crate) use delegate_io;

delegate_io!(PeerStream);

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

/// How long to stop accepting after the process or system ran out of file
/// descriptors or memory; the listener stays readable meanwhile, so retrying
/// at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The accepted connections of a Unix listener as [`PeerStream`]s; see
/// [`incoming`].
#[derive(Debug)]
pub struct PeerIncoming {
    listener: UnixListener,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Stream for PeerIncoming {
    type Item = io::Result<PeerStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(sleep) = &mut this.backoff {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.backoff = None;
        }
        match this.listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => Poll::Ready(Some(Ok(PeerStream::new(stream)))),
            Poll::Ready(Err(e)) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tracing::warn!(error = %e, "accept failed; pausing the Workload API listener");
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
                // tonic logs the error and keeps serving.
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Turns a listener into the connection stream for
/// `tonic::transport::Server::serve_with_incoming`, capturing each caller's
/// [`PeerInfo`] as it is accepted.
pub fn incoming(listener: UnixListener) -> PeerIncoming {
    PeerIncoming {
        listener,
        backoff: None,
    }
}

/// The caller of a tonic request served over [`incoming`].
pub fn peer_of<T>(req: &tonic::Request<T>) -> Result<PeerInfo, PeerError> {
    match req.extensions().get::<PeerConnectInfo>() {
        Some(PeerConnectInfo { peer: Ok(peer) }) => Ok(peer.clone()),
        Some(PeerConnectInfo { peer: Err(e) }) => Err(PeerError::Credentials(e.clone())),
        None => Err(PeerError::Credentials(
            "the connection was not accepted through peer::incoming".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    const HELPER_ENV: &str = "SIGIL_PEER_TEST_CONNECT";

    /// Not a test: the child process for the tests below. The test binary
    /// re-runs itself with only this function selected, so the child needs
    /// nothing installed (no python3, no socat).
    #[test]
    #[ignore = "helper process, run by other tests"]
    fn helper_connect_and_sleep() {
        let Some(path) = std::env::var_os(HELPER_ENV) else {
            return;
        };
        let _conn = std::os::unix::net::UnixStream::connect(path).unwrap();
        std::thread::sleep(Duration::from_secs(60));
    }

    fn spawn_connecting_child(path: &std::path::Path) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "peer::tests::helper_connect_and_sleep",
                "--ignored",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    async fn accept(listener: &UnixListener) -> UnixStream {
        tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .expect("child did not connect within 30s")
            .unwrap()
            .0
    }

    fn listener() -> (tempfile::TempDir, std::path::PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    #[tokio::test]
    async fn own_process_is_identified_and_alive() {
        let (_dir, path, listener) = listener();
        let _client = UnixStream::connect(&path).await.unwrap();
        let server = accept(&listener).await;
        let peer = PeerInfo::from_stream(&server).unwrap();
        assert_eq!(peer.pid, i32::try_from(std::process::id()).unwrap());
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(peer.gid, nix::unistd::getegid().as_raw());
        assert!(peer.has_pidfd(), "Linux 6.5+ offers SO_PEERPIDFD");
        peer.check_same_process().unwrap();
    }

    #[test]
    fn this_kernel_offers_so_peerpidfd() {
        // The machines this runs on have Linux 6.5 or later.
        assert_eq!(probe_peer_pidfd().unwrap(), PidfdSupport::PeerPidfd);
    }

    #[test]
    fn without_so_peerpidfd_the_agent_refuses_unless_told_to() {
        let err = decide_pid_attestation(PidfdSupport::Missing, false).unwrap_err();
        assert!(matches!(err, PeerError::NoPeerPidfd), "{err:?}");
        assert!(
            err.to_string()
                .contains("allow_insecure_pid_attestation = true"),
            "{err}"
        );
        decide_pid_attestation(PidfdSupport::Missing, true).unwrap();
        decide_pid_attestation(PidfdSupport::PeerPidfd, false).unwrap();
        decide_pid_attestation(PidfdSupport::PeerPidfd, true).unwrap();
    }

    #[tokio::test]
    async fn pidfd_open_fallback_works_for_a_live_process() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let fd = pidfd_open(pid).unwrap();
        let peer = PeerInfo::with_own_ids(pid, Some(fd));
        peer.check_same_process().unwrap();
    }

    #[tokio::test]
    async fn exited_child_is_rejected() {
        let (_dir, path, listener) = listener();
        let mut child = spawn_connecting_child(&path);
        let server = accept(&listener).await;
        let peer = PeerInfo::from_stream(&server).unwrap();
        assert_eq!(peer.pid, i32::try_from(child.id()).unwrap());
        assert!(peer.has_pidfd());
        // A copy without the pidfd exercises the start-time-only guard.
        let no_pidfd = peer.without_pidfd();
        peer.check_same_process().unwrap();
        no_pidfd.check_same_process().unwrap();

        child.kill().unwrap();
        child.wait().unwrap();
        for p in [&peer, &no_pidfd] {
            let err = p.check_same_process().unwrap_err();
            assert!(
                matches!(
                    err,
                    PeerError::ProcessGone { .. } | PeerError::PidReused { .. }
                ),
                "{err:?}"
            );
        }
    }

    #[tokio::test]
    async fn zombie_child_is_rejected() {
        let (_dir, path, listener) = listener();
        let mut child = spawn_connecting_child(&path);
        let server = accept(&listener).await;
        let peer = PeerInfo::from_stream(&server).unwrap();
        let no_pidfd = peer.without_pidfd();
        // Killed but not yet reaped: /proc/<pid> is still there with the same
        // start time, so only the zombie state or the pidfd give it away.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(peer.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // The child (a test binary) has threads besides its leader: the
        // leader shows as a zombie while they may still be exiting, and
        // the process has exited (its pidfd readable) once they are gone,
        // its `task` directory holding the leader alone.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let threads = || {
            std::fs::read_dir(format!("/proc/{}/task", peer.pid))
                .unwrap()
                .count()
        };
        while !read_stat(peer.pid).unwrap().is_dead() || threads() > 1 {
            assert!(std::time::Instant::now() < deadline, "child did not die");
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in [&peer, &no_pidfd] {
            let err = p.check_same_process().unwrap_err();
            assert!(matches!(err, PeerError::ProcessGone { .. }), "{err:?}");
        }
        child.wait().unwrap();
    }

    #[test]
    fn changed_start_time_means_pid_reused() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let peer = PeerInfo::with_own_ids(pid, None).with_other_start_time();
        let err = peer.check_same_process().unwrap_err();
        assert!(
            matches!(err, PeerError::PidReused { pid: p } if p == pid),
            "{err:?}"
        );
    }

    #[test]
    fn changed_uid_is_rejected() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let peer = PeerInfo::capture(
            pid,
            nix::unistd::geteuid().as_raw().wrapping_add(1),
            nix::unistd::getegid().as_raw(),
            None,
        )
        .unwrap();
        let err = peer.check_same_process().unwrap_err();
        assert!(
            matches!(err, PeerError::CredentialsChanged { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn proc_reads_grow_past_their_first_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long");
        let text: String = (0..3 * PROC_READ_START)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        std::fs::write(&path, &text).unwrap();
        let read = |p: &std::path::Path| read_proc(1, p.to_str().unwrap(), str::to_owned);
        assert_eq!(read(&path).unwrap(), text);
        let short = dir.path().join("short");
        std::fs::write(&short, "Uid:\t1\n").unwrap();
        assert_eq!(read(&short).unwrap(), "Uid:\t1\n");
        std::fs::write(&short, [b'a', 0xff]).unwrap();
        let err = read(&short).unwrap_err();
        assert!(matches!(err, PeerError::Proc(_)), "{err:?}");
        let err = read(&dir.path().join("gone")).unwrap_err();
        assert!(matches!(err, PeerError::ProcessGone { pid: 1 }), "{err:?}");
    }

    #[test]
    fn missing_process_is_gone() {
        // PIDs above pid_max never exist.
        let err = PeerInfo::capture(i32::MAX, 0, 0, None).unwrap_err();
        assert!(matches!(err, PeerError::ProcessGone { .. }), "{err:?}");
    }

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let mut fields: Vec<String> = (4..=52).map(|n| n.to_string()).collect();
        fields[22 - 4] = "987654".to_owned();
        let tail = fields.join(" ");
        for comm in ["sh", "a b", "x) (y", ") Z 1 2 3 ("] {
            let line = format!("1234 ({comm}) S {tail}\n");
            assert_eq!(
                parse_stat(&line),
                Some(ProcStat {
                    state: 'S',
                    start_time: 987_654
                }),
                "{line}"
            );
        }
        assert_eq!(parse_stat("1234 (sh"), None);
        assert_eq!(parse_stat("1234 (sh) S 1 2"), None);
        let own = read_stat(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(!own.is_dead());
    }

    #[test]
    fn parses_status() {
        let text = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t50\t51\t52\t53\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(
            parse_status(text),
            Some(ProcStatus {
                uid: 1001,
                gid: 51,
                groups: vec![4, 24, 27]
            })
        );
        let no_groups = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(parse_status(no_groups).map(|s| s.groups), Some(vec![]));
        assert_eq!(parse_status("Uid:\t0\t0\t0\t0\nGroups:\n"), None);
        assert_eq!(parse_status("Uid:\t0\nGid:\t0\t0\nGroups:\n"), None);
    }

    #[tokio::test]
    async fn incoming_streams_carry_the_peer_and_relay_bytes() {
        let (_dir, path, listener) = listener();
        let mut incoming = incoming(listener);
        let mut client = UnixStream::connect(&path).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();

        let info = tonic::transport::server::Connected::connect_info(&conn);
        let peer = info.peer.clone().unwrap();
        assert_eq!(peer.pid, i32::try_from(std::process::id()).unwrap());

        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        conn.write_all(b"pong").await.unwrap();
        conn.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        conn.shutdown().await.unwrap();
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);

        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(info);
        assert_eq!(peer_of(&req).unwrap().pid, peer.pid);
    }

    #[test]
    fn peer_of_without_or_with_failed_capture_is_an_error() {
        let req = tonic::Request::new(());
        assert!(matches!(peer_of(&req), Err(PeerError::Credentials(_))));
        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(PeerConnectInfo {
            peer: Err("SO_PEERCRED: EINVAL".to_owned()),
        });
        assert!(matches!(peer_of(&req), Err(PeerError::Credentials(e)) if e.contains("EINVAL")));
    }

    /// Hostile `/proc/<pid>/stat` and `status` text (issue #13): a process
    /// picks its own command name (`prctl(PR_SET_NAME)`), up to 15 bytes
    /// that may hold spaces, parentheses and `Uid:`; the parsers never panic
    /// on any text and read exactly the kernel's fields whatever the name.
    mod hostile {
        use super::*;
        use proptest::prelude::*;

        /// Cases per property: bounded so that CI stays fast.
        const CASES: u32 = 256;

        /// A command name as a process may set it: 0 to 15 characters, with
        /// the kernel's separators over-represented. `stat` prints it raw.
        fn comm() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    Just(')'),
                    Just('('),
                    Just(' '),
                    Just(':'),
                    Just('\t'),
                    Just('\n'),
                    any::<char>(),
                ],
                0..16,
            )
            .prop_map(|v| v.into_iter().collect())
        }

        /// One edit of `sample`: flip, insert or delete a byte.
        fn mutate(sample: &str, op: u8, pos: usize, value: u8) -> String {
            let mut out = sample.as_bytes().to_vec();
            let pos = pos % out.len().max(1);
            match op % 3 {
                0 => out[pos] ^= value.max(1),
                1 => out.insert(pos, value),
                _ => {
                    out.remove(pos);
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        }

        fn status_text(name: &str, uid: [u32; 4], gid: [u32; 4], groups: &[u32]) -> String {
            let ids = |v: [u32; 4]| v.map(|n| n.to_string()).join("\t");
            let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
            format!(
                "Name:\t{name}\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t{}\nGid:\t{}\nFDSize:\t64\nGroups:\t{} \nNgid:\t0\n",
                ids(uid),
                ids(gid),
                groups.join(" ")
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(CASES))]

            #[test]
            fn stat_reads_the_kernels_fields_whatever_the_name(
                comm in comm(),
                state in prop_oneof![Just('R'), Just('S'), Just('Z'), Just('X'), Just('D')],
                start in any::<u64>(),
            ) {
                let mut fields: Vec<String> = (4..=52).map(|n| n.to_string()).collect();
                fields[22 - 4] = start.to_string();
                let line = format!("4242 ({comm}) {state} {}\n", fields.join(" "));
                prop_assert_eq!(parse_stat(&line), Some(ProcStat { state, start_time: start }));
            }

            #[test]
            fn stat_survives_arbitrary_text(text in any::<String>()) {
                if let Some(stat) = parse_stat(&text) {
                    // Only what follows the last ')' is read.
                    let (_, rest) = text.rsplit_once(')').unwrap();
                    prop_assert_eq!(rest.split_ascii_whitespace().next().and_then(|f| f.chars().next()), Some(stat.state));
                }
            }

            #[test]
            fn edited_stat_lines_never_panic(op in any::<u8>(), pos in any::<usize>(), value in any::<u8>()) {
                let mut fields: Vec<String> = (4..=52).map(|n| n.to_string()).collect();
                fields[22 - 4] = "987654".to_owned();
                let line = format!("1234 (sh) S {}\n", fields.join(" "));
                let _ = parse_stat(&mutate(&line, op, pos, value));
            }

            #[test]
            fn status_reads_the_effective_ids_whatever_the_name(
                // The kernel escapes a newline in `Name:`; everything else
                // reaches the file as the process set it.
                name in comm().prop_map(|s| s.replace('\n', "\\n")),
                uid in any::<[u32; 4]>(),
                gid in any::<[u32; 4]>(),
                groups in proptest::collection::vec(any::<u32>(), 0..8),
            ) {
                let text = status_text(&name, uid, gid, &groups);
                prop_assert_eq!(
                    parse_status(&text),
                    Some(ProcStatus { uid: uid[1], gid: gid[1], groups })
                );
            }

            #[test]
            fn status_survives_arbitrary_text(text in any::<String>()) {
                if let Some(s) = parse_status(&text) {
                    prop_assert!(text.contains("Uid:") && text.contains("Gid:") && text.contains("Groups:"), "{s:?}");
                }
            }

            #[test]
            fn edited_status_files_never_panic(op in any::<u8>(), pos in any::<usize>(), value in any::<u8>()) {
                let text = status_text("sh", [1000, 1001, 1002, 1003], [50, 51, 52, 53], &[4, 24]);
                let _ = parse_status(&mutate(&text, op, pos, value));
            }
        }
    }
}
