//! Test harness for the storage tests: real pools on the real kernel (root), each test in its own
//! directory under `/var/tmp` whose name carries the test process's pid, so the next run can
//! clean what a killed run left (mounts, then files). Volumes are attached in a private mount
//! namespace of one thread, as `burrow __init` would, and written to as the sandbox's own uids.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use burrow_storage::{
    Attached, BtrfsConfig, BtrfsPool, Ext4Config, Ext4Loop, Kind, Owners, Storage, Volume,
};
use nix::mount::{MntFlags, MsFlags};

pub const MIB: u64 = 1024 * 1024;
const PREFIX: &str = "burrow-storage-test.";
/// The pool image of a test: small, preallocated.
pub const POOL_SIZE: u64 = 1024 * MIB;
/// The sandbox's uids, as a uid slot would give them.
pub const OWNERS: Owners = Owners {
    root: 0x3000_0000,
    user: 0x3000_0000 + 1000,
};

pub fn require_root(what: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "skipping: {what} needs root (loop devices, mounts, btrfs ioctls); CI runs it as root"
    );
    false
}

/// Skips (with the reason) where the kernel has no btrfs simple quotas.
pub fn require_btrfs(what: &str) -> bool {
    let mkfs = [
        "/usr/sbin/mkfs.btrfs",
        "/sbin/mkfs.btrfs",
        "/usr/bin/mkfs.btrfs",
    ];
    if !mkfs.iter().any(|p| Path::new(p).is_file()) {
        eprintln!("skipping: {what} needs mkfs.btrfs (install btrfs-progs: scripts/deps)");
        return false;
    }
    match burrow_storage::btrfs_unsupported() {
        None => true,
        Some(why) => {
            eprintln!("skipping: {what} needs btrfs simple quotas: {why}");
            false
        }
    }
}

/// A test's directory; dropping it unmounts the pool and removes everything.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        sweep();
        let base = Path::new("/var/tmp");
        let path = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}.{tag}.", std::process::id()))
            .tempdir_in(base)
            .unwrap()
            .keep();
        // Sandbox uids must be able to traverse it (mktemp makes it 0700).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o711)).unwrap();
        TestDir { path }
    }

    pub fn data(&self) -> PathBuf {
        self.path.join("data")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        clean(&self.path);
    }
}

fn clean(dir: &Path) {
    for m in ["data/pool", "data/pool.new"] {
        let _ = nix::mount::umount2(&dir.join(m), MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes the directories of test processes that are gone.
fn sweep() {
    let Ok(rd) = std::fs::read_dir("/var/tmp") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            clean(&e.path());
        }
    }
}

/// A storage of `kind` in `dir`, prepared.
pub fn storage(kind: Kind, dir: &TestDir) -> Box<dyn Storage> {
    let s = unprepared(kind, &dir.data(), true);
    s.prepare().unwrap();
    s
}

pub fn unprepared(kind: Kind, data: &Path, background_purge: bool) -> Box<dyn Storage> {
    match kind {
        Kind::Btrfs => Box::new(BtrfsPool::new(BtrfsConfig {
            data_dir: data.to_path_buf(),
            image_size: Some(POOL_SIZE),
            background_purge,
        })),
        Kind::Ext4 => Box::new(Ext4Loop::new(Ext4Config {
            data_dir: data.to_path_buf(),
            background_purge,
        })),
    }
}

/// The kinds this host can test, each with a note when one is skipped.
pub fn kinds(what: &str) -> Vec<Kind> {
    let mut k = Vec::new();
    if require_btrfs(what) {
        k.push(Kind::Btrfs);
    }
    k.push(Kind::Ext4);
    k
}

/// Runs `f` on a thread of its own in a private mount namespace (as `burrow __init` runs), so
/// whatever it mounts disappears with the thread.
pub fn in_private_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("making / private");
        f()
    })
    .join()
    .expect("the private-namespace thread panicked")
}

/// Attaches `vol` at a fresh mount point under `dir` (in the calling thread's namespace).
pub fn attach(vol: &Volume, dir: &Path) -> Attached {
    let at = dir.join(format!("disk-{}", vol.id));
    std::fs::create_dir_all(&at).unwrap();
    vol.attach(&at, OWNERS).unwrap()
}

/// Mounts an overlay of `lower` under `a`'s upper layer at `merged` (as the sandbox's root is).
pub fn overlay(lower: &Path, a: &Attached, merged: &Path) {
    std::fs::create_dir_all(merged).unwrap();
    nix::mount::mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(
            format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                a.upper().display(),
                a.work().display()
            )
            .as_str(),
        ),
    )
    .expect("mounting an overlay on the volume");
}

/// Sets this thread's filesystem uid and gid (only this thread's: `setfsuid` is per thread).
pub fn as_uid(uid: u32) {
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(uid));
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
}

/// Writes `path` in 1 MiB chunks until `max` bytes or an error; returns the bytes written and the
/// errno that stopped it (after an `fsync`, so delayed allocation failures count).
pub fn fill(path: &Path, max: u64) -> (u64, Option<i32>) {
    let mut f = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return (0, e.raw_os_error()),
    };
    let chunk = vec![0x5au8; MIB as usize];
    let mut written = 0u64;
    while written < max {
        match f.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) => return (written, e.raw_os_error()),
        }
    }
    match f.sync_all() {
        Ok(()) => (written, None),
        Err(e) => (written, e.raw_os_error()),
    }
}

pub fn write(path: &Path, body: &[u8]) {
    std::fs::write(path, body).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Reads `path` as a string, `None` if it does not exist.
pub fn read(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

/// The errno a writer sees at a volume's limit.
pub fn limit_errno(kind: Kind) -> i32 {
    match kind {
        Kind::Btrfs => libc::EDQUOT,
        Kind::Ext4 => libc::ENOSPC,
    }
}

/// Loop devices whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    burrow_linux::loopdev::devices_backed_by(&dir.to_string_lossy())
}

/// Mounts (in this thread's namespace) of anything under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/thread-self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&d)))
        .map(String::from)
        .collect()
}

/// Waits up to `secs` for `f` to hold.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Commits whatever is pending on the filesystem `path` is on.
pub fn syncfs(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    rustix::fs::syncfs(&f).unwrap();
}
