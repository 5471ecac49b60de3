//! Client side of the guest protocol (see burrow-proto): what the server uses to run commands and
//! move files inside a sandbox. One connection per request, as the protocol says.
//!
//! Nothing the guest sends is trusted beyond the frame limits burrow-proto enforces: output kept
//! for a buffered exec is capped by the caller's limit, and every wait for the guest has a
//! deadline except the wait for a running process's next output.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use burrow_proto::ExecSpec;
use burrow_proto::{
    parse_control, read_frame, write_control, write_frame, Frame, FrameKind, ProtoError, Reply,
    Request, StreamControl,
};
use burrow_types::{FileStat, ProcessInfo, PtySize};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Connecting to the guest's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first reply to a request (file operations may walk large trees).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// The reply to a ping: liveness checks must be quick.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause inside a file transfer.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot reach the guest agent")]
    Unreachable(#[source] io::Error),
    #[error("guest protocol error")]
    Protocol(#[from] ProtoError),
    #[error("{message}")]
    Remote { code: String, message: String },
    #[error("the guest agent did not answer in time")]
    Timeout,
    #[error("unexpected reply from the guest agent: {0}")]
    UnexpectedReply(String),
}

impl GuestError {
    /// The guest's stable error code, when it refused the request.
    pub fn code(&self) -> Option<&str> {
        match self {
            GuestError::Remote { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn unexpected(r: &Reply) -> GuestError {
    let s = serde_json::to_string(r).unwrap_or_default();
    GuestError::UnexpectedReply(s.chars().take(200).collect())
}

fn remote(code: String, message: String) -> GuestError {
    GuestError::Remote { code, message }
}

async fn within<T, F>(d: Duration, f: F) -> Result<T, GuestError>
where
    F: std::future::Future<Output = Result<T, GuestError>>,
{
    tokio::time::timeout(d, f)
        .await
        .unwrap_or(Err(GuestError::Timeout))
}

/// Reads one frame; a clean close is an error here (the caller expected something).
async fn next_frame(r: &mut OwnedReadHalf) -> Result<Frame, GuestError> {
    read_frame(r)
        .await?
        .ok_or(GuestError::Protocol(ProtoError::Closed))
}

/// Reads one control reply; `Error` becomes [`GuestError::Remote`].
async fn read_reply(r: &mut OwnedReadHalf) -> Result<Reply, GuestError> {
    let frame = next_frame(r).await?;
    match parse_control::<Reply>(&frame)? {
        Reply::Error { code, message } => Err(remote(code, message)),
        reply => Ok(reply),
    }
}

/// The result of [`GuestClient::exec_buffered`].
#[derive(Debug, Clone, Default)]
pub struct BufferedExec {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
}

/// The host → guest half of an exec or attach connection. Dropping it (and the [`ExecOutput`])
/// closes the connection; for a foreground exec the guest then kills the process group.
pub struct ExecInput {
    w: OwnedWriteHalf,
}

impl ExecInput {
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), GuestError> {
        Ok(write_frame(&mut self.w, FrameKind::Stdin, data).await?)
    }

    /// Closes the process's stdin (for a PTY: sends ^D).
    pub async fn close_stdin(&mut self) -> Result<(), GuestError> {
        Ok(write_frame(&mut self.w, FrameKind::Eof, &[]).await?)
    }

    pub async fn resize(&mut self, size: PtySize) -> Result<(), GuestError> {
        Ok(write_control(&mut self.w, &StreamControl::Resize { size }).await?)
    }

    /// Signals the process group.
    pub async fn signal(&mut self, signal: i32) -> Result<(), GuestError> {
        Ok(write_control(&mut self.w, &StreamControl::Signal { signal }).await?)
    }
}

/// The guest → host half: `Started`, output, then `Exited`; `None` after `Exited`.
pub struct ExecOutput {
    r: OwnedReadHalf,
    pending: Option<ExecEvent>,
    finished: bool,
}

impl ExecOutput {
    /// Waits for the next event; there is no deadline (a process may be quiet for hours).
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, GuestError> {
        if let Some(ev) = self.pending.take() {
            return Ok(Some(ev));
        }
        if self.finished {
            return Ok(None);
        }
        let frame = match read_frame(&mut self.r).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                self.finished = true;
                return Err(ProtoError::Closed.into());
            }
            Err(e) => {
                self.finished = true;
                return Err(e.into());
            }
        };
        match frame.kind {
            FrameKind::Stdout => Ok(Some(ExecEvent::Stdout(frame.payload))),
            FrameKind::Stderr => Ok(Some(ExecEvent::Stderr(frame.payload))),
            FrameKind::Control => match parse_control::<Reply>(&frame)? {
                Reply::Started { pid } => Ok(Some(ExecEvent::Started { pid })),
                Reply::Exited {
                    exit_code,
                    signal,
                    timed_out,
                } => {
                    self.finished = true;
                    Ok(Some(ExecEvent::Exited {
                        exit_code,
                        signal,
                        timed_out,
                    }))
                }
                Reply::Error { code, message } => {
                    self.finished = true;
                    Err(remote(code, message))
                }
                other => {
                    self.finished = true;
                    Err(unexpected(&other))
                }
            },
            kind => {
                self.finished = true;
                Err(ProtoError::UnexpectedFrame(kind).into())
            }
        }
    }
}

/// A file being downloaded from the guest.
pub struct FileDownload {
    /// The size the guest saw when it opened the file (0 for /proc-like files).
    pub size: u64,
    r: OwnedReadHalf,
    _w: OwnedWriteHalf,
    done: bool,
}

impl FileDownload {
    /// The next chunk (at most 1 MiB), or `None` at the end of the file. An error after some
    /// chunks means the download is incomplete.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, GuestError> {
        if self.done {
            return Ok(None);
        }
        let frame = match within(TRANSFER_TIMEOUT, next_frame(&mut self.r)).await {
            Ok(f) => f,
            Err(e) => {
                self.done = true;
                return Err(e);
            }
        };
        match frame.kind {
            FrameKind::Data => Ok(Some(frame.payload)),
            FrameKind::Eof => {
                self.done = true;
                Ok(None)
            }
            FrameKind::Control => {
                self.done = true;
                match parse_control::<Reply>(&frame)? {
                    Reply::Error { code, message } => Err(remote(code, message)),
                    other => Err(unexpected(&other)),
                }
            }
            kind => {
                self.done = true;
                Err(ProtoError::UnexpectedFrame(kind).into())
            }
        }
    }
}

/// A file being uploaded to the guest. Call [`FileUpload::finish`] to commit and learn the
/// outcome; dropping it abandons the upload (the file is left as far as it got).
pub struct FileUpload {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
    /// The guest's refusal, once seen: `finish` reports it again.
    refused: Option<(String, String)>,
}

impl FileUpload {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), GuestError> {
        if let Some((code, message)) = &self.refused {
            return Err(remote(code.clone(), message.clone()));
        }
        if data.is_empty() {
            return Ok(());
        }
        let sent = tokio::time::timeout(
            TRANSFER_TIMEOUT,
            write_frame(&mut self.w, FrameKind::Data, data),
        )
        .await;
        match sent {
            Ok(Ok(())) => Ok(()),
            // The guest refused and closed: its reason is waiting to be read.
            Ok(Err(e)) => Err(self.refusal().await.unwrap_or(e.into())),
            Err(_) => Err(GuestError::Timeout),
        }
    }

    async fn refusal(&mut self) -> Option<GuestError> {
        match within(Duration::from_secs(2), read_reply(&mut self.r)).await {
            Err(GuestError::Remote { code, message }) => {
                self.refused = Some((code.clone(), message.clone()));
                Some(remote(code, message))
            }
            _ => None,
        }
    }

    /// Ends the upload and returns the written file's metadata, or the guest's refusal.
    pub async fn finish(mut self) -> Result<FileStat, GuestError> {
        if let Some((code, message)) = self.refused.take() {
            return Err(remote(code, message));
        }
        // If the Eof cannot be sent, the guest has already answered (or died): read on.
        let _ = tokio::time::timeout(
            TRANSFER_TIMEOUT,
            write_frame(&mut self.w, FrameKind::Eof, &[]),
        )
        .await;
        match within(TRANSFER_TIMEOUT, read_reply(&mut self.r)).await? {
            Reply::Stat { stat } => Ok(stat),
            other => Err(unexpected(&other)),
        }
    }
}

/// Talks to one sandbox's guest agent over its Unix socket. Cheap to clone and to create.
#[derive(Debug, Clone)]
pub struct GuestClient {
    socket: PathBuf,
}

impl GuestClient {
    pub fn new(socket: PathBuf) -> Self {
        GuestClient { socket }
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    async fn connect(&self) -> Result<(OwnedReadHalf, OwnedWriteHalf), GuestError> {
        let _stage = crate::timing::stage("guest-connect");
        let attempt = async {
            loop {
                match UnixStream::connect(&self.socket).await {
                    Ok(s) => return Ok(s.into_split()),
                    // A full listen backlog: the guest is busy, not gone.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => return Err(GuestError::Unreachable(e)),
                }
            }
        };
        within(CONNECT_TIMEOUT, attempt).await
    }

    /// Opens a connection and sends `req`.
    async fn open(&self, req: &Request) -> Result<(OwnedReadHalf, OwnedWriteHalf), GuestError> {
        let (r, mut w) = self.connect().await?;
        within(CONNECT_TIMEOUT, async {
            Ok(write_control(&mut w, req).await?)
        })
        .await?;
        Ok((r, w))
    }

    /// A request answered by exactly one reply.
    async fn call(&self, req: &Request, timeout: Duration) -> Result<Reply, GuestError> {
        let (mut r, _w) = self.open(req).await?;
        within(timeout, read_reply(&mut r)).await
    }

    async fn call_ok(&self, req: &Request) -> Result<(), GuestError> {
        match self.call(req, REPLY_TIMEOUT).await? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn call_stat(&self, req: &Request) -> Result<FileStat, GuestError> {
        match self.call(req, REPLY_TIMEOUT).await? {
            Reply::Stat { stat } => Ok(stat),
            other => Err(unexpected(&other)),
        }
    }

    /// The guest's protocol version.
    pub async fn ping(&self) -> Result<u32, GuestError> {
        match self.call(&Request::Ping, PING_TIMEOUT).await? {
            Reply::Pong { version } => Ok(version),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a process; the output's first event is `Started`. Spawn failures (command not
    /// found, bad cwd or user) come back here as [`GuestError::Remote`].
    pub async fn exec_stream(&self, spec: ExecSpec) -> Result<(ExecInput, ExecOutput), GuestError> {
        self.stream(&Request::Exec { spec }).await
    }

    /// Re-attaches to a background process: `Started`, the output the guest kept (up to the last
    /// 1 MiB of each stream), live output, then `Exited` (at once if it already ended).
    pub async fn attach(&self, pid: u32) -> Result<(ExecInput, ExecOutput), GuestError> {
        self.stream(&Request::Attach { pid }).await
    }

    /// Opens a process stream: both `Exec` and `Attach` answer `Started` first.
    async fn stream(&self, req: &Request) -> Result<(ExecInput, ExecOutput), GuestError> {
        let (mut r, w) = self.open(req).await?;
        match within(REPLY_TIMEOUT, read_reply(&mut r)).await? {
            Reply::Started { pid } => Ok((
                ExecInput { w },
                ExecOutput {
                    r,
                    pending: Some(ExecEvent::Started { pid }),
                    finished: false,
                },
            )),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs a process to completion, keeping at most `output_limit` bytes of each stream. The
    /// rest is read and dropped, so the process never blocks on a full pipe. `stdin`, when given,
    /// is written and then closed.
    pub async fn exec_buffered(
        &self,
        mut spec: ExecSpec,
        stdin: Option<Vec<u8>>,
        output_limit: u64,
    ) -> Result<BufferedExec, GuestError> {
        let started = Instant::now();
        let _stage = crate::timing::stage("guest-exec");
        if stdin.is_some() {
            spec.stdin = true;
        }
        let send_stdin = spec.stdin;
        let (mut input, mut output) = self.exec_stream(spec).await?;
        let feed = async {
            if send_stdin {
                if let Some(data) = &stdin {
                    // A process that exits without reading its stdin is not an error.
                    if input.stdin(data).await.is_err() {
                        return;
                    }
                }
                let _ = input.close_stdin().await;
            }
        };
        let limit = usize::try_from(output_limit).unwrap_or(usize::MAX);
        let collect = async {
            let mut out = BufferedExec::default();
            loop {
                match output.next().await? {
                    Some(ExecEvent::Started { .. }) => {}
                    Some(ExecEvent::Stdout(b)) => {
                        keep(&mut out.stdout, &mut out.stdout_truncated, &b, limit)
                    }
                    Some(ExecEvent::Stderr(b)) => {
                        keep(&mut out.stderr, &mut out.stderr_truncated, &b, limit)
                    }
                    Some(ExecEvent::Exited {
                        exit_code,
                        signal,
                        timed_out,
                    }) => {
                        out.exit_code = exit_code;
                        out.signal = signal;
                        out.timed_out = timed_out;
                        return Ok(out);
                    }
                    None => return Err(GuestError::Protocol(ProtoError::Closed)),
                }
            }
        };
        let ((), result) = tokio::join!(feed, collect);
        let mut out = result?;
        out.duration = started.elapsed();
        Ok(out)
    }

    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>, GuestError> {
        match self.call(&Request::ListProcesses, REPLY_TIMEOUT).await? {
            Reply::Processes { processes } => Ok(processes),
            other => Err(unexpected(&other)),
        }
    }

    /// Signals a process group started through the guest.
    /// Replaces the environment later commands start with.
    pub async fn set_env(&self, env: BTreeMap<String, String>) -> Result<(), GuestError> {
        self.call_ok(&Request::SetEnv { env }).await
    }

    pub async fn signal(&self, pid: u32, signal: i32) -> Result<(), GuestError> {
        self.call_ok(&Request::Signal { pid, signal }).await
    }

    pub async fn resize(&self, pid: u32, size: PtySize) -> Result<(), GuestError> {
        self.call_ok(&Request::ResizePty { pid, size }).await
    }

    /// Writes to a background process's stdin; `eof` closes it afterwards.
    pub async fn send_stdin(&self, pid: u32, data: Vec<u8>, eof: bool) -> Result<(), GuestError> {
        self.call_ok(&Request::SendStdin { pid, data, eof }).await
    }

    /// Starts downloading a regular file. Refusals (missing, not a regular file, a directory)
    /// come back here, before any data.
    pub async fn read_file(&self, path: impl Into<String>) -> Result<FileDownload, GuestError> {
        let (mut r, w) = self.open(&Request::ReadFile { path: path.into() }).await?;
        match within(REPLY_TIMEOUT, read_reply(&mut r)).await? {
            Reply::FileStart { size } => Ok(FileDownload {
                size,
                r,
                _w: w,
                done: false,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts uploading a file (parents are created, owned by `user`). Errors the guest finds
    /// when opening the target surface from [`FileUpload::write`] or [`FileUpload::finish`].
    pub async fn write_file(
        &self,
        path: impl Into<String>,
        mode: Option<u32>,
        user: Option<String>,
    ) -> Result<FileUpload, GuestError> {
        let (r, w) = self
            .open(&Request::WriteFile {
                path: path.into(),
                mode,
                user,
            })
            .await?;
        Ok(FileUpload {
            r,
            w,
            refused: None,
        })
    }

    /// Writes a small file in one go (parents are created).
    pub async fn write_all(
        &self,
        path: impl Into<String>,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<FileStat, GuestError> {
        let mut up = self.write_file(path, mode, None).await?;
        up.write(data).await?;
        up.finish().await
    }

    /// Metadata of a path; symlinks are not followed.
    pub async fn stat(&self, path: impl Into<String>) -> Result<FileStat, GuestError> {
        self.call_stat(&Request::Stat { path: path.into() }).await
    }

    /// One page of a directory (`limit` is clamped to 1..=1000 by the guest); pass the returned
    /// cursor back for the next page, `None` means this was the last.
    pub async fn list_dir(
        &self,
        path: impl Into<String>,
        cursor: Option<u64>,
        limit: u32,
    ) -> Result<(Vec<FileStat>, Option<u64>), GuestError> {
        let req = Request::ListDir {
            path: path.into(),
            cursor,
            limit,
        };
        match self.call(&req, REPLY_TIMEOUT).await? {
            Reply::Listing {
                entries,
                next_cursor,
            } => Ok((entries, next_cursor)),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates a directory and its parents; `already_exists` if it was there already.
    pub async fn make_dir(
        &self,
        path: impl Into<String>,
        user: Option<String>,
    ) -> Result<FileStat, GuestError> {
        self.call_stat(&Request::MakeDir {
            path: path.into(),
            user,
        })
        .await
    }

    pub async fn rename(
        &self,
        from: impl Into<String>,
        to: impl Into<String>,
    ) -> Result<FileStat, GuestError> {
        self.call_stat(&Request::Rename {
            from: from.into(),
            to: to.into(),
        })
        .await
    }

    pub async fn remove(&self, path: impl Into<String>, recursive: bool) -> Result<(), GuestError> {
        self.call_ok(&Request::Remove {
            path: path.into(),
            recursive,
        })
        .await
    }
}

fn keep(buf: &mut Vec<u8>, truncated: &mut bool, data: &[u8], limit: usize) {
    let room = limit.saturating_sub(buf.len());
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_caps_and_flags() {
        let (mut b, mut t) = (Vec::new(), false);
        keep(&mut b, &mut t, b"hello", 8);
        assert!(!t);
        keep(&mut b, &mut t, b"world", 8);
        assert_eq!(b, b"hellowor");
        assert!(t);
        keep(&mut b, &mut t, b"more", 8);
        assert_eq!(b.len(), 8);
    }
}
