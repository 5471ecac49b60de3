//! Processes started through the guest: spawning (std::process::Command, never tokio::process),
//! the one reaper, output buffering with bounded memory, stdin, timeouts and signals, and the
//! adoption of processes that keep a finished command's output pipes (`sh -c 'server &'`): their
//! output is kept and readable like a background process's, and their pipes never break
//! (docs/adr/0050).
//!
//! Invariant the reaper relies on: the runtime is current-thread, and `spawn` inserts a child into
//! the table without an `.await` between fork and insert, so the reaper can never see a pid of
//! ours before the table knows it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use burrow_proto::ExecSpec;
use burrow_types::{codes, ProcessInfo, PtySize};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::files::{self, Fail};
use crate::sys;

/// Output kept per stream: unread output a reader has not taken yet (then the child waits), or
/// for a background process nobody is attached to, the most recent output (older is dropped).
pub const OUT_CAP: usize = 1 << 20;
/// Bookkeeping charged per chunk, so a flood of 1-byte reads cannot defeat the cap.
const CHUNK_OVERHEAD: usize = 64;
const READ_BUF: usize = 64 * 1024;
/// After the process exits, output still arriving (from a daemon that kept the pipe) is read up
/// to this much; then the stream is closed.
const POST_EXIT_DRAIN: usize = 4 << 20;
/// Exited background processes stay listed (and attachable) this long, at most this many.
const EXITED_TTL: Duration = Duration::from_secs(600);
const EXITED_KEEP: usize = 64;
/// How often, and how far apart, the guest looks again for the holder of pipes a command left
/// when the best candidate is still a fork of that command before its exec (docs/adr/0050).
const SETTLE_TRIES: u32 = 5;
const SETTLE_WAIT: Duration = Duration::from_millis(20);
/// Between SIGTERM and SIGKILL on timeout.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out = 0,
    Err = 1,
}

pub enum Item {
    Output(Stream, Vec<u8>),
    Exited { status: ExitStatus, timed_out: bool },
}

pub enum StdinMsg {
    Data(Vec<u8>),
    Eof,
}

struct Chunk {
    seq: u64,
    /// Accounted bytes of this stream up to and including this chunk.
    end: u64,
    cost: usize,
    data: Vec<u8>,
}

#[derive(Default)]
struct OutState {
    q: [VecDeque<Chunk>; 2],
    held: [usize; 2],
    total: [u64; 2],
    next_seq: u64,
    done: [bool; 2],
    /// Subscriber id → next sequence number it reads.
    subs: HashMap<u64, u64>,
    next_sub: u64,
    exit: Option<ExitStatus>,
    exited_at: Option<Instant>,
    timed_out: bool,
    /// Pipes a pump stopped reading because the process exited while someone else still held
    /// their write ends; handed on to an adopted process once both pumps are done.
    leftover: [Option<OwnedFd>; 2],
}

impl OutState {
    fn min_cursor(&self) -> Option<u64> {
        self.subs.values().copied().min()
    }

    /// Accounted bytes of stream `s` the slowest subscriber has not read yet.
    fn pending(&self, s: usize) -> usize {
        let Some(min) = self.min_cursor() else {
            return 0;
        };
        let q = &self.q[s];
        let idx = q.partition_point(|c| c.seq < min);
        match q.get(idx) {
            None => 0,
            Some(c) => (self.total[s] - (c.end - c.cost as u64)) as usize,
        }
    }

    fn trim(&mut self, background: bool) {
        let min = self.min_cursor();
        for s in 0..2 {
            while let Some(front) = self.q[s].front() {
                let consumed = min.is_none_or(|m| front.seq < m);
                if !consumed || (background && self.held[s] <= OUT_CAP) {
                    break;
                }
                self.held[s] -= front.cost;
                self.q[s].pop_front();
            }
        }
    }

    fn push(&mut self, s: usize, data: &[u8], background: bool) {
        let min = self.min_cursor();
        let next_seq = self.next_seq;
        if let Some(last) = self.q[s].back_mut() {
            let untouched = min.is_none_or(|m| m <= last.seq);
            if last.seq + 1 == next_seq && untouched && last.data.len() + data.len() <= READ_BUF {
                last.data.extend_from_slice(data);
                last.cost += data.len();
                last.end += data.len() as u64;
                self.total[s] += data.len() as u64;
                self.held[s] += data.len();
                self.trim(background);
                return;
            }
        }
        let cost = data.len() + CHUNK_OVERHEAD;
        self.total[s] += cost as u64;
        self.held[s] += cost;
        self.q[s].push_back(Chunk {
            seq: next_seq,
            end: self.total[s],
            cost,
            data: data.to_vec(),
        });
        self.next_seq += 1;
        self.trim(background);
    }
}

/// One process started through the guest, or adopted from a command that ended while it still
/// held that command's output.
pub struct Proc {
    pub pid: u32,
    /// The command line; an adopted process's is read again while it runs (it may have been
    /// adopted between its fork and its exec, still looking like the shell that forked it).
    cmd: Mutex<Vec<String>>,
    adopted: bool,
    pub pty: bool,
    pub background: bool,
    /// The session whose members may inherit this process's output pipes: a spawned process
    /// leads its own (`setsid`); an adopted one is a member of its command's session.
    sid: u32,
    /// Signals go to the whole process group (a spawned process leads one) or, for an adopted
    /// process that does not lead its group, to it alone.
    group: bool,
    /// For an adopted process that is not the guest's child: its start time, so a signal never
    /// reaches a reused pid, and its end is noticed by looking (the reaper never sees it).
    foreign_start: Option<u64>,
    table: Weak<Table>,
    st: Mutex<OutState>,
    tx: watch::Sender<u64>,
    stdin: Mutex<Option<mpsc::Sender<StdinMsg>>>,
    master: Option<OwnedFd>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proc {
    fn bump(&self) {
        self.tx.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn exit(&self) -> Option<ExitStatus> {
        lock(&self.st).exit
    }

    fn set_exit(&self, status: ExitStatus) {
        {
            let mut st = lock(&self.st);
            if st.exit.is_none() {
                st.exit = Some(status);
                st.exited_at = Some(Instant::now());
            }
        }
        self.bump();
    }

    pub fn exited_at(&self) -> Option<Instant> {
        lock(&self.st).exited_at
    }

    pub fn subscriber_count(&self) -> usize {
        lock(&self.st).subs.len()
    }

    pub async fn wait_exit(&self) {
        let mut rx = self.tx.subscribe();
        loop {
            rx.borrow_and_update();
            if self.exit().is_some() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// A reader of this process's output from the oldest output still kept.
    pub fn subscribe(self: &Arc<Self>) -> Subscriber {
        let id = {
            let mut st = lock(&self.st);
            let id = st.next_sub;
            st.next_sub += 1;
            st.subs.insert(id, 0);
            id
        };
        Subscriber {
            proc: self.clone(),
            id,
            rx: self.tx.subscribe(),
        }
    }

    /// Signals the process group (an adopted process that leads no group: the process alone),
    /// unless the process has already exited (its pid may be reused).
    pub fn signal_group(&self, sig: i32) -> Result<(), Fail> {
        self.check_foreign();
        if self.exit().is_some() {
            return Err(Fail::new(codes::PROCESS_NOT_FOUND, "process has exited"));
        }
        let sig = Signal::try_from(sig)
            .map_err(|_| Fail::new(codes::BAD_REQUEST, format!("invalid signal {sig}")))?;
        let pid = Pid::from_raw(self.pid as i32);
        let r = if self.group {
            killpg(pid, sig)
        } else {
            nix::sys::signal::kill(pid, sig)
        };
        match r {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(Fail::io("signal", &io::Error::from(e))),
        }
    }

    /// An adopted process that is not our child ends unseen by the reaper: record its end once
    /// its pid is gone or belongs to a newer process (the pumps then hand its pipes on).
    fn check_foreign(&self) {
        let Some(start) = self.foreign_start else {
            return;
        };
        let gone = stat_of(self.pid).is_none_or(|st| st.start != start || st.state == 'Z');
        if self.exit().is_none() && gone {
            self.set_exit(ExitStatus {
                code: None,
                signal: None,
            });
        }
    }

    /// SIGKILLs the whole process group even when its leader has exited: a timeout ends everything
    /// the command started (a fork bomb's children outlive a leader that died of SIGTERM). Safe
    /// because a pgid cannot be reused while any process of the group is alive.
    pub fn kill_group(&self) {
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
    }

    pub fn resize(&self, size: PtySize) -> Result<(), Fail> {
        let Some(m) = &self.master else {
            return Err(Fail::new(codes::BAD_REQUEST, "process has no terminal"));
        };
        sys::set_winsize(m.as_raw_fd(), size.cols, size.rows).map_err(|e| Fail::io("resize", &e))
    }

    pub fn stdin_sender(&self) -> Option<mpsc::Sender<StdinMsg>> {
        lock(&self.stdin).clone()
    }

    /// The command line, refreshed for an adopted process that is still `running` (its pid
    /// cannot belong to anyone else until it is reaped, or for a foreign one, until
    /// `check_foreign` says it ended).
    fn cmd(&self, running: bool) -> Vec<String> {
        let mut cmd = lock(&self.cmd);
        if self.adopted && running {
            let now = cmdline(self.pid);
            if !now.is_empty() {
                *cmd = now;
            }
        }
        cmd.clone()
    }

    pub fn info(&self) -> ProcessInfo {
        self.check_foreign();
        let exit = self.exit();
        ProcessInfo {
            pid: self.pid,
            cmd: self.cmd(exit.is_none()),
            pty: self.pty,
            running: exit.is_none(),
            exit_code: exit.and_then(|e| e.code),
            signal: exit.and_then(|e| e.signal),
        }
    }
}

pub struct Subscriber {
    proc: Arc<Proc>,
    id: u64,
    rx: watch::Receiver<u64>,
}

impl Subscriber {
    /// The next chunk of output, or `Exited` once the process has exited and its output is all
    /// delivered. Reading frees room for the pumps (backpressure).
    pub async fn next(&mut self) -> Item {
        loop {
            self.rx.borrow_and_update();
            {
                let p = &self.proc;
                let mut st = lock(&p.st);
                let cursor = st.subs.get(&self.id).copied().unwrap_or(0);
                let mut best: Option<(usize, usize)> = None;
                for s in 0..2 {
                    let idx = st.q[s].partition_point(|c| c.seq < cursor);
                    if let Some(c) = st.q[s].get(idx) {
                        if best.is_none_or(|(bs, bi)| c.seq < st.q[bs][bi].seq) {
                            best = Some((s, idx));
                        }
                    }
                }
                if let Some((s, idx)) = best {
                    let c = &st.q[s][idx];
                    let (seq, data) = (c.seq, c.data.clone());
                    st.subs.insert(self.id, seq + 1);
                    st.trim(p.background);
                    drop(st);
                    p.bump();
                    let stream = if s == 0 { Stream::Out } else { Stream::Err };
                    return Item::Output(stream, data);
                }
                if st.done[0] && st.done[1] {
                    if let Some(status) = st.exit {
                        return Item::Exited {
                            status,
                            timed_out: st.timed_out,
                        };
                    }
                }
            }
            if self.rx.changed().await.is_err() {
                // Cannot happen while we hold the Proc (it owns the sender); be safe anyway.
                return Item::Exited {
                    status: ExitStatus {
                        code: None,
                        signal: None,
                    },
                    timed_out: false,
                };
            }
        }
    }

    pub fn proc(&self) -> &Arc<Proc> {
        &self.proc
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.proc.st);
            st.subs.remove(&self.id);
            st.trim(self.proc.background);
        }
        self.proc.bump();
    }
}

/// Every process started through the guest, by pid.
pub struct Table {
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
    /// The sandbox's environment (the guest's own, minus `BURROW_*`, until the host replaces it).
    sandbox_env: Mutex<Vec<(OsString, OsString)>>,
}

impl Table {
    pub fn new(sandbox_env: Vec<(OsString, OsString)>) -> Arc<Self> {
        Arc::new(Table {
            procs: Mutex::new(HashMap::new()),
            sandbox_env: Mutex::new(sandbox_env),
        })
    }

    pub fn set_env(&self, env: &BTreeMap<String, String>) -> Result<(), Fail> {
        if let Some(k) = env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(Fail::new(
                codes::BAD_REQUEST,
                format!("invalid env name {k:?}"),
            ));
        }
        *lock(&self.sandbox_env) = env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        Ok(())
    }

    pub fn get(&self, pid: u32) -> Option<Arc<Proc>> {
        lock(&self.procs).get(&pid).cloned()
    }

    /// Forgets `p` unless the pid now belongs to a newer process.
    pub fn remove(&self, p: &Arc<Proc>) {
        let mut procs = lock(&self.procs);
        if procs.get(&p.pid).is_some_and(|cur| Arc::ptr_eq(cur, p)) {
            procs.remove(&p.pid);
        }
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        self.prune();
        let procs: Vec<Arc<Proc>> = lock(&self.procs).values().cloned().collect();
        let mut v: Vec<ProcessInfo> = procs.iter().map(|p| p.info()).collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    fn prune(&self) {
        let mut procs = lock(&self.procs);
        let mut exited: Vec<(Instant, u32)> = procs
            .values()
            .filter_map(|p| p.exited_at().map(|t| (t, p.pid)))
            .collect();
        exited.sort();
        let excess = exited.len().saturating_sub(EXITED_KEEP);
        for (i, (t, pid)) in exited.into_iter().enumerate() {
            if i < excess || t.elapsed() > EXITED_TTL {
                procs.remove(&pid);
            }
        }
    }

    /// Reaps every child that has exited: ours get their status recorded, anything else
    /// (orphans reparented to us, double-forked daemons) is simply reaped (R6).
    pub fn reap(&self) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (
                    pid,
                    ExitStatus {
                        code: Some(code),
                        signal: None,
                    },
                ),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (
                    pid,
                    ExitStatus {
                        code: None,
                        signal: Some(sig as i32),
                    },
                ),
                Ok(WaitStatus::StillAlive) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(_) => return, // ECHILD: no children left
            };
            let Some(p) = self.get(pid.as_raw() as u32) else {
                continue;
            };
            p.set_exit(status);
            if !p.background && p.subscriber_count() == 0 {
                self.remove(&p);
            }
        }
    }

    /// Hands the output pipes `from` left behind (still held by others after it exited) to the
    /// process that holds them: a member of `from`'s session, those seen holding the pipes and
    /// the guest's own children (orphans reparented to it) first, else any process whose open
    /// files show the pipes. It becomes a background entry, listed and attachable like one, with
    /// the last [`OUT_CAP`] of each stream kept. With no holder to be found, the pipes are still
    /// read to their end, so no writer ever meets a broken pipe (docs/adr/0050).
    fn adopt(self: &Arc<Self>, from: &Proc, fds: [Option<OwnedFd>; 2]) {
        let leaver = Leaver {
            sid: from.sid,
            pty: from.pty,
            cmd: from.cmd(false),
        };
        let table = self.clone();
        tokio::spawn(async move {
            let mut fds = fds;
            for attempt in 0.. {
                match table.try_adopt(&leaver, fds, attempt < SETTLE_TRIES) {
                    Ok(()) => return,
                    Err(back) => fds = back,
                }
                // Meanwhile the output waits in the pipes; a writer blocks, never fails.
                tokio::time::sleep(SETTLE_WAIT).await;
            }
        });
    }

    /// One look for the holder. `Err` gives the pipes back when the best candidate still looks
    /// like a fork of the leaver that has not exec'd (or redirected its output) yet and
    /// `may_wait`: `sh -c 'a >log & b &'` exits before its children have settled.
    fn try_adopt(
        self: &Arc<Self>,
        leaver: &Leaver,
        fds: [Option<OwnedFd>; 2],
        may_wait: bool,
    ) -> Result<(), [Option<OwnedFd>; 2]> {
        let me = std::process::id();
        let inodes: Vec<u64> = fds.iter().flatten().filter_map(pipe_inode).collect();
        let taken: Vec<u32> = lock(&self.procs).keys().copied().collect();
        let candidates: Vec<ProcStat> = all_pids()
            .filter(|pid| *pid != me && !taken.contains(pid))
            .filter_map(stat_of)
            .filter(|st| st.state != 'Z')
            .collect();
        // Session members, except those whose open files we can see and which lack the pipes
        // (a job that redirected its output); failing that, anyone seen holding them (a process
        // that left the session with `setsid`).
        let mut holders: Vec<(&ProcStat, Option<bool>)> = candidates
            .iter()
            .filter(|st| st.sid == leaver.sid)
            .map(|st| (st, holds_any(st.pid, &inodes)))
            .filter(|(_, holds)| *holds != Some(false))
            .collect();
        if holders.is_empty() {
            holders = candidates
                .iter()
                .map(|st| (st, holds_any(st.pid, &inodes)))
                .filter(|(_, holds)| *holds == Some(true))
                .collect();
        }
        let best = holders
            .into_iter()
            .min_by_key(|(st, holds)| (*holds != Some(true), st.ppid != me, st.pid));
        let Some((st, _)) = best else {
            for fd in fds.into_iter().flatten() {
                if let Ok(afd) = sys::register(fd) {
                    tokio::spawn(discard(afd));
                }
            }
            return Ok(());
        };
        let cmd = cmdline(st.pid);
        if may_wait && cmd == leaver.cmd {
            return Err(fds);
        }
        let mut out = OutState::default();
        for (s, fd) in fds.iter().enumerate() {
            out.done[s] = fd.is_none();
        }
        let (tx, _) = watch::channel(0u64);
        let proc = Arc::new(Proc {
            pid: st.pid,
            cmd: Mutex::new(cmd),
            adopted: true,
            pty: leaver.pty,
            background: true,
            sid: st.sid,
            group: st.pgrp == st.pid,
            foreign_start: (st.ppid != me).then_some(st.start),
            table: Arc::downgrade(self),
            st: Mutex::new(out),
            tx,
            stdin: Mutex::new(None),
            master: None,
        });
        // No `.await` since the scan: the reaper cannot have seen this pid end yet.
        lock(&self.procs).insert(proc.pid, proc.clone());
        self.prune();
        for (s, fd) in fds.into_iter().enumerate() {
            if let Some(fd) = fd {
                spawn_pump(proc.clone(), s, fd);
            }
        }
        Ok(())
    }

    /// Starts a process; returns it with a subscriber registered before any output exists.
    pub fn spawn(self: &Arc<Self>, spec: &ExecSpec) -> Result<(Arc<Proc>, Subscriber), Fail> {
        let argv0 = spec
            .argv
            .first()
            .ok_or_else(|| Fail::new(codes::BAD_REQUEST, "argv is empty"))?;
        if argv0.is_empty() {
            return Err(Fail::new(codes::BAD_REQUEST, "argv[0] is empty"));
        }
        if spec.argv.iter().any(|a| a.contains('\0')) {
            return Err(Fail::new(codes::BAD_REQUEST, "argv contains a NUL byte"));
        }
        for (k, v) in &spec.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(Fail::new(
                    codes::BAD_REQUEST,
                    format!("invalid env name {k:?}"),
                ));
            }
        }
        let user = files::resolve_user(spec.user.as_deref())?;
        let cwd = match &spec.cwd {
            Some(c) => {
                let p = files::check_path(c)?;
                let md = std::fs::metadata(p.as_path()).map_err(|e| Fail::io("cwd", &e))?;
                if !md.is_dir() {
                    return Err(Fail::new(
                        codes::NOT_A_DIRECTORY,
                        format!("cwd {} is not a directory", p.text),
                    ));
                }
                p.text
            }
            None if std::path::Path::new(&user.home).is_dir() => user.home.clone(),
            None => "/".to_string(),
        };

        let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
        env.insert("PATH".into(), DEFAULT_PATH.into());
        env.insert("HOME".into(), user.home.clone().into());
        env.insert("USER".into(), user.name.clone().into());
        env.insert("LANG".into(), "C.UTF-8".into());
        if spec.pty.is_some() {
            env.insert("TERM".into(), "xterm-256color".into());
        }
        for (k, v) in lock(&self.sandbox_env).iter() {
            env.insert(k.clone(), v.clone());
        }
        for (k, v) in &spec.env {
            env.insert(k.into(), v.into());
        }

        let mut cmd = Command::new(argv0);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .envs(&env)
            .current_dir(&cwd);
        let (euid, egid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        if user.gid != egid {
            cmd.gid(user.gid);
        }
        if user.uid != euid {
            cmd.uid(user.uid);
        }

        // Parent ends: (stdout or pty master, stderr, stdin).
        let (out_fd, err_fd, in_fd, master);
        let pty = spec.pty;
        if let Some(size) = pty {
            let ws = nix::pty::Winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pair = nix::pty::openpty(Some(&ws), None)
                .map_err(|e| Fail::io("openpty", &io::Error::from(e)))?;
            for fd in [&pair.master, &pair.slave] {
                sys::set_cloexec(fd.as_raw_fd()).map_err(|e| Fail::io("pty", &e))?;
            }
            set_nonblocking(&pair.master)?;
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| Fail::io("dup", &e));
            cmd.stdin(Stdio::from(dup(&pair.slave)?))
                .stdout(Stdio::from(dup(&pair.slave)?))
                .stderr(Stdio::from(pair.slave));
            out_fd = dup(&pair.master)?;
            in_fd = Some(dup(&pair.master)?);
            err_fd = None;
            master = Some(pair.master);
        } else {
            let (r, w) = pipe()?;
            cmd.stdout(Stdio::from(w));
            out_fd = r;
            let (r, w) = pipe()?;
            cmd.stderr(Stdio::from(w));
            err_fd = Some(r);
            if spec.stdin {
                let (r, w) = pipe()?;
                cmd.stdin(Stdio::from(r));
                in_fd = Some(w);
            } else {
                cmd.stdin(Stdio::null());
                in_fd = None;
            }
            master = None;
        }
        for fd in [Some(&out_fd), err_fd.as_ref(), in_fd.as_ref()]
            .into_iter()
            .flatten()
        {
            set_nonblocking(fd)?;
        }

        let with_tty = pty.is_some();
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // syscalls (setsid, ioctl, close_range); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(io::Error::from)?;
                if with_tty {
                    sys::set_controlling_tty()?;
                }
                sys::cloexec_from_3();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                Fail::new(codes::FILE_NOT_FOUND, format!("command not found: {argv0}"))
            }
            io::ErrorKind::PermissionDenied => Fail::new(
                codes::PERMISSION_DENIED,
                format!("cannot execute {argv0}: {e}"),
            ),
            io::ErrorKind::InvalidInput => Fail::new(codes::BAD_REQUEST, format!("exec: {e}")),
            _ => Fail::new(codes::INTERNAL, format!("exec {argv0}: {e}")),
        })?;
        let pid = child.id();
        // The child's ends of the pipes / the pty slave are closed here, in the parent.
        drop(cmd);
        // Dropping a std Child neither waits nor kills: the reaper owns it from now on.
        drop(child);

        let (tx, _) = watch::channel(0u64);
        let mut st = OutState::default();
        if err_fd.is_none() {
            st.done[1] = true;
        }
        // At most a few frames (1 MiB each) queue for a child that is not reading its stdin.
        let (stdin_tx, stdin_rx) = mpsc::channel(4);
        let proc = Arc::new(Proc {
            pid,
            cmd: Mutex::new(spec.argv.clone()),
            adopted: false,
            pty: with_tty,
            background: spec.background,
            sid: pid,
            group: true,
            foreign_start: None,
            table: Arc::downgrade(self),
            st: Mutex::new(st),
            tx,
            stdin: Mutex::new(in_fd.as_ref().map(|_| stdin_tx)),
            master,
        });
        let sub = proc.subscribe();
        lock(&self.procs).insert(pid, proc.clone());
        self.prune();

        // Registering with the reactor cannot fail short of fd exhaustion; if it does, the
        // output is lost (the stream is marked done) but the process is still tracked and reaped.
        spawn_pump(proc.clone(), 0, out_fd);
        if let Some(fd) = err_fd {
            spawn_pump(proc.clone(), 1, fd);
        }
        if let Some(fd) = in_fd {
            match sys::register(fd) {
                Ok(afd) => {
                    tokio::spawn(stdin_writer(proc.clone(), afd, stdin_rx, with_tty));
                }
                Err(_) => *lock(&proc.stdin) = None,
            }
        }
        if let Some(ms) = spec.timeout_ms {
            tokio::spawn(timeout_task(proc.clone(), Duration::from_millis(ms)));
        }
        Ok((proc, sub))
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Fail> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Fail::io("pipe", &io::Error::from(e)))
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), Fail> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)
        .map_err(|e| Fail::io("fcntl", &io::Error::from(e)))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))
        .map_err(|e| Fail::io("fcntl", &io::Error::from(e)))?;
    Ok(())
}

fn spawn_pump(proc: Arc<Proc>, s: usize, fd: OwnedFd) {
    match sys::register(fd) {
        Ok(afd) => {
            tokio::spawn(pump(proc, s, afd));
        }
        Err(_) => {
            lock(&proc.st).done[s] = true;
            proc.bump();
        }
    }
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)
}

/// Moves output from one pipe (or the pty master) into the process's buffer, pausing while the
/// slowest reader is [`OUT_CAP`] behind. Never pauses when nobody is attached (background).
/// Once the process has exited, what is already in the pipe is taken; if someone else still
/// holds the pipe open, it is handed on ([`Table::adopt`]) instead of closed.
async fn pump(proc: Arc<Proc>, s: usize, fd: AsyncFd<OwnedFd>) {
    let mut rx = proc.tx.subscribe();
    let mut buf = vec![0u8; READ_BUF];
    let mut after_exit = 0usize;
    let mut held_by_others = false;
    loop {
        rx.borrow_and_update();
        let (allowed, exited) = {
            let st = lock(&proc.st);
            (st.pending(s) < OUT_CAP, st.exit.is_some())
        };
        if !allowed {
            if rx.changed().await.is_err() {
                break;
            }
            continue;
        }
        if exited {
            // The process is gone: take what is already in the pipe, stop at the first "empty"
            // (a daemon holding the pipe open must not keep the stream alive, but it must not
            // find its output broken either: the pipe is handed on).
            match read_fd(fd.get_ref(), &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    after_exit += n;
                    lock(&proc.st).push(s, &buf[..n], proc.background);
                    proc.bump();
                    if after_exit > POST_EXIT_DRAIN {
                        held_by_others = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    held_by_others = true;
                    break;
                }
                Err(_) => break, // EIO from a pty whose slave is closed
            }
            continue;
        }
        tokio::select! {
            r = fd.readable() => {
                let Ok(mut guard) = r else { break };
                match guard.try_io(|inner| read_fd(inner.get_ref(), &mut buf)) {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => {
                        lock(&proc.st).push(s, &buf[..n], proc.background);
                        proc.bump();
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Err(_)) => break,
                    Err(_would_block) => {}
                }
            }
            r = rx.changed() => {
                if r.is_err() {
                    break;
                }
            }
        }
    }
    let handed_on = {
        let mut st = lock(&proc.st);
        st.done[s] = true;
        if held_by_others {
            st.leftover[s] = Some(fd.into_inner());
        }
        let all_done = st.done[0] && st.done[1];
        all_done.then(|| std::mem::take(&mut st.leftover))
    };
    if handed_on.is_some() && proc.foreign_start.is_some() {
        // Every holder of its pipes is gone; it may have ended unseen.
        proc.check_foreign();
    }
    proc.bump();
    if let Some(fds) = handed_on.filter(|fds| fds.iter().any(Option::is_some)) {
        if let Some(table) = proc.table.upgrade() {
            table.adopt(&proc, fds);
        }
    }
}

/// Reads a pipe nobody can be found holding until its writers are gone, so none of them ever
/// gets EPIPE; the output goes nowhere.
async fn discard(fd: AsyncFd<OwnedFd>) {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        match guard.try_io(|inner| read_fd(inner.get_ref(), &mut buf)) {
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => return,
            Err(_would_block) => {}
        }
    }
}

/// What adoption needs of the process that left its pipes behind.
struct Leaver {
    sid: u32,
    pty: bool,
    cmd: Vec<String>,
}

/// What the guest needs of `/proc/<pid>/stat`.
struct ProcStat {
    pid: u32,
    state: char,
    ppid: u32,
    pgrp: u32,
    sid: u32,
    /// Clock ticks after boot; with the pid, names one process for good.
    start: u64,
}

fn stat_of(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) is in parentheses and may hold anything, so parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    Some(ProcStat {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        sid: f.get(3)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn all_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
}

fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn pipe_inode(fd: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_raw_fd())
        .ok()
        .map(|st| st.st_ino)
}

/// Whether `pid` has one of the pipes open; `None` where we may not look. The guest lacks
/// CAP_SYS_PTRACE, so it reads another user's `/proc/<pid>/fd` links as that user: the kernel
/// judges that access by the filesystem uid and gid, which are per thread and put back at once.
fn holds_any(pid: u32, inodes: &[u64]) -> Option<bool> {
    let _as = FsIdentity::of(pid)?;
    let rd = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut seen = 0usize;
    for entry in rd {
        let link = std::fs::read_link(entry.ok()?.path()).ok()?;
        seen += 1;
        let ino = link.to_str().and_then(|l| {
            l.strip_prefix("pipe:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()
        });
        if ino.is_some_and(|ino| inodes.contains(&ino)) {
            return Some(true);
        }
    }
    // An empty listing says nothing (a process mid-exec, or one we were not shown).
    (seen > 0).then_some(false)
}

/// This thread's filesystem uid and gid set to a process's owner while it lives, then restored.
/// Only the calling thread changes (the raw syscalls, not the process-wide `setuid` family), and
/// nothing else runs on it meanwhile: `adopt` does no `.await`.
struct FsIdentity {
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
}

impl FsIdentity {
    fn of(pid: u32) -> Option<FsIdentity> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        // `Uid:` and `Gid:` list real, effective, saved and filesystem ids; take the effective.
        let id = |key: &str| -> Option<u32> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line.split_whitespace().nth(2)?.parse().ok()
        };
        let (uid, gid) = (id("Uid:")?, id("Gid:")?);
        // The group while still root, the user last; put back in the reverse order (a non-zero
        // fsuid drops the filesystem capabilities, not CAP_SETUID or CAP_SETGID).
        let gid = nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
        let uid = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
        Some(FsIdentity { uid, gid })
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        nix::unistd::setfsuid(self.uid);
        nix::unistd::setfsgid(self.gid);
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

async fn stdin_writer(
    proc: Arc<Proc>,
    fd: AsyncFd<OwnedFd>,
    mut rx: mpsc::Receiver<StdinMsg>,
    pty: bool,
) {
    let work = async {
        while let Some(msg) = rx.recv().await {
            match msg {
                StdinMsg::Data(d) => {
                    if write_all(&fd, &d).await.is_err() {
                        return;
                    }
                }
                // A terminal has no "close": send the EOF character (^D) instead.
                StdinMsg::Eof if pty => {
                    if write_all(&fd, &[4]).await.is_err() {
                        return;
                    }
                }
                StdinMsg::Eof => return,
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = proc.wait_exit() => {}
    }
    // Later sends fail fast instead of queueing forever.
    *lock(&proc.stdin) = None;
}

async fn timeout_task(proc: Arc<Proc>, after: Duration) {
    tokio::select! {
        _ = proc.wait_exit() => return,
        _ = tokio::time::sleep(after) => {}
    }
    lock(&proc.st).timed_out = true;
    let _ = proc.signal_group(libc::SIGTERM);
    tokio::time::sleep(KILL_GRACE).await;
    proc.kill_group();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_buffer_keeps_only_the_last_megabyte_without_readers() {
        let mut st = OutState::default();
        let chunk = vec![1u8; 60_000];
        for _ in 0..100 {
            st.push(0, &chunk, true);
        }
        assert!(st.held[0] <= OUT_CAP + 60_000 + CHUNK_OVERHEAD);
        assert!(st.held[0] >= OUT_CAP - 60_000);
        assert_eq!(st.pending(0), 0, "no reader: pumps never pause");
    }

    #[test]
    fn a_slow_reader_applies_backpressure_and_foreground_drops_what_was_read() {
        let mut st = OutState::default();
        st.subs.insert(0, 0);
        let chunk = vec![1u8; 1000];
        st.push(0, &chunk, false);
        st.push(1, &chunk, false);
        st.push(0, &chunk, false);
        assert_eq!(
            st.q[0].len(),
            2,
            "no coalescing across an interleaved stderr chunk"
        );
        assert_eq!(st.pending(0), 2 * (1000 + CHUNK_OVERHEAD));
        // The reader took the first chunk.
        st.subs.insert(0, 1);
        st.trim(false);
        assert_eq!(st.q[0].len(), 1);
        assert_eq!(st.pending(0), 1000 + CHUNK_OVERHEAD);
        for _ in 0..2000 {
            st.push(0, &chunk, false);
        }
        assert!(
            st.pending(0) >= OUT_CAP,
            "unread output beyond the cap pauses the pump"
        );
    }
}
