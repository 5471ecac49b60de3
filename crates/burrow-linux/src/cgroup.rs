//! Cgroups for sandboxes, on v1 (one hierarchy per controller, what this project's machines have)
//! and v2 (one unified hierarchy). Each sandbox gets `burrow/<id>` in every hierarchy burrow uses.
//! File access goes through [`CgroupFs`], so the limit logic is unit-tested without root.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "burrow";
/// CFS period; quota is a share of it.
const CPU_PERIOD_US: u64 = 100_000;
/// v1 controllers burrow uses: limits (cpu, memory, pids, blkio), accounting (cpuacct), pause
/// (freezer).
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "freezer", "blkio"];

/// What a sandbox's cgroup enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Thousandths of a CPU.
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub pids: u32,
}

/// The file operations cgroups need; [`RealFs`] on the host, a recording fake in tests.
/// Block-I/O throttle of a sandbox on its own disk's device, per second; 0 is no limit. On v1 it
/// holds for I/O the sandbox's processes submit themselves: direct I/O, reads that miss the page
/// cache, and the writeback an `fsync` does in the caller's context. Buffered writes flushed later
/// by the kernel's writeback threads (and the ext4 journal) are not charged to the sandbox on v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoLimits {
    pub read_bps: u64,
    pub write_bps: u64,
    pub read_iops: u64,
    pub write_iops: u64,
}

/// The file operations cgroups need; [`RealFs`] on the host, a recording fake in tests.
pub trait CgroupFs {
    fn mkdir(&self, p: &Path) -> io::Result<()>;
    fn rmdir(&self, p: &Path) -> io::Result<()>;
    fn write(&self, p: &Path, v: &str) -> io::Result<()>;
    fn read(&self, p: &Path) -> io::Result<String>;
    fn exists(&self, p: &Path) -> bool;
    fn list(&self, p: &Path) -> Vec<String>;
}

pub struct RealFs;

impl CgroupFs for RealFs {
    fn mkdir(&self, p: &Path) -> io::Result<()> {
        match std::fs::create_dir(p) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        }
    }
    fn rmdir(&self, p: &Path) -> io::Result<()> {
        match std::fs::remove_dir(p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
    fn write(&self, p: &Path, v: &str) -> io::Result<()> {
        std::fs::write(p, v)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {v:?} to {}: {e}", p.display())))
    }
    fn read(&self, p: &Path) -> io::Result<String> {
        std::fs::read_to_string(p)
    }
    fn exists(&self, p: &Path) -> bool {
        p.exists()
    }
    fn list(&self, p: &Path) -> Vec<String> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Directory of each v1 hierarchy burrow uses, by controller name.
    V1(Vec<(&'static str, PathBuf)>),
    /// The unified hierarchy's root.
    V2(PathBuf),
}

impl Layout {
    /// A pure v2 host has `cgroup.controllers` at the root; otherwise the v1 hierarchies are used
    /// (a hybrid host's small v2 mount is ignored).
    pub fn detect() -> Layout {
        let root = Path::new(ROOT);
        if root.join("cgroup.controllers").exists() {
            return Layout::V2(root.to_path_buf());
        }
        let mut seen = BTreeSet::new();
        let mut dirs = Vec::new();
        for c in V1_CONTROLLERS {
            let p = root.join(c);
            // `cpu` and `cpuacct` are often one hierarchy behind two symlinks.
            let real = std::fs::canonicalize(&p).unwrap_or(p);
            if seen.insert(real.clone()) {
                dirs.push((*c, real));
            }
        }
        Layout::V1(dirs)
    }
}

pub struct Cgroups<F: CgroupFs = RealFs> {
    layout: Layout,
    fs: F,
}

impl Cgroups<RealFs> {
    pub fn host() -> Cgroups<RealFs> {
        Cgroups {
            layout: Layout::detect(),
            fs: RealFs,
        }
    }
}

impl<F: CgroupFs> Cgroups<F> {
    pub fn new(layout: Layout, fs: F) -> Self {
        Cgroups { layout, fs }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn parents(&self) -> Vec<(&'static str, PathBuf)> {
        match &self.layout {
            Layout::V1(dirs) => dirs.iter().map(|(c, d)| (*c, d.join(PARENT))).collect(),
            Layout::V2(root) => vec![("unified", root.join(PARENT))],
        }
    }

    /// Every directory of sandbox `id`.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        self.parents()
            .into_iter()
            .map(|(_, p)| p.join(id))
            .collect()
    }

    fn dir_of(&self, controller: &str, id: &str) -> Option<PathBuf> {
        self.parents()
            .into_iter()
            .find(|(c, _)| *c == controller || *c == "unified")
            .map(|(_, p)| p.join(id))
    }

    /// Creates burrow's parent cgroups (and on v2 enables the controllers for its children).
    pub fn prepare(&self) -> io::Result<()> {
        for (_, p) in self.parents() {
            self.fs.mkdir(&p)?;
        }
        if let Layout::V2(root) = &self.layout {
            for dir in [root.clone(), root.join(PARENT)] {
                let control = dir.join("cgroup.subtree_control");
                // Not every host offers the io controller; without it there is no throttle.
                if self.fs.write(&control, "+cpu +memory +pids +io").is_err() {
                    self.fs.write(&control, "+cpu +memory +pids")?;
                }
            }
        }
        Ok(())
    }

    /// Creates the sandbox's cgroups with its limits.
    pub fn create(&self, id: &str, l: CgroupLimits) -> io::Result<()> {
        for d in self.dirs(id) {
            self.fs.mkdir(&d)?;
        }
        self.set_limits(id, l)
    }

    /// Writes the limits of existing cgroups (at create, and when a warm sandbox is claimed with
    /// another plan's limits).
    pub fn set_limits(&self, id: &str, l: CgroupLimits) -> io::Result<()> {
        let quota = u64::from(l.cpu_millis) * CPU_PERIOD_US / 1000;
        match &self.layout {
            Layout::V1(_) => {
                if let Some(cpu) = self.dir_of("cpu", id) {
                    self.fs
                        .write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    self.fs
                        .write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                if let Some(mem) = self.dir_of("memory", id) {
                    let limit = mem.join("memory.limit_in_bytes");
                    let value = l.memory_bytes.to_string();
                    // Memory plus swap at the same value: the sandbox cannot swap its way past it.
                    // The kernel refuses a memory limit above the memory+swap limit, so when
                    // raising, memsw goes first.
                    let memsw = mem.join("memory.memsw.limit_in_bytes");
                    if self.fs.exists(&memsw) {
                        if self.fs.write(&limit, &value).is_err() {
                            self.fs.write(&memsw, &value)?;
                            self.fs.write(&limit, &value)?;
                        } else {
                            self.fs.write(&memsw, &value)?;
                        }
                    } else {
                        self.fs.write(&limit, &value)?;
                    }
                }
                if let Some(pids) = self.dir_of("pids", id) {
                    self.fs.write(&pids.join("pids.max"), &l.pids.to_string())?;
                }
            }
            Layout::V2(_) => {
                let d = self.dirs(id).remove(0);
                self.fs
                    .write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                self.fs
                    .write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
                if self.fs.exists(&d.join("memory.swap.max")) {
                    self.fs.write(&d.join("memory.swap.max"), "0")?;
                }
                self.fs.write(&d.join("pids.max"), &l.pids.to_string())?;
            }
        }
        Ok(())
    }

    /// Writes the sandbox's block-I/O throttle on device `dev` (major, minor): its disk's loop
    /// device. v1: `blkio.throttle.*_device` (a 0 removes that rule); v2: `io.max`. Without the
    /// controller (v2 hosts without `io`) there is nothing to write.
    pub fn set_io(&self, id: &str, dev: (u32, u32), io: IoLimits) -> io::Result<()> {
        let (major, minor) = dev;
        match &self.layout {
            Layout::V1(_) => {
                let Some(d) = self.dir_of("blkio", id) else {
                    return Ok(());
                };
                for (file, v) in [
                    ("blkio.throttle.read_bps_device", io.read_bps),
                    ("blkio.throttle.write_bps_device", io.write_bps),
                    ("blkio.throttle.read_iops_device", io.read_iops),
                    ("blkio.throttle.write_iops_device", io.write_iops),
                ] {
                    self.fs
                        .write(&d.join(file), &format!("{major}:{minor} {v}"))?;
                }
            }
            Layout::V2(_) => {
                let file = self.dirs(id).remove(0).join("io.max");
                if !self.fs.exists(&file) {
                    return Ok(());
                }
                let v = |n: u64| {
                    if n == 0 {
                        "max".to_string()
                    } else {
                        n.to_string()
                    }
                };
                self.fs.write(
                    &file,
                    &format!(
                        "{major}:{minor} rbps={} wbps={} riops={} wiops={}",
                        v(io.read_bps),
                        v(io.write_bps),
                        v(io.read_iops),
                        v(io.write_iops)
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// Moves `pid` into every cgroup of the sandbox.
    pub fn join(&self, id: &str, pid: u32) -> io::Result<()> {
        for d in self.dirs(id) {
            self.fs.write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Processes in any of the sandbox's cgroups.
    pub fn procs(&self, id: &str) -> BTreeSet<u32> {
        self.dirs(id)
            .iter()
            .filter_map(|d| self.fs.read(&d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    /// Freezes (v1 freezer / v2 `cgroup.freeze`) or thaws every process of the sandbox.
    pub fn set_frozen(&self, id: &str, frozen: bool) -> io::Result<()> {
        match &self.layout {
            Layout::V1(_) => match self.dir_of("freezer", id) {
                Some(d) => self.fs.write(
                    &d.join("freezer.state"),
                    if frozen { "FROZEN" } else { "THAWED" },
                ),
                None => Ok(()),
            },
            Layout::V2(_) => self.fs.write(
                &self.dirs(id)[0].join("cgroup.freeze"),
                if frozen { "1" } else { "0" },
            ),
        }
    }

    /// Whether the sandbox's cgroup is frozen (or freezing) now; `None` when it has no freezer.
    pub fn frozen(&self, id: &str) -> Option<bool> {
        match &self.layout {
            Layout::V1(_) => {
                let d = self.dir_of("freezer", id)?;
                let state = self.fs.read(&d.join("freezer.state")).ok()?;
                Some(state.trim() != "THAWED")
            }
            Layout::V2(_) => {
                let v = self.fs.read(&self.dirs(id)[0].join("cgroup.freeze")).ok()?;
                Some(v.trim() == "1")
            }
        }
    }

    /// Freezes the sandbox and waits (up to `wait`) until the kernel reports every task frozen.
    pub fn freeze(&self, id: &str, wait: Duration) -> io::Result<()> {
        self.set_frozen(id, true)?;
        let (file, frozen) = match &self.layout {
            Layout::V1(_) => match self.dir_of("freezer", id) {
                Some(d) => (d.join("freezer.state"), "FROZEN"),
                None => return Ok(()),
            },
            Layout::V2(_) => (self.dirs(id)[0].join("cgroup.events"), "frozen 1"),
        };
        let deadline = Instant::now() + wait;
        while !self.fs.read(&file)?.contains(frozen) {
            if Instant::now() >= deadline {
                let _ = self.set_frozen(id, false);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("sandbox {id} did not freeze"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Kills every process of the sandbox and waits (up to `wait`) until none is left.
    pub fn kill_all(&self, id: &str, wait: Duration) -> io::Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            let procs = self.procs(id);
            if procs.is_empty() {
                return Ok(());
            }
            match &self.layout {
                Layout::V2(_) if self.fs.exists(&self.dirs(id)[0].join("cgroup.kill")) => {
                    self.fs.write(&self.dirs(id)[0].join("cgroup.kill"), "1")?;
                }
                _ => {
                    // Frozen processes cannot fork between the listing and the kill; SIGKILL is
                    // delivered once they are thawed.
                    let _ = self.set_frozen(id, true);
                    for pid in self.procs(id) {
                        crate::proc::kill9(pid)?;
                    }
                    let _ = self.set_frozen(id, false);
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} processes of sandbox {id} outlived SIGKILL", procs.len()),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes the sandbox's (empty) cgroups, retrying while the kernel finishes exits: the last
    /// process of a sandbox unmounts its disk on the way out, which can take seconds on a busy disk.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        for d in self.dirs(id) {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match self.fs.rmdir(&d) {
                    Ok(()) => break,
                    Err(e)
                        if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("removing {}: {e}", d.display()),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Ids of every sandbox cgroup on the host.
    pub fn ids(&self) -> BTreeSet<String> {
        self.parents()
            .iter()
            .flat_map(|(_, p)| self.fs.list(p))
            .collect()
    }

    /// Bytes of memory the sandbox uses now.
    pub fn memory_usage(&self, id: &str) -> Option<u64> {
        let (d, file) = match &self.layout {
            Layout::V1(_) => (self.dir_of("memory", id)?, "memory.usage_in_bytes"),
            Layout::V2(_) => (self.dirs(id).remove(0), "memory.current"),
        };
        self.fs.read(&d.join(file)).ok()?.trim().parse().ok()
    }

    /// CPU time used by the sandbox's processes so far, in nanoseconds.
    pub fn cpu_usage_ns(&self, id: &str) -> Option<u64> {
        match &self.layout {
            Layout::V1(_) => {
                let d = self.dir_of("cpuacct", id)?;
                self.fs
                    .read(&d.join("cpuacct.usage"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            }
            Layout::V2(_) => {
                let stat = self
                    .fs
                    .read(&self.dirs(id).remove(0).join("cpu.stat"))
                    .ok()?;
                let usec: u64 = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))?
                    .trim()
                    .parse()
                    .ok()?;
                Some(usec * 1000)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Records every write; files "exist" once written or when pre-seeded.
    #[derive(Default)]
    struct FakeFs {
        files: RefCell<BTreeMap<PathBuf, String>>,
        dirs: RefCell<BTreeSet<PathBuf>>,
    }

    impl CgroupFs for FakeFs {
        fn mkdir(&self, p: &Path) -> io::Result<()> {
            self.dirs.borrow_mut().insert(p.to_path_buf());
            Ok(())
        }
        fn rmdir(&self, p: &Path) -> io::Result<()> {
            self.dirs.borrow_mut().remove(p);
            Ok(())
        }
        fn write(&self, p: &Path, v: &str) -> io::Result<()> {
            self.files
                .borrow_mut()
                .insert(p.to_path_buf(), v.to_string());
            Ok(())
        }
        fn read(&self, p: &Path) -> io::Result<String> {
            self.files
                .borrow()
                .get(p)
                .cloned()
                .ok_or_else(|| io::ErrorKind::NotFound.into())
        }
        fn exists(&self, p: &Path) -> bool {
            self.files.borrow().contains_key(p) || self.dirs.borrow().contains(p)
        }
        fn list(&self, p: &Path) -> Vec<String> {
            self.dirs
                .borrow()
                .iter()
                .filter(|d| d.parent() == Some(p))
                .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        }
    }

    const LIMITS: CgroupLimits = CgroupLimits {
        cpu_millis: 500,
        memory_bytes: 512 << 20,
        pids: 512,
    };

    fn v1() -> Cgroups<FakeFs> {
        let dirs = V1_CONTROLLERS
            .iter()
            .map(|c| (*c, PathBuf::from(format!("/cg/{c}"))))
            .collect();
        Cgroups::new(Layout::V1(dirs), FakeFs::default())
    }

    fn file(cg: &Cgroups<FakeFs>, p: &str) -> Option<String> {
        cg.fs.files.borrow().get(Path::new(p)).cloned()
    }

    #[test]
    fn v1_limits_land_in_each_controller() {
        let cg = v1();
        cg.fs
            .write(
                Path::new("/cg/memory/burrow/s1/memory.memsw.limit_in_bytes"),
                "max",
            )
            .unwrap();
        cg.create("s1", LIMITS).unwrap();
        assert_eq!(
            file(&cg, "/cg/cpu/burrow/s1/cpu.cfs_quota_us").as_deref(),
            Some("50000")
        );
        assert_eq!(
            file(&cg, "/cg/cpu/burrow/s1/cpu.cfs_period_us").as_deref(),
            Some("100000")
        );
        assert_eq!(
            file(&cg, "/cg/memory/burrow/s1/memory.limit_in_bytes").as_deref(),
            Some("536870912")
        );
        assert_eq!(
            file(&cg, "/cg/memory/burrow/s1/memory.memsw.limit_in_bytes").as_deref(),
            Some("536870912")
        );
        assert_eq!(
            file(&cg, "/cg/pids/burrow/s1/pids.max").as_deref(),
            Some("512")
        );
        assert_eq!(cg.dirs("s1").len(), V1_CONTROLLERS.len());
        assert_eq!(cg.ids(), BTreeSet::from(["s1".to_string()]));
    }

    #[test]
    fn v2_limits_land_in_one_directory() {
        let cg = Cgroups::new(Layout::V2(PathBuf::from("/cg")), FakeFs::default());
        cg.prepare().unwrap();
        assert_eq!(
            file(&cg, "/cg/burrow/cgroup.subtree_control").as_deref(),
            Some("+cpu +memory +pids +io")
        );
        cg.create(
            "s1",
            CgroupLimits {
                cpu_millis: 2000,
                ..LIMITS
            },
        )
        .unwrap();
        assert_eq!(
            file(&cg, "/cg/burrow/s1/cpu.max").as_deref(),
            Some("200000 100000")
        );
        assert_eq!(
            file(&cg, "/cg/burrow/s1/memory.max").as_deref(),
            Some("536870912")
        );
        assert_eq!(file(&cg, "/cg/burrow/s1/pids.max").as_deref(), Some("512"));
        cg.join("s1", 42).unwrap();
        assert_eq!(cg.procs("s1"), BTreeSet::from([42]));
        cg.set_frozen("s1", true).unwrap();
        assert_eq!(
            file(&cg, "/cg/burrow/s1/cgroup.freeze").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn io_throttles_name_the_device_on_v1_and_v2() {
        let io = IoLimits {
            read_bps: 10,
            write_bps: 20,
            read_iops: 0,
            write_iops: 40,
        };
        let cg = v1();
        cg.create("s1", LIMITS).unwrap();
        cg.set_io("s1", (7, 3), io).unwrap();
        for (f, v) in [
            ("read_bps", "7:3 10"),
            ("write_bps", "7:3 20"),
            ("read_iops", "7:3 0"),
            ("write_iops", "7:3 40"),
        ] {
            assert_eq!(
                file(
                    &cg,
                    &format!("/cg/blkio/burrow/s1/blkio.throttle.{f}_device")
                )
                .as_deref(),
                Some(v)
            );
        }
        let v2 = Cgroups::new(Layout::V2(PathBuf::from("/cg")), FakeFs::default());
        v2.create("s1", LIMITS).unwrap();
        // No io controller: nothing to write, and no error.
        v2.set_io("s1", (7, 3), io).unwrap();
        assert_eq!(file(&v2, "/cg/burrow/s1/io.max"), None);
        v2.fs.write(Path::new("/cg/burrow/s1/io.max"), "").unwrap();
        v2.set_io("s1", (7, 3), io).unwrap();
        assert_eq!(
            file(&v2, "/cg/burrow/s1/io.max").as_deref(),
            Some("7:3 rbps=10 wbps=20 riops=max wiops=40")
        );
    }

    #[test]
    fn cpu_usage_reads_cpuacct_or_cpu_stat() {
        let cg = v1();
        cg.create("s1", LIMITS).unwrap();
        cg.fs
            .write(Path::new("/cg/cpuacct/burrow/s1/cpuacct.usage"), "1500\n")
            .unwrap();
        assert_eq!(cg.cpu_usage_ns("s1"), Some(1500));
        let v2 = Cgroups::new(Layout::V2(PathBuf::from("/cg")), FakeFs::default());
        v2.create("s1", LIMITS).unwrap();
        v2.fs
            .write(
                Path::new("/cg/burrow/s1/cpu.stat"),
                "usage_usec 7\nuser_usec 5\nsystem_usec 2\n",
            )
            .unwrap();
        assert_eq!(v2.cpu_usage_ns("s1"), Some(7000));
    }

    #[test]
    fn join_and_freeze_use_every_v1_hierarchy() {
        let cg = v1();
        cg.create("s1", LIMITS).unwrap();
        cg.join("s1", 7).unwrap();
        for c in V1_CONTROLLERS {
            assert_eq!(
                file(&cg, &format!("/cg/{c}/burrow/s1/cgroup.procs")).as_deref(),
                Some("7")
            );
        }
        cg.set_frozen("s1", true).unwrap();
        assert_eq!(
            file(&cg, "/cg/freezer/burrow/s1/freezer.state").as_deref(),
            Some("FROZEN")
        );
        cg.remove("s1").unwrap();
        assert!(cg.ids().is_empty());
    }
}
