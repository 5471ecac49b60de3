//! The host ↔ guest wire protocol.
//!
//! The guest agent (PID 1 of every sandbox) listens on a Unix stream socket whose file lives in the
//! host's sandbox directory, outside the sandbox root. Each connection carries exactly one request:
//!
//! 1. the host sends a `Control` frame holding a JSON [`Request`];
//! 2. depending on the request, both sides exchange more frames (see each variant);
//! 3. the guest ends with a `Control` frame holding a terminal [`Reply`] and closes.
//!
//! A frame is `u32 big-endian length | u8 kind | payload`; the length counts the kind byte and the
//! payload. Payloads are at most [`MAX_PAYLOAD`] bytes, so neither side ever buffers more than that
//! for one frame, whatever the peer sends. The guest never trusts the host's request shapes beyond
//! what serde checks, and the host never trusts the guest's sizes or counts.

use std::collections::BTreeMap;

use burrow_types::{FileStat, ProcessInfo, PtySize};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bumped on any incompatible change; the guest reports it in [`Reply::Pong`].
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// JSON: a [`Request`], [`Reply`] or [`StreamControl`].
    Control = 1,
    /// Process stdout (or PTY output), guest → host.
    Stdout = 2,
    /// Process stderr, guest → host.
    Stderr = 3,
    /// Process stdin, host → guest.
    Stdin = 4,
    /// File contents, either direction.
    Data = 5,
    /// End of the sender's `Stdin` or `Data` stream.
    Eof = 6,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameKind::Control,
            2 => FrameKind::Stdout,
            3 => FrameKind::Stderr,
            4 => FrameKind::Stdin,
            5 => FrameKind::Data,
            6 => FrameKind::Eof,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("i/o on the guest socket")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is over the limit")]
    FrameTooLarge(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("empty frame")]
    Empty,
    #[error("malformed control message")]
    Json(#[from] serde_json::Error),
    #[error("expected a control frame, got {0:?}")]
    UnexpectedFrame(FrameKind),
    #[error("connection closed before the reply")]
    Closed,
}

/// Reads one frame; `Ok(None)` on a clean end of stream at a frame boundary.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(ProtoError::Empty);
    }
    if len > MAX_PAYLOAD + 1 {
        return Err(ProtoError::FrameTooLarge(len));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind).await?;
    let kind = FrameKind::from_u8(kind[0]).ok_or(ProtoError::UnknownKind(kind[0]))?;
    let mut payload = vec![0u8; len - 1];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame { kind, payload }))
}

/// Writes one frame. Payloads over [`MAX_PAYLOAD`] are split into several frames of the same kind.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtoError> {
    let mut chunks = payload.chunks(MAX_PAYLOAD).peekable();
    if chunks.peek().is_none() {
        // An empty payload is still one frame (Eof, or an empty Data chunk).
        return write_one(w, kind, &[]).await;
    }
    for chunk in chunks {
        write_one(w, kind, chunk).await?;
    }
    Ok(())
}

async fn write_one<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtoError> {
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    head[4] = kind as u8;
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    Ok(())
}

/// Writes a JSON control message.
pub async fn write_control<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), ProtoError> {
    let body = serde_json::to_vec(msg)?;
    write_frame(w, FrameKind::Control, &body).await
}

/// Parses a control frame's JSON; any other frame kind is an error.
pub fn parse_control<T: DeserializeOwned>(frame: &Frame) -> Result<T, ProtoError> {
    if frame.kind != FrameKind::Control {
        return Err(ProtoError::UnexpectedFrame(frame.kind));
    }
    Ok(serde_json::from_slice(&frame.payload)?)
}

/// The first frame of every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Reply: `Pong`.
    Ping,
    /// Start a process. Reply: `Started`, then `Stdout`/`Stderr` frames, then `Exited`.
    /// The host may send `Stdin` frames, an `Eof`, and `StreamControl` messages meanwhile.
    /// Unless `background`, closing the connection kills the process group.
    Exec { spec: ExecSpec },
    /// Re-attach to a process started with `background`: the output kept so far, then live output,
    /// then `Exited` (at once if it already ended). Reply as for `Exec`: `Started` (an
    /// acknowledgement carrying the same pid, or `Error` for an unknown pid), output, `Exited`.
    Attach { pid: u32 },
    /// Reply: `Processes`.
    ListProcesses,
    /// Send a signal to a process group started through the guest. Reply: `Ok`.
    Signal { pid: u32, signal: i32 },
    /// Resize a PTY process's terminal. Reply: `Ok`.
    ResizePty { pid: u32, size: PtySize },
    /// Write to a background process's stdin (`eof` closes it). Reply: `Ok`.
    SendStdin {
        pid: u32,
        #[serde(default)]
        data: Vec<u8>,
        #[serde(default)]
        eof: bool,
    },
    /// Reply: `FileStart{size}`, then `Data` frames, then `Eof`; or `Error` before any data.
    /// Only regular files are read.
    ReadFile { path: String },
    /// Parents are created. The host then sends `Data` frames and an `Eof`.
    /// Reply (after the `Eof`, or early on error): `Stat` of the written file, or `Error`.
    WriteFile {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        user: Option<String>,
    },
    /// Reply: `Stat` (symlinks are not followed).
    Stat { path: String },
    /// Reply: `Listing`. `cursor` is opaque, from a previous `Listing`; `depth` ≥ 1.
    ListDir {
        path: String,
        #[serde(default)]
        cursor: Option<u64>,
        limit: u32,
    },
    /// Reply: `Stat` of the directory.
    MakeDir {
        path: String,
        #[serde(default)]
        user: Option<String>,
    },
    /// Reply: `Stat` of the new path.
    Rename { from: String, to: String },
    /// Reply: `Ok`.
    Remove {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Replaces the environment every later command starts with (a warm sandbox receives its
    /// claimant's env this way). Reply: `Ok`.
    SetEnv { env: BTreeMap<String, String> },
    /// Sets the hostname of the sandbox's UTS namespace from inside (a gVisor sandbox's kernel is
    /// not the host's, so no host `setns` reaches it). Reply: `Ok`.
    SetHostname { hostname: String },
    /// Closes the guest's listening socket, so the sandbox holds no host socket and can be
    /// checkpointed (gVisor cannot save a socket bound on the host). The reply (`Ok`) comes once
    /// the listener is closed; the guest listens again on `SIGUSR2`. Only a guest started with
    /// `--listen` can do this.
    Quiesce,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// `root`, `user`, or a numeric uid; default root.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Whether the host will send stdin; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub background: bool,
}

/// Messages the host may send on an `Exec` or `Attach` connection after the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum StreamControl {
    Resize { size: PtySize },
    Signal { signal: i32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        version: u32,
    },
    Started {
        pid: u32,
    },
    Exited {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    Processes {
        processes: Vec<ProcessInfo>,
    },
    FileStart {
        size: u64,
    },
    Stat {
        stat: FileStat,
    },
    Listing {
        entries: Vec<FileStat>,
        next_cursor: Option<u64>,
    },
    Ok,
    /// `code` is one of `burrow_types::codes`.
    Error {
        code: String,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_split() {
        let mut buf = Vec::new();
        let big = vec![7u8; MAX_PAYLOAD + 10];
        write_frame(&mut buf, FrameKind::Data, &big).await.unwrap();
        write_control(&mut buf, &Request::Ping).await.unwrap();
        write_frame(&mut buf, FrameKind::Eof, &[]).await.unwrap();
        let mut r = &buf[..];
        let a = read_frame(&mut r).await.unwrap().unwrap();
        let b = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(a.payload.len() + b.payload.len(), big.len());
        let c = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(parse_control::<Request>(&c).unwrap(), Request::Ping);
        let d = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(d.kind, FrameKind::Eof);
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_and_unknown_frames_are_refused() {
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(ProtoError::FrameTooLarge(_))
        ));
        let mut r: &[u8] = &[0, 0, 0, 1, 99];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(ProtoError::UnknownKind(99))
        ));
        let mut r: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(read_frame(&mut r).await, Err(ProtoError::Empty)));
    }
}
