//! `burrow exec`, `burrow shell` and `burrow logs`: streamed commands, an interactive terminal,
//! and the output of a process that runs on its own.

use std::io::{IsTerminal, Write};

use anyhow::{bail, Result};
use burrow_client::{Output, SessionInput};
use burrow_types::stream::{StreamEvent, StreamInput};
use burrow_types::ExecRequest;
use clap::Args;
use tokio::io::AsyncReadExt;

use crate::config;

#[derive(Args)]
pub struct ExecArgs {
    pub id: String,
    /// `--env KEY=VALUE`, repeatable.
    #[arg(long = "env", short = 'e', value_parser = crate::parse_kv)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(long)]
    pub cwd: Option<String>,
    /// `root` (default) or `user`.
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Forward this terminal's stdin even when it is a terminal (piped stdin is always forwarded).
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// Exit status of a finished command, shell-style: its code, 128+signal, or 124 on timeout.
fn exit_status(exit_code: Option<i32>, signal: Option<i32>, timed_out: bool) -> i32 {
    if timed_out {
        124
    } else {
        exit_code.unwrap_or_else(|| 128 + signal.unwrap_or(0))
    }
}

pub async fn run(args: ExecArgs, json: bool) -> Result<i32> {
    let client = config::client()?;
    let timeout_ms = match args.timeout {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            bail!("--timeout must be a positive number of seconds")
        }
        Some(t) => Some((t * 1000.0).ceil() as u64),
        None => None,
    };
    let req = ExecRequest {
        cmd: args.cmd,
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        user: args.user,
        timeout_ms,
        ..Default::default()
    };
    if json {
        // Buffered: one JSON document with the whole result.
        let res = client
            .exec(
                &args.id,
                &ExecRequest {
                    timeout_ms: req.timeout_ms,
                    ..req
                },
            )
            .await?;
        crate::print_json(&res)?;
        return Ok(exit_status(res.exit_code, res.signal, res.timed_out));
    }
    let session = client.exec_stream(&args.id, &req).await?;
    let forward = args.interactive || !std::io::stdin().is_terminal();
    let (input, mut output) = (session.input, session.output);
    tokio::spawn(forward_stdin(input, forward));
    while let Some(o) = output.next().await? {
        match o {
            Output::Stdout(b) => copy_out(&mut std::io::stdout(), &b)?,
            Output::Stderr(b) => copy_out(&mut std::io::stderr(), &b)?,
            Output::Event(StreamEvent::Started { .. }) => {}
            Output::Event(StreamEvent::Exit {
                exit_code,
                signal,
                timed_out,
            }) => {
                if timed_out {
                    eprintln!("burrow: command timed out and was killed");
                }
                return Ok(exit_status(exit_code, signal, timed_out));
            }
            Output::Event(StreamEvent::Error { code, message }) => {
                // As a shell would: a program that cannot be found or started exits 127.
                eprintln!("burrow: {code}: {message}");
                return Ok(if code == "file_not_found" { 127 } else { 126 });
            }
        }
    }
    bail!("the server closed the stream before the command finished")
}

/// Prints a background process's kept output (the guest keeps the last 1 MiB of each stream),
/// then follows it until it exits; Ctrl-C stops following and leaves the process running.
pub async fn logs(id: &str, pid: u32) -> Result<i32> {
    let session = config::client()?.attach(id, pid).await?;
    // The input half stays alive: closing the socket early would end the stream.
    let (_input, mut output) = (session.input, session.output);
    while let Some(o) = output.next().await? {
        match o {
            Output::Stdout(b) => copy_out(&mut std::io::stdout(), &b)?,
            Output::Stderr(b) => copy_out(&mut std::io::stderr(), &b)?,
            Output::Event(StreamEvent::Started { .. }) => {}
            Output::Event(StreamEvent::Exit {
                exit_code, signal, ..
            }) => {
                match (exit_code, signal) {
                    (Some(c), _) => eprintln!("burrow: process {pid} exited with code {c}"),
                    (None, Some(s)) => eprintln!("burrow: process {pid} was ended by signal {s}"),
                    (None, None) => eprintln!("burrow: process {pid} has ended"),
                }
                return Ok(0);
            }
            Output::Event(StreamEvent::Error { code, message }) => bail!("{code}: {message}"),
        }
    }
    bail!("the server closed the stream before the process ended")
}

/// Output as it comes, unbuffered: a person watching sees each line when the process writes it.
fn copy_out(w: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    w.write_all(b)?;
    w.flush()
}

async fn forward_stdin(mut input: SessionInput, forward: bool) {
    if forward {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input.stdin(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = input.control(&StreamInput::Eof).await;
    // Keep the input half alive: dropping it would close the WebSocket and end the command.
    std::future::pending::<()>().await;
}

/// Puts the terminal in raw mode and restores it on drop.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = rustix::stdio::stdin();
        let Ok(orig) = rustix::termios::tcgetattr(stdin) else {
            return RawMode(None);
        };
        let mut raw = orig.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(stdin, rustix::termios::OptionalActions::Now, &raw);
        RawMode(Some(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                rustix::stdio::stdin(),
                rustix::termios::OptionalActions::Now,
                orig,
            );
        }
    }
}

fn terminal_size() -> (u16, u16) {
    match rustix::termios::tcgetwinsize(rustix::stdio::stdout()) {
        Ok(ws) if ws.ws_col > 0 && ws.ws_row > 0 => (ws.ws_col, ws.ws_row),
        _ => (80, 24),
    }
}

pub async fn shell(id: &str, user: Option<String>) -> Result<i32> {
    if !std::io::stdin().is_terminal() {
        bail!("burrow shell needs a terminal; use `burrow exec` for scripts");
    }
    let client = config::client()?;
    let (cols, rows) = terminal_size();
    let session = client.terminal(id, cols, rows, user.as_deref()).await?;
    let raw = RawMode::enter();
    let (mut input, mut output) = (session.input, session.output);
    let stdin_task = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
        loop {
            tokio::select! {
                n = stdin.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => if input.stdin(&buf[..n]).await.is_err() { break },
                },
                Some(_) = async { match winch.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                    let (cols, rows) = terminal_size();
                    let _ = input.control(&StreamInput::Resize { cols, rows }).await;
                }
            }
        }
        std::future::pending::<()>().await;
    });
    let mut out = std::io::stdout();
    let mut code = 0;
    while let Some(o) = output.next().await? {
        match o {
            Output::Stdout(b) | Output::Stderr(b) => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Output::Event(StreamEvent::Exit {
                exit_code,
                signal,
                timed_out,
            }) => {
                code = exit_status(exit_code, signal, timed_out);
                break;
            }
            Output::Event(StreamEvent::Error { code, message }) => {
                drop(raw);
                bail!("{code}: {message}");
            }
            Output::Event(StreamEvent::Started { .. }) => {}
        }
    }
    stdin_task.abort();
    drop(raw);
    Ok(code)
}
