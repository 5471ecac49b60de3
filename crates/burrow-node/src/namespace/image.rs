//! The built-in `system` image: a small generated root (`/etc`, empty mount points, the merged-`/usr`
//! symlinks) that every sandbox overlays, with the host's `/usr` bound read-only on top. Nothing is
//! downloaded; the host's harmless `/etc` files are copied once, secrets never.
//!
//! Files are owned as they should be seen inside a sandbox (root, and `user` for `/home/user`):
//! every sandbox mounts the image idmapped to its own user namespace, so nothing is chowned per
//! sandbox. The image's directory is private to host root (0700), since host uid 1000 owns
//! `home/user` on disk.

use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// Bump when the generated content changes: each version is built in a directory of its own, so
/// sandboxes still running on an older one keep their lower layer.
const VERSION: &str = "2";

/// Entries of the host's `/etc` that programs need and that hold no secrets.
const HOST_ETC: &[&str] = &[
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "profile",
    "profile.d",
    "bash.bashrc",
    "skel",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "inputrc",
    "mime.types",
    "protocols",
    "services",
    "python3",
    "python3.11",
    "perl",
    "environment",
    "login.defs",
    "shells",
    "gai.conf",
    "host.conf",
    "networks",
    "ethertypes",
    "terminfo",
    "magic",
    "magic.mime",
    "vim",
    "nanorc",
    "mailcap",
    "bindresvport.blacklist",
    "locale.alias",
    "locale.gen",
    "default",
];

const DIRS: &[(&str, u32)] = &[
    ("usr", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("run/burrow", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("var/lib", 0o755),
    ("var/cache", 0o755),
    ("var/log", 0o755),
    ("root", 0o700),
    ("home", 0o755),
    ("home/user", 0o755),
    ("workspace", 0o755),
    ("opt", 0o755),
    ("srv", 0o755),
    ("mnt", 0o755),
    ("media", 0o755),
    ("etc", 0o755),
];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
user:x:1000:1000:user:/home/user:/bin/bash\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";

const GROUP: &str = "root:x:0:\ntty:x:5:\nusers:x:100:user\nuser:x:1000:\nnogroup:x:65534:\n";

/// Users and their home directories inside every sandbox: (uid, home).
pub const USER_UID: u32 = 1000;

/// Returns the image's root directory, building it on first use.
pub fn ensure_system_image(data_dir: &Path) -> io::Result<PathBuf> {
    let base = data_dir.join("images").join("system");
    let root = base.join(format!("root.v{VERSION}"));
    std::fs::create_dir_all(&base)?;
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700))?;
    if root.is_dir() {
        return Ok(root);
    }
    let tmp = base.join(format!("root.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    build(&tmp)?;
    std::fs::rename(&tmp, &root)?;
    Ok(root)
}

fn build(root: &Path) -> io::Result<()> {
    for (dir, mode) in DIRS {
        let p = root.join(dir);
        std::fs::create_dir_all(&p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    // Merged /usr, as on Debian 12: follow whatever the host has.
    for link in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        if let Ok(target) = std::fs::read_link(Path::new("/").join(link)) {
            symlink(target, root.join(link))?;
        }
    }
    // Only root can give a file away (the server runs as root; unit tests may not).
    match std::os::unix::fs::chown(root.join("home/user"), Some(USER_UID), Some(USER_UID)) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
        r => r?,
    }
    let etc = root.join("etc");
    std::fs::write(etc.join("passwd"), PASSWD)?;
    std::fs::write(etc.join("group"), GROUP)?;
    std::fs::write(etc.join("hostname"), "sandbox\n")?;
    std::fs::write(etc.join("hosts"), crate::backend::etc_hosts("sandbox"))?;
    // Only loopback exists until the networking issue gives sandboxes a route out.
    std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
    std::fs::write(etc.join("nsswitch.conf"), "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n")?;
    for name in HOST_ETC {
        let src = Path::new("/etc").join(name);
        if src.symlink_metadata().is_ok() {
            copy_tree(&src, &etc.join(name))?;
        }
    }
    Ok(())
}

/// Copies files, directories and symlinks (as links), keeping permission bits.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = src.symlink_metadata()?;
    if meta.file_type().is_symlink() {
        symlink(std::fs::read_link(src)?, dst)
    } else if meta.is_dir() {
        std::fs::create_dir_all(dst)?;
        std::fs::set_permissions(dst, meta.permissions())?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        Ok(())
    } else if meta.is_file() {
        std::fs::copy(src, dst).map(|_| ())
    } else {
        // Sockets, FIFOs and devices have no place in an image.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn rustix_is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn image_has_users_mount_points_and_no_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let root = ensure_system_image(dir.path()).unwrap();
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(passwd.contains("root:x:0:0") && passwd.contains("user:x:1000:1000"));
        for p in [
            "proc",
            "sys",
            "dev",
            "tmp",
            "workspace",
            "usr",
            "home/user",
            "run/burrow",
        ] {
            assert!(root.join(p).symlink_metadata().is_ok(), "{p} missing");
        }
        for secret in ["shadow", "gshadow", "ssh", "machine-id", "sudoers"] {
            assert!(
                root.join("etc").join(secret).symlink_metadata().is_err(),
                "{secret} copied"
            );
        }
        if rustix_is_root() {
            let md = std::fs::metadata(root.join("home/user")).unwrap();
            assert_eq!((md.uid(), md.gid()), (USER_UID, USER_UID));
            assert_eq!(std::fs::metadata(root.join("etc")).unwrap().uid(), 0);
        }
        // A second call reuses the image.
        std::fs::write(root.join("marker"), b"").unwrap();
        let again = ensure_system_image(dir.path()).unwrap();
        assert!(again.join("marker").exists());
    }
}
