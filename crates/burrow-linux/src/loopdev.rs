//! Loop devices: a file attached as a block device, so an ext4 image can be mounted as a
//! size-limited disk. Attached with LO_FLAGS_AUTOCLEAR: the kernel detaches the device by itself
//! when its last user (the mount) goes away, so a crashed or killed sandbox leaks no device.
//!
//! An image is never attached twice: two ext4 mounts of one image through two devices corrupt it.
//! [`attach`] checks every loop device's backing file by device and inode number (not by the path
//! string: a path can be spelled many ways) under the same lock it takes to pick a free device, so
//! two attaches of one image by burrow processes cannot both pass.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const BLKFLSBUF: libc::c_ulong = 0x1261;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device. Dropping it closes our handle; with autoclear the device detaches
/// once nothing has it open or mounted.
pub struct LoopDevice {
    pub path: PathBuf,
    _dev: File,
}

const TRIES: u32 = 32;

/// Attaches `image` to a free loop device. Fails with [`io::ErrorKind::ResourceBusy`] when a loop
/// device already has this very file (same device and inode) attached: the image is in use.
pub fn attach(image: &Path) -> io::Result<LoopDevice> {
    attach_with(image, false)
}

/// Attaches `image` to a free loop device; with `direct_io` the device reads and writes the
/// image with `O_DIRECT`, so its pages are not cached twice (once for the filesystem on the
/// device, once for the image file). The kernel falls back to buffered I/O where the image's
/// filesystem cannot do direct I/O.
pub fn attach_with(image: &Path, direct_io: bool) -> io::Result<LoopDevice> {
    let backing = OpenOptions::new().read(true).write(true).open(image)?;
    let st = nix::sys::stat::fstat(backing.as_raw_fd()).map_err(io::Error::from)?;
    let inode = FileId {
        dev: st.st_dev,
        ino: st.st_ino,
    };
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Burrow processes (every sandbox's `__init`, and other servers on the host) take an exclusive
    // lock on the control device around GET_FREE + CONFIGURE, so a burst of creates does not race
    // for the same free device. The lock goes with `ctl` when this returns.
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(ctl.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Checked under the lock: another burrow attaching the same image waits for this one, then
    // sees its device.
    if let Some(dev) = devices_backing(inode).into_iter().next() {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("{} is already attached to {dev}", image.display()),
        ));
    }
    // Another program (losetup) may still take the free device between GET_FREE and CONFIGURE:
    // retry then.
    for attempt in 0..TRIES {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(2 * u64::from(attempt)));
        }
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new().read(true).write(true).open(&path)?;
        // SAFETY: LoopConfig is plain old data; all-zero is a valid value.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        if direct_io {
            cfg.info.lo_flags |= LO_FLAGS_DIRECT_IO;
        }
        let name = image.as_os_str().as_encoded_bytes();
        let len = name.len().min(LO_NAME_SIZE - 1);
        cfg.info.lo_file_name[..len].copy_from_slice(&name[..len]);
        // SAFETY: LOOP_CONFIGURE reads a struct loop_config, which LoopConfig lays out.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
        if r == 0 {
            return Ok(LoopDevice { path, _dev: dev });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!("no free loop device after {TRIES} tries"),
    ))
}

/// A file's identity: its device and inode numbers, however its path is spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The identity of the file at `path` (following symlinks, like the attach that opened it).
    pub fn of(path: &Path) -> io::Result<FileId> {
        let st = nix::sys::stat::stat(path).map_err(io::Error::from)?;
        Ok(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

/// Names (`/dev/loopN`) of the loop devices whose backing file is `file` (see [`attached`]).
pub fn devices_backing(file: FileId) -> Vec<String> {
    attached()
        .into_iter()
        .filter(|(_, f)| *f == file)
        .map(|(dev, _)| dev)
        .collect()
}

/// Every bound loop device (`/dev/loopN`) with its backing file's identity: one pass over the
/// devices, for callers that check many images at once.
///
/// The identity is the device and inode of the file `backing_file` names. The kernel writes that
/// path from the open file itself (`d_path`), so it is the file's current path however the image
/// was spelled at attach, and a file renamed or replaced since shows as `(deleted)` (and matches
/// nothing). The devices themselves are never opened: an open of a loop device racing with the
/// last close of its mount can leave an autoclear device attached with no user, forever.
pub fn attached() -> Vec<(String, FileId)> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for name in rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("loop"))
    {
        // Unbound devices have no `loop/backing_file`.
        let Ok(text) = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        else {
            continue;
        };
        let path = text.trim_end_matches('\n');
        if path.ends_with(" (deleted)") {
            continue;
        }
        if let Ok(file) = FileId::of(Path::new(path)) {
            found.push((format!("/dev/{name}"), file));
        }
    }
    found
}

impl LoopDevice {
    /// The device number (major, minor).
    pub fn rdev(&self) -> io::Result<(u32, u32)> {
        let st = rustix::fs::fstat(&self._dev)?;
        Ok((rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev)))
    }
}

/// Flushes the filesystem mounted on the block device `dev` (the kernel syncs it through the
/// device's holder: `sync_filesystem`, with its journal), then the device's own buffers. How the
/// host makes an ext4 disk that is mounted only in a sandbox's mount namespace consistent on
/// its image, without a path into that namespace.
pub fn flush(dev: &Path) -> io::Result<()> {
    let f = OpenOptions::new().read(true).open(dev)?;
    // SAFETY: BLKFLSBUF takes no argument; the fd is ours for the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Tells the loop device `dev` that its backing file changed size.
pub fn set_capacity(dev: &Path) -> io::Result<()> {
    let f = OpenOptions::new().read(true).open(dev)?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is ours for the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_CAPACITY, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Loop devices whose backing file path contains `needle` (for leak checks and clean-up).
pub fn devices_backed_by(needle: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("loop"))
        .filter(|n| {
            std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file"))
                .map(|b| b.contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (loop devices): an image attached once cannot be attached again, whatever path
    /// names it, and is free again once its device is gone.
    #[test]
    fn an_image_is_never_attached_twice() {
        if !rustix_is_root() {
            eprintln!("skipping: attaching loop devices needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let first = attach(&img).unwrap();
        let id = FileId::of(&img).unwrap();
        assert_eq!(devices_backing(id), [first.path.display().to_string()]);
        // Another spelling of the same file: a symlink and a hard link.
        let sym = dir.path().join("sym.img");
        std::os::unix::fs::symlink(&img, &sym).unwrap();
        let hard = dir.path().join("hard.img");
        std::fs::hard_link(&img, &hard).unwrap();
        for other in [&img, &sym, &hard] {
            let err = attach(other).err().expect("attached twice");
            assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
        }
        // Autoclear: with our handle closed and nothing mounted, the device detaches itself.
        drop(first);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !devices_backing(id).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "device never detached"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let again = attach(&hard).unwrap();
        drop(again);
    }

    /// Needs root: images attached, mounted and released over and over while other threads
    /// scan the devices. Every attach works and every device detaches by itself: a scan that
    /// opened the devices could keep one attached forever (seen when it did).
    #[test]
    fn scanning_never_keeps_a_device_attached() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        if !rustix_is_root() {
            eprintln!("skipping: attaching loop devices and mounting need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let scanners: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = attached();
                    }
                })
            })
            .collect();
        let workers: Vec<_> = (0..3)
            .map(|i| {
                let img = dir.path().join(format!("img{i}"));
                let mnt = dir.path().join(format!("m{i}"));
                std::fs::create_dir(&mnt).unwrap();
                std::fs::File::create(&img)
                    .unwrap()
                    .set_len(16 << 20)
                    .unwrap();
                let mkfs = std::process::Command::new("mkfs.ext4")
                    .args(["-q", "-F"])
                    .arg(&img)
                    .status()
                    .unwrap();
                assert!(mkfs.success());
                std::thread::spawn(move || {
                    let id = FileId::of(&img).unwrap();
                    for _ in 0..40 {
                        let lo = attach(&img).unwrap();
                        nix::mount::mount(
                            Some(&lo.path),
                            &mnt,
                            Some("ext4"),
                            nix::mount::MsFlags::empty(),
                            None::<&str>,
                        )
                        .unwrap();
                        drop(lo);
                        nix::mount::umount(&mnt).unwrap();
                        let deadline =
                            std::time::Instant::now() + std::time::Duration::from_secs(10);
                        while !devices_backing(id).is_empty() {
                            assert!(
                                std::time::Instant::now() < deadline,
                                "{} stayed attached",
                                img.display()
                            );
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    }
                })
            })
            .collect();
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        stop.store(true, Ordering::Relaxed);
        for s in scanners {
            s.join().unwrap();
        }
        for r in results {
            r.unwrap();
        }
    }

    fn rustix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn layouts_match_the_kernel_headers() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
