//! A guest agent started on the host with `--listen` (no sandbox, no root needed), driven through
//! the real host-side client.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use burrow_node::guest::{ExecEvent, ExecOutput, ExecSpec, GuestClient, GuestError};

pub struct Guest {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub client: GuestClient,
}

impl Guest {
    pub fn start() -> Guest {
        Self::start_with(|_| {})
    }

    /// `tweak` may add to the guest's environment or set up inherited fds.
    pub fn start_with(tweak: impl FnOnce(&mut Command)) -> Guest {
        let dir = tempfile::tempdir().expect("tempdir");
        // Open to all, so a guest started as another uid can bind its socket here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .expect("chmod tempdir");
        let sock = dir.path().join("g.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_burrow-guest"));
        cmd.arg("--listen")
            .arg(&sock)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("SANDBOX_VAR", "from-sandbox")
            .env("OVERRIDDEN", "sandbox")
            .env("BURROW_SANDBOX_ID", "sb-secret")
            .env("BURROW_SECRET", "do-not-leak");
        tweak(&mut cmd);
        let child = cmd.spawn().expect("spawn burrow-guest");
        let deadline = Instant::now() + Duration::from_secs(10);
        // The file appears at bind(), a moment before listen(): wait until it answers.
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "guest socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        Guest {
            child,
            client: GuestClient::new(sock),
            dir,
        }
    }

    pub fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_string_lossy().into_owned()
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("g.sock")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lets `Command::pre_exec` closures be built in the tests without repeating the unsafe dance.
pub fn pre_exec(cmd: &mut Command, f: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static) {
    // SAFETY: the closures the tests pass only make async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(f);
    }
}

pub fn sh(script: &str) -> ExecSpec {
    ExecSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

pub fn code(e: &GuestError) -> &str {
    e.code().unwrap_or("<not a remote error>")
}

/// Reads events until `pred` holds on the accumulated output (or the process exits).
pub async fn read_until(
    out: &mut ExecOutput,
    acc: &mut Vec<u8>,
    pred: impl Fn(&str) -> bool,
) -> Option<ExecEvent> {
    let fut = async {
        loop {
            if pred(&String::from_utf8_lossy(acc)) {
                return None;
            }
            match out.next().await.expect("exec stream") {
                Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => acc.extend(b),
                Some(ExecEvent::Started { .. }) => {}
                Some(ev @ ExecEvent::Exited { .. }) => return Some(ev),
                None => panic!("stream ended without Exited"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting; output so far: {:?}",
                String::from_utf8_lossy(acc)
            )
        })
}

/// Reads everything up to `Exited` and returns (output, exited event).
pub async fn drain(out: &mut ExecOutput) -> (Vec<u8>, ExecEvent) {
    let mut acc = Vec::new();
    let ev = read_until(out, &mut acc, |_| false).await.expect("exited");
    (acc, ev)
}

/// Whether a host pid still exists (as anything, including a zombie).
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
