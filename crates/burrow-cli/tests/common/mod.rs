//! Test harness: a real `burrow up` in a temporary data directory on a loopback port, driven through
//! the real CLI binary and the API client. Every test that starts one needs root (namespaces,
//! cgroups, loop devices) and says so when it skips.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use burrow_client::Client;
use burrow_types::{ExecRequest, ExecResult};

pub mod world;

pub const BURROW: &str = env!("CARGO_BIN_EXE_burrow");
pub const CGROUP_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "memory", "pids", "freezer", "devices", "blkio", "cpuset",
];

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Returns false (and says why) when the test cannot run here.
pub fn require_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!(
        "skipping: {what} needs root (namespaces, cgroups and loop devices); CI runs it as root"
    );
    false
}

pub struct TestServer {
    pub url: String,
    pub key: String,
    pub data: PathBuf,
    pub home: PathBuf,
    _tmp: tempfile::TempDir,
    child: Option<Child>,
    listen: String,
    env: Vec<(String, String)>,
    /// Network namespace `burrow up` runs in, and its extra arguments (`start_in_world`).
    netns: Option<String>,
    args: Vec<String>,
    /// Dropped after the server (fields drop after `Drop::drop`), so its namespaces outlive it.
    pub world: Option<world::World>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().unwrap().port()
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with_env(&[]).await
    }

    /// A server with extra environment (e.g. `BURROW_PLANS`).
    pub async fn start_with_env(env: &[(&str, &str)]) -> TestServer {
        Self::start_with(None, env, &[]).await
    }

    /// A server with sandbox networking, inside a world of network namespaces made for this test
    /// (see [`world`]): no packet leaves them. `extra` goes to `burrow up`.
    pub async fn start_in_world(extra: &[&str]) -> TestServer {
        sweep_dead_runs();
        let world = world::World::new();
        let mut s = Self::start_unspawned();
        s.url = format!("http://{}", world.api_addr());
        s.listen = format!("0.0.0.0:{}", world::API_PORT);
        s.netns = Some(world.server_ns.clone());
        s.args = [
            "--network",
            "--dns",
            world::FAKE_HOST,
            "--domain",
            world::DOMAIN,
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect();
        s.world = Some(world);
        s.spawn().await;
        s
    }

    fn start_unspawned() -> TestServer {
        let tmp = tempfile::Builder::new()
            .prefix("burrow-test-")
            .tempdir()
            .expect("tempdir");
        // Which test process owns this directory, so a later run can sweep it if we are killed.
        std::fs::write(tmp.path().join("owner.pid"), std::process::id().to_string()).unwrap();
        let data = tmp.path().join("data");
        let home = tmp.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        TestServer {
            url: String::new(),
            key: format!("burrow_test_{}", hex_random(20)),
            data,
            home,
            _tmp: tmp,
            child: None,
            listen: String::new(),
            env: Vec::new(),
            netns: None,
            args: Vec::new(),
            world: None,
        }
    }

    pub fn world(&self) -> &world::World {
        self.world.as_ref().expect("a server started in a world")
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = match &self.netns {
            // nsenter, not `ip netns exec`: the latter mounts a fresh /sys, which hides the
            // cgroup hierarchies burrow needs.
            Some(ns) => {
                let mut c = Command::new("/usr/bin/nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(BURROW);
                c
            }
            None => Command::new(BURROW),
        };
        cmd.args(["up", "--data-dir"])
            .arg(&self.data)
            .args(["--listen", &self.listen])
            .args(&self.args)
            .env("BURROW_ADMIN_KEY", &self.key)
            .env("HOME", &self.home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("BURROW_PROFILE")
            .env("BURROW_LOG", "info,burrow=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = spawn_tied(cmd).expect("spawn burrow up");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.client().health().await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("burrow up exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "burrow up did not answer in 60 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The test's own temporary directory (data dir, HOME, the server's log).
    pub fn dir(&self) -> &Path {
        self._tmp.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self._tmp.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url, &self.key)
    }

    pub fn client_with(&self, key: &str) -> Client {
        Client::new(&self.url, key)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or_default()
    }

    /// Runs the real CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_cmd(args).output().expect("run burrow")
    }

    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BURROW);
        c.args(args)
            .env_remove("BURROW_PROFILE")
            .env("BURROW_URL", &self.url)
            .env("BURROW_API_KEY", &self.key)
            .env("HOME", &self.home)
            .stdin(Stdio::null());
        c
    }

    /// `kill -9` of the server: no chance to clean anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Sandbox ids that still have a directory on the host.
    pub fn host_sandbox_dirs(&self) -> Vec<String> {
        list_dir(&self.data.join("sandboxes"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
        // Whatever a failed test left behind goes too, so later runs start clean.
        for id in self.host_sandbox_dirs() {
            force_clean(&id);
        }
    }
}

/// Starts `cmd` so that it dies with this test process, even when the test is killed outright
/// (a timeout's SIGKILL runs no `Drop`): `PR_SET_PDEATHSIG` in the child. The kernel sends that
/// signal when the *thread* that forked exits, so every tied child is forked by one thread that
/// lives as long as the process.
pub fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tied-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let parent = std::process::id();
                    // SAFETY: the closure runs between fork and exec and makes only two
                    // async-signal-safe syscalls (prctl, getppid); it allocates nothing.
                    unsafe {
                        cmd.pre_exec(move || {
                            rustix::process::set_parent_process_death_signal(Some(
                                rustix::process::Signal::KILL,
                            ))?;
                            // The parent may have died before the prctl: then go at once.
                            let ppid = rustix::process::getppid().map(|p| p.as_raw_nonzero().get());
                            if ppid != Some(parent as i32) {
                                return Err(std::io::Error::other("the test process is gone"));
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// Sandboxes outlive their server by design, so a test process killed outright (no `Drop`) leaves
/// its sandboxes running (its server and helpers die with it: [`spawn_tied`]). Sweep the
/// directories and namespaces of test processes that no longer exist.
pub fn sweep_dead_runs() {
    let tmp = std::env::temp_dir();
    for name in list_dir(&tmp)
        .into_iter()
        .filter(|n| n.starts_with("burrow-test-"))
    {
        let dir = tmp.join(&name);
        let owner = std::fs::read_to_string(dir.join("owner.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(owner) = owner else { continue };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        for id in list_dir(&dir.join("data").join("sandboxes")) {
            force_clean(&id);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    world::sweep_dead_worlds();
}

fn list_dir(p: &Path) -> Vec<String> {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn hex_random(n: usize) -> String {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Kills and removes a sandbox's cgroups by hand (test clean-up only; burrow's own destroy is what
/// the tests check).
pub fn force_clean(id: &str) {
    let dir = |ctrl: &str| PathBuf::from(format!("/sys/fs/cgroup/{ctrl}/burrow/{id}"));
    // Thaw first: a paused sandbox's frozen processes cannot die, and their cgroups cannot go.
    let _ = std::fs::write(dir("freezer").join("freezer.state"), "THAWED");
    for ctrl in CGROUP_CONTROLLERS {
        for pid in std::fs::read_to_string(dir(ctrl).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    for ctrl in CGROUP_CONTROLLERS {
        let d = dir(ctrl);
        for _ in 0..100 {
            if !d.exists() || std::fs::remove_dir(&d).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Everything of sandbox `id` still on the host: cgroups, processes, mounts, loop devices,
/// directories. Empty means destroyed cleanly.
pub fn host_leftovers(srv: &TestServer, id: &str) -> Vec<String> {
    host_leftovers_in(&srv.data, id)
}

/// [`host_leftovers`] for a data directory whose server is gone.
pub fn host_leftovers_in(data: &Path, id: &str) -> Vec<String> {
    let mut left = Vec::new();
    for ctrl in CGROUP_CONTROLLERS {
        let dir = format!("/sys/fs/cgroup/{ctrl}/burrow/{id}");
        if Path::new(&dir).exists() {
            left.push(format!("cgroup {dir}"));
        }
    }
    if Path::new(&format!("/sys/fs/cgroup/unified/burrow/{id}")).exists() {
        left.push("cgroup v2 dir".into());
    }
    for pid in list_dir(Path::new("/proc"))
        .into_iter()
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
    {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cg.contains(id) {
            left.push(format!("process {pid}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines().filter(|l| l.contains(id)) {
        left.push(format!("mount {line}"));
    }
    for dev in list_dir(Path::new("/sys/block"))
        .into_iter()
        .filter(|d| d.starts_with("loop"))
    {
        let backing = std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file"))
            .unwrap_or_default();
        if backing.contains(id) {
            left.push(format!("loop device {dev} -> {}", backing.trim()));
        }
    }
    if data.join("sandboxes").join(id).exists() {
        left.push("sandbox directory".into());
    }
    left
}

/// Polls `f` until it returns true or `secs` pass.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `/bin/sh -c script`, with a timeout long enough for a loaded CI machine.
pub fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(120_000),
        ..Default::default()
    }
}

/// Runs a shell script in a sandbox; panics if the API call fails (not if the script does).
pub async fn run(c: &Client, id: &str, script: &str) -> ExecResult {
    c.exec(id, &sh(script))
        .await
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"))
}

/// Runs Debian's python3 with `code` in a sandbox.
pub async fn py(c: &Client, id: &str, code: &str) -> ExecResult {
    let req = ExecRequest {
        cmd: vec!["/usr/bin/python3".into(), "-c".into(), code.into()],
        timeout_ms: Some(120_000),
        ..Default::default()
    };
    c.exec(id, &req)
        .await
        .unwrap_or_else(|e| panic!("python in {id}: {e}"))
}

// ---- tools installed once from a registry (the E2B SDKs, schemathesis), kept under target/ ----

/// What a registry client prints when it cannot reach its registry at all.
pub fn registry_unreachable(log: &str) -> bool {
    [
        "Failed to establish a new connection",
        "Temporary failure in name resolution",
        "Network is unreachable",
        "Connection refused",
        "ENOTFOUND",
        "EAI_AGAIN",
        "ECONNREFUSED",
        "ENETUNREACH",
        "ETIMEDOUT",
        "Max retries exceeded",
        "Could not fetch URL",
        // pip found no index at all: every package asked for has versions wherever PyPI answers.
        "(from versions: none)",
    ]
    .iter()
    .any(|m| log.contains(m))
}

/// Installs into `cache/name` once: into a directory of this process's own, then renamed into
/// place (tests run in parallel processes, and the first to finish wins; the others use its
/// copy). `install` gets the fresh directory and returns false when the registry could not be
/// reached.
pub fn cached_install(
    cache: &Path,
    name: &str,
    install: impl FnOnce(&Path) -> bool,
) -> Option<PathBuf> {
    let dir = cache.join(name);
    if dir.join(".installed").exists() {
        return Some(dir);
    }
    std::fs::create_dir_all(cache).unwrap();
    let tmp = cache.join(format!("{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    if !install(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return None;
    }
    std::fs::write(tmp.join(".installed"), name).unwrap();
    if std::fs::rename(&tmp, &dir).is_err() {
        if dir.join(".installed").exists() {
            // Another test process installed it first.
            let _ = std::fs::remove_dir_all(&tmp);
        } else {
            // A half-made copy from an interrupted run is in the way.
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).expect("put the installed tool in place");
        }
    }
    Some(dir)
}

/// A venv at `cache/name` (made with Debian's python3) with `requirement` installed from PyPI.
/// None, with the reason printed, when PyPI cannot be reached.
pub fn pip_venv(cache: &Path, name: &str, requirement: &str) -> Option<PathBuf> {
    pip_venv_all(cache, name, &[requirement])
}

/// [`pip_venv`] with several requirements installed together (pinning a dependency too).
pub fn pip_venv_all(cache: &Path, name: &str, requirements: &[&str]) -> Option<PathBuf> {
    cached_install(cache, name, |venv| {
        let o = Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(venv)
            .output()
            .expect("run python3 -m venv (scripts/deps installs python3-venv)");
        assert!(
            o.status.success(),
            "python3 -m venv failed:\n{}",
            output_text(&o)
        );
        let o = Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(requirements)
            .output()
            .expect("run pip");
        installed(&o, &format!("pip install {}", requirements.join(" ")))
    })
}

/// Whether an install from a registry (`what`) succeeded: false, saying why, when the registry
/// cannot be reached (the test then skips); any other failure fails the test.
pub fn installed(o: &Output, what: &str) -> bool {
    if o.status.success() {
        return true;
    }
    let log = output_text(o);
    if registry_unreachable(&log) {
        eprintln!("skipping: the registry is unreachable, {what} failed:\n{log}");
        return false;
    }
    panic!("{what} failed:\n{log}");
}

/// A finished command's stdout and stderr, as text.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The repository's root (scripts, tests/e2b, images).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ---- the E2B SDKs against a test server ----

/// A user whose API key has E2B's shape, and the three variables docs/e2b.md tells users to set.
pub async fn e2b_env(srv: &TestServer, name: &str) -> Vec<(String, String)> {
    let created = srv
        .client()
        .create_user_with(name, Some("pro"), true)
        .await
        .expect("create a user with an e2b_ key");
    let key = created["api_key"].as_str().unwrap().to_string();
    assert!(key.starts_with("e2b_"), "key shape: {key}");
    vec![
        ("E2B_API_URL".into(), srv.url.clone()),
        ("E2B_SANDBOX_URL".into(), srv.url.clone()),
        ("E2B_API_KEY".into(), key),
    ]
}

/// Runs an SDK script with exactly `env` of the E2B variables (none inherited from the caller's
/// shell: `E2B_DEBUG` or `E2B_DOMAIN` there would send the SDK elsewhere).
pub fn run_with(mut cmd: Command, env: &[(String, String)]) -> Output {
    for k in [
        "E2B_DOMAIN",
        "E2B_DEBUG",
        "E2B_ACCESS_TOKEN",
        "E2B_HTTP_VERSION",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run the SDK script")
}

impl TestServer {
    /// A server on a data directory the test prepared (e.g. a small filesystem it mounted),
    /// with extra environment and `burrow up` arguments. The directory is the caller's to
    /// remove, after this server is dropped.
    pub async fn start_on_data(data: PathBuf, env: &[(&str, &str)], args: &[&str]) -> TestServer {
        Self::start_with(Some(data), env, args).await
    }

    /// A server on a loopback port, on `data` (or a fresh temporary data directory).
    async fn start_with(data: Option<PathBuf>, env: &[(&str, &str)], args: &[&str]) -> TestServer {
        sweep_dead_runs();
        let mut s = Self::start_unspawned();
        if let Some(data) = data {
            s.data = data;
        }
        let listen = format!("127.0.0.1:{}", free_port());
        s.url = format!("http://{listen}");
        s.listen = listen;
        s.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s.args = args.iter().map(|a| a.to_string()).collect();
        s.spawn().await;
        s
    }

    /// A server that sees `hosts` as its `/etc/hosts` (bound over it in a mount namespace of its
    /// own), so a test decides what names resolve to without DNS: editing the file in place
    /// changes the answer at once. `env` as for [`TestServer::start_with_env`].
    pub async fn start_with_hosts_file(hosts: &Path, env: &[(&str, &str)]) -> TestServer {
        sweep_dead_runs();
        let mut s = Self::start_unspawned();
        let listen = format!("127.0.0.1:{}", free_port());
        s.url = format!("http://{listen}");
        s.listen = listen;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.log_path())
            .unwrap();
        let script = r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#;
        let child = Command::new("/usr/bin/unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                script,
                "sh",
            ])
            .arg(hosts)
            .arg(BURROW)
            .args(["up", "--data-dir"])
            .arg(&s.data)
            .args(["--listen", &s.listen])
            .env("BURROW_ADMIN_KEY", &s.key)
            .env("HOME", &s.home)
            .env_remove("XDG_CONFIG_HOME")
            .env("BURROW_LOG", "info,burrow=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn burrow up");
        s.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.client().health().await.is_err() {
            if let Some(status) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("burrow up exited with {status}:\n{}", s.log());
            }
            assert!(
                Instant::now() < deadline,
                "burrow up did not answer in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s
    }
}

/// A callback receiver: accepts HTTP connections on `addr` (loopback), answers 204 and reports
/// each request's head and body; a connection that sends nothing is reported as empty, so every
/// connection counts.
pub fn http_receiver(addr: &str) -> (u16, std::sync::mpsc::Receiver<(String, String)>) {
    let l = std::net::TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut got = (String::new(), String::new());
            while let Ok(n) = std::io::Read::read(&mut conn, &mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        got = (head.to_string(), body.to_string());
                        let _ = std::io::Write::write_all(
                            &mut conn,
                            b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
                        );
                        break;
                    }
                }
            }
            let _ = tx.send(got);
        }
    });
    (port, rx)
}
