//! The guest socket: one task per connection, one request per connection (burrow-proto).
//! Nothing the host sends is trusted: a malformed frame ends only its own connection.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::{
    parse_control, read_frame, write_control, write_frame, Frame, FrameKind, ProtoError, Reply,
    Request, StreamControl, PROTOCOL_VERSION,
};
use burrow_types::codes;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::SignalKind;
use tokio::sync::Semaphore;

use crate::files::{self, Fail};
use crate::procs::{Item, Proc, StdinMsg, Stream, Subscriber, Table};

/// The first frame must arrive within this, so a silent connection cannot pin memory.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause inside a file transfer (either direction) before the guest gives up.
const TRANSFER_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Concurrent connections; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 1024;
/// How often a half-closed exec connection is checked for a full close.
const HANGUP_POLL: Duration = Duration::from_millis(200);

/// A request to close the listener: answered once it is closed.
type QuiesceTx = tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<(), Fail>>>;

/// Serves connections. `path` is where the listener is bound when the guest bound it itself
/// (`--listen`): only then can it close the listener for a checkpoint and bind it again on
/// `SIGUSR2`.
pub async fn serve(mut listener: UnixListener, table: Arc<Table>, path: Option<PathBuf>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (quiesce_tx, mut quiesce_rx) = tokio::sync::mpsc::channel(1);
    // Open connections, and the signal that ends them for a checkpoint.
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closing = Arc::new(tokio::sync::Notify::new());
    let mut relisten = tokio::signal::unix::signal(SignalKind::user_defined2()).ok();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        tokio::select! {
            Some(done) = quiesce_rx.recv() => {
                let done: tokio::sync::oneshot::Sender<Result<(), Fail>> = done;
                let (Some(path), Some(sig)) = (&path, relisten.as_mut()) else {
                    let _ = done.send(Err(Fail::new(
                        codes::BAD_REQUEST,
                        "this guest was handed its socket and cannot bind it again",
                    )));
                    continue;
                };
                // A stray SIGUSR2 from before (a wake-up sent twice) must not end this pause at
                // once: forget any that are pending.
                loop {
                    tokio::select! {
                        biased;
                        _ = sig.recv() => continue,
                        _ = std::future::ready(()) => break,
                    }
                }
                drop(listener);
                // Streams to the host (an exec's, a background process's whose host side went
                // away) end too: a checkpoint must find no host socket open. The processes stay.
                closing.notify_waiters();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while live.load(std::sync::atomic::Ordering::SeqCst) > 1
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let _ = done.send(Ok(()));
                // Whatever happens in between (a checkpoint, a restore on another boot), the
                // host says when to listen again.
                sig.recv().await;
                listener = match bind(path) {
                    Ok(l) => l,
                    Err(_) => return,
                };
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (table, quiesce) = (table.clone(), quiesce_tx.clone());
                    let (live, closing) = (live.clone(), closing.clone());
                    live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(async move {
                        handle(stream, table, quiesce, closing).await;
                        live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        drop(permit);
                    });
                }
                // EMFILE and friends: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
        }
    }
}

/// Binds the guest's socket at `path`, replacing a stale socket file.
pub fn bind(path: &std::path::Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    UnixListener::from_std(l)
}

async fn reply_error(w: &mut OwnedWriteHalf, f: Fail) {
    let _ = write_control(
        w,
        &Reply::Error {
            code: f.code.to_string(),
            message: f.message,
        },
    )
    .await;
}

async fn handle(
    stream: UnixStream,
    table: Arc<Table>,
    quiesce: QuiesceTx,
    closing: Arc<tokio::sync::Notify>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, read_frame(&mut rd)).await {
        Ok(Ok(Some(f))) => f,
        _ => return,
    };
    let req: Request = match parse_control(&first) {
        Ok(r) => r,
        Err(e) => {
            reply_error(
                &mut wr,
                Fail::new(codes::BAD_REQUEST, format!("malformed request: {e}")),
            )
            .await;
            return;
        }
    };
    match req {
        Request::Ping => {
            let _ = write_control(
                &mut wr,
                &Reply::Pong {
                    version: PROTOCOL_VERSION,
                },
            )
            .await;
        }
        Request::Exec { spec } => match table.spawn(&spec) {
            Err(f) => reply_error(&mut wr, f).await,
            Ok((proc, sub)) => {
                if write_control(&mut wr, &Reply::Started { pid: proc.pid })
                    .await
                    .is_ok()
                {
                    stream_process(rd, wr, sub, &table, true, &closing).await;
                } else {
                    drop(sub);
                    disconnected(&proc, &table, true);
                }
            }
        },
        Request::Attach { pid } => match table.get(pid) {
            None => reply_error(&mut wr, not_found(pid)).await,
            Some(proc) => {
                let sub = proc.subscribe();
                // An acknowledgement, so the host learns of a bad pid before any output.
                if write_control(&mut wr, &Reply::Started { pid })
                    .await
                    .is_ok()
                {
                    stream_process(rd, wr, sub, &table, false, &closing).await;
                }
            }
        },
        Request::ListProcesses => {
            let _ = write_control(
                &mut wr,
                &Reply::Processes {
                    processes: table.list(),
                },
            )
            .await;
        }
        Request::Signal { pid, signal } => {
            let r = match table.get(pid) {
                None => Err(not_found(pid)),
                Some(p) => p.signal_group(signal),
            };
            send_result(&mut wr, r.map(|_| Reply::Ok)).await;
        }
        Request::ResizePty { pid, size } => {
            let r = match table.get(pid) {
                None => Err(not_found(pid)),
                Some(p) => p.resize(size),
            };
            send_result(&mut wr, r.map(|_| Reply::Ok)).await;
        }
        Request::SendStdin { pid, data, eof } => {
            let r = send_stdin(&table, pid, data, eof).await;
            send_result(&mut wr, r.map(|_| Reply::Ok)).await;
        }
        Request::SetEnv { env } => {
            let r = table.set_env(&env);
            send_result(&mut wr, r.map(|_| Reply::Ok)).await;
        }
        Request::SetHostname { hostname } => {
            let r = crate::sys::set_hostname(&hostname).map_err(|e| Fail::io("sethostname", &e));
            send_result(&mut wr, r.map(|_| Reply::Ok)).await;
        }
        Request::Quiesce => {
            let (done, closed) = tokio::sync::oneshot::channel();
            let r = match quiesce.send(done).await {
                Ok(()) => closed
                    .await
                    .unwrap_or_else(|_| Err(Fail::new(codes::INTERNAL, "the listener is gone"))),
                Err(_) => Err(Fail::new(codes::INTERNAL, "the listener is gone")),
            };
            send_result(&mut wr, r.map(|_| Reply::Ok)).await;
        }
        Request::ReadFile { path } => read_file(&mut wr, &path).await,
        Request::WriteFile { path, mode, user } => write_file(rd, wr, path, mode, user).await,
        Request::Stat { path } => {
            let r = blocking(move || files::stat(&files::check_path(&path)?)).await;
            send_result(&mut wr, r.map(|stat| Reply::Stat { stat })).await;
        }
        Request::ListDir {
            path,
            cursor,
            limit,
        } => {
            let r =
                blocking(move || files::list_dir(&files::check_path(&path)?, cursor, limit)).await;
            let r = r.map(|(entries, next_cursor)| Reply::Listing {
                entries,
                next_cursor,
            });
            send_result(&mut wr, r).await;
        }
        Request::MakeDir { path, user } => {
            let r = blocking(move || files::make_dir(&files::check_path(&path)?, user.as_deref()))
                .await;
            send_result(&mut wr, r.map(|stat| Reply::Stat { stat })).await;
        }
        Request::Rename { from, to } => {
            let r = blocking(move || {
                files::rename(&files::check_path(&from)?, &files::check_path(&to)?)
            })
            .await;
            send_result(&mut wr, r.map(|stat| Reply::Stat { stat })).await;
        }
        Request::Remove { path, recursive } => {
            let r = blocking(move || files::remove(&files::check_path(&path)?, recursive)).await;
            send_result(&mut wr, r.map(|_| Reply::Ok)).await;
        }
    }
}

fn not_found(pid: u32) -> Fail {
    Fail::new(
        codes::PROCESS_NOT_FOUND,
        format!("no process {pid} started through the guest"),
    )
}

async fn send_result(w: &mut OwnedWriteHalf, r: Result<Reply, Fail>) {
    match r {
        Ok(reply) => {
            let _ = write_control(w, &reply).await;
        }
        Err(f) => reply_error(w, f).await,
    }
}

/// Runs blocking file work off the reactor thread, so one slow disk does not stall every
/// process's output.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Fail> + Send + 'static,
) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Fail::new(
            codes::INTERNAL,
            format!("file operation failed: {e}"),
        ))
    })
}

async fn send_stdin(table: &Table, pid: u32, data: Vec<u8>, eof: bool) -> Result<(), Fail> {
    let p = table.get(pid).ok_or_else(|| not_found(pid))?;
    let tx = p.stdin_sender().ok_or_else(|| {
        Fail::new(
            codes::BAD_REQUEST,
            "process stdin is closed or was not requested",
        )
    })?;
    let closed = || Fail::new(codes::BAD_REQUEST, "process stdin is closed");
    let send = async {
        if !data.is_empty() {
            tx.send(StdinMsg::Data(data)).await.map_err(|_| closed())?;
        }
        if eof {
            tx.send(StdinMsg::Eof).await.map_err(|_| closed())?;
        }
        Ok(())
    };
    tokio::time::timeout(FIRST_FRAME_TIMEOUT, send)
        .await
        .unwrap_or_else(|_| {
            Err(Fail::new(
                codes::UNAVAILABLE,
                "process is not reading its stdin",
            ))
        })
}

/// Host-side messages on an exec/attach connection. Returns when the host has gone away (full
/// close, error, or a malformed frame). A half-close (EOF while the host still reads) only means
/// "no more input": then we wait for the full close.
async fn read_host(mut rd: OwnedReadHalf, proc: Arc<Proc>) {
    loop {
        let frame: Frame = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => return,
        };
        match frame.kind {
            FrameKind::Stdin | FrameKind::Data => {
                if let Some(tx) = proc.stdin_sender() {
                    let _ = tx.send(StdinMsg::Data(frame.payload)).await;
                }
            }
            FrameKind::Eof => {
                if let Some(tx) = proc.stdin_sender() {
                    let _ = tx.send(StdinMsg::Eof).await;
                }
            }
            FrameKind::Control => match parse_control::<StreamControl>(&frame) {
                Ok(StreamControl::Resize { size }) => {
                    let _ = proc.resize(size);
                }
                Ok(StreamControl::Signal { signal }) => {
                    let _ = proc.signal_group(signal);
                }
                Err(_) => return,
            },
            FrameKind::Stdout | FrameKind::Stderr => return,
        }
    }
    let fd = rd.as_ref().as_raw_fd();
    loop {
        if crate::sys::peer_hung_up(fd) {
            return;
        }
        tokio::time::sleep(HANGUP_POLL).await;
    }
}

async fn write_output(wr: &mut OwnedWriteHalf, sub: &mut Subscriber) -> Result<(), ProtoError> {
    loop {
        match sub.next().await {
            Item::Output(s, data) => {
                let kind = if s == Stream::Out {
                    FrameKind::Stdout
                } else {
                    FrameKind::Stderr
                };
                write_frame(wr, kind, &data).await?;
            }
            Item::Exited { status, timed_out } => {
                let reply = Reply::Exited {
                    exit_code: status.code,
                    signal: status.signal,
                    timed_out,
                };
                return write_control(wr, &reply).await;
            }
        }
    }
}

/// Output out, stdin and controls in, until the process has exited and everything is sent, or
/// the host goes away (then a foreground exec's process group is killed).
async fn stream_process(
    rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut sub: Subscriber,
    table: &Arc<Table>,
    owner: bool,
    closing: &tokio::sync::Notify,
) {
    let proc = sub.proc().clone();
    let mut reader = tokio::spawn(read_host(rd, proc.clone()));
    let done = tokio::select! {
        r = write_output(&mut wr, &mut sub) => r.is_ok(),
        _ = &mut reader => false,
        // A checkpoint: as if the host had hung up.
        _ = closing.notified() => false,
    };
    reader.abort();
    drop(sub);
    if done {
        if owner && !proc.background {
            table.remove(&proc);
        }
    } else {
        disconnected(&proc, table, owner);
    }
}

fn disconnected(proc: &Arc<Proc>, table: &Table, owner: bool) {
    if !owner || proc.background {
        return;
    }
    if proc.exit().is_some() {
        table.remove(proc);
    } else {
        // The reaper removes it once it has exited (no subscribers left).
        let _ = proc.signal_group(libc::SIGKILL);
    }
}

async fn read_file(wr: &mut OwnedWriteHalf, path: &str) {
    let path = path.to_string();
    let opened = blocking(move || files::open_read(&files::check_path(&path)?)).await;
    let mut reader = match opened {
        Ok(r) => r,
        Err(f) => return reply_error(wr, f).await,
    };
    if write_control(wr, &Reply::FileStart { size: reader.size })
        .await
        .is_err()
    {
        return;
    }
    loop {
        let r = tokio::task::spawn_blocking(move || {
            let c = reader.next_chunk();
            (reader, c)
        })
        .await;
        let Ok((r, chunk)) = r else {
            return reply_error(wr, Fail::new(codes::INTERNAL, "read failed")).await;
        };
        reader = r;
        let data = match chunk {
            Ok(Some(data)) => data,
            Ok(None) => {
                let _ = tokio::time::timeout(
                    TRANSFER_IDLE_TIMEOUT,
                    write_frame(wr, FrameKind::Eof, &[]),
                )
                .await;
                return;
            }
            // Mid-stream errors replace the Eof with an Error control frame.
            Err(f) => return reply_error(wr, f).await,
        };
        let sent = write_frame(wr, FrameKind::Data, &data);
        match tokio::time::timeout(TRANSFER_IDLE_TIMEOUT, sent).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

async fn write_file(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    path: String,
    mode: Option<u32>,
    user: Option<String>,
) {
    let opened =
        blocking(move || files::open_write(&files::check_path(&path)?, mode, user.as_deref()))
            .await;
    let mut writer = match opened {
        Ok(w) => w,
        Err(f) => return reply_error(&mut wr, f).await,
    };
    loop {
        let frame = match tokio::time::timeout(TRANSFER_IDLE_TIMEOUT, read_frame(&mut rd)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Err(e)) => {
                let f = Fail::new(codes::BAD_REQUEST, format!("malformed frame: {e}"));
                return reply_error(&mut wr, f).await;
            }
            // Closed before Eof, or idle too long: the upload is abandoned.
            _ => return,
        };
        match frame.kind {
            FrameKind::Data => {
                let data = frame.payload;
                let r = tokio::task::spawn_blocking(move || {
                    let r = writer.write(&data);
                    (writer, r)
                })
                .await;
                let Ok((w, r)) = r else {
                    return reply_error(&mut wr, Fail::new(codes::INTERNAL, "write failed")).await;
                };
                writer = w;
                if let Err(f) = r {
                    return reply_error(&mut wr, f).await;
                }
            }
            FrameKind::Eof => {
                let r = blocking(move || writer.finish()).await;
                return send_result(&mut wr, r.map(|stat| Reply::Stat { stat })).await;
            }
            k => {
                let f = Fail::new(
                    codes::BAD_REQUEST,
                    format!("unexpected {k:?} frame in upload"),
                );
                return reply_error(&mut wr, f).await;
            }
        }
    }
}
