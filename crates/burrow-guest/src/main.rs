//! burrow-guest: PID 1 of every sandbox. Serves exec, files and PTYs to the host over a Unix
//! socket (burrow-proto), and is the one reaper of every process in the sandbox.
//!
//! Production: started with `BURROW_GUEST_FD=<n>`, an inherited listening socket.
//! Tests: `burrow-guest --listen <path>` binds the socket itself.

mod files;
mod procs;
mod server;
mod sys;

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burrow-guest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    // Before anything else: sandbox processes run as the same root and must not be able to
    // ptrace us or read our /proc/1/fd, exe, environ (K6, K7).
    sys::set_not_dumpable().map_err(|e| format!("prctl(PR_SET_DUMPABLE): {e}"))?;
    if std::process::id() != 1 {
        // Not PID 1 (tests): still be the reaper of every orphaned descendant.
        sys::set_child_subreaper().map_err(|e| format!("prctl(PR_SET_CHILD_SUBREAPER): {e}"))?;
    }

    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut listen_path = None;
    let std_listener = match args.as_slice() {
        [flag, path] if flag == "--listen" => {
            let _ = std::fs::remove_file(path);
            listen_path = Some(std::path::PathBuf::from(path));
            std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("bind {}: {e}", path.to_string_lossy()))?
        }
        [] => {
            let fd: i32 = std::env::var("BURROW_GUEST_FD")
                .map_err(|_| "BURROW_GUEST_FD is not set (or pass --listen <path>)".to_string())?
                .parse()
                .map_err(|_| "BURROW_GUEST_FD is not a number".to_string())?;
            if fd < 3 {
                return Err("BURROW_GUEST_FD must be 3 or higher".into());
            }
            sys::set_cloexec(fd).map_err(|e| format!("BURROW_GUEST_FD {fd}: {e}"))?;
            // SAFETY: the runtime handed this fd to us for exactly this purpose and nothing else
            // in this process refers to it.
            let owned = unsafe { sys::adopt_fd(fd) };
            std::os::unix::net::UnixListener::from(owned)
        }
        _ => return Err("usage: burrow-guest [--listen <socket path>]".into()),
    };
    std_listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    debug_assert!(std_listener.as_raw_fd() >= 0);

    // What every process in the sandbox sees, minus the guest's own plumbing.
    let sandbox_env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !k.as_bytes().starts_with(b"BURROW_"))
        .collect();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let table = procs::Table::new(sandbox_env);
        // The SIGCHLD handler exists before the first child can.
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .map_err(|e| format!("SIGCHLD handler: {e}"))?;
        let reaper_table = table.clone();
        tokio::spawn(async move {
            loop {
                reaper_table.reap();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        let listener = tokio::net::UnixListener::from_std(std_listener)
            .map_err(|e| format!("listener: {e}"))?;
        server::serve(listener, table, listen_path).await;
        Ok(())
    })
}
