//! Storage from inside a real sandbox (root): the sandbox's seccomp filter refuses every btrfs
//! subvolume, snapshot and quota ioctl by number (on an ext4 disk an unfiltered call would reach
//! the filesystem and fail with ENOTTY, not EPERM) and reflink copies are not refused; and a
//! server on a btrfs pool (`--storage btrfs`) gives each sandbox a limited subvolume. The same
//! filter against a real btrfs volume is `burrow-storage/tests/seccomp.rs`.

mod common;

use burrow_types::CreateSandbox;
use common::*;

const EPERM: i32 = rustix::io::Errno::PERM.raw_os_error();

#[tokio::test(flavor = "multi_thread")]
async fn btrfs_subvolume_and_quota_ioctls_are_eperm_inside_a_sandbox_and_reflinks_are_not() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let id = c.create(&CreateSandbox::default()).await.unwrap().id;
    let numbers: Vec<String> = burrow_linux::btrfs::SANDBOX_DENIED_IOCTLS
        .iter()
        .map(|(nr, name)| format!("({nr:#x}, {name:?})"))
        .collect();
    let code = format!(
        r#"
import errno, fcntl, json, os
out = {{}}
for d in ["/workspace", "/"]:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    for nr, name in [{list}]:
        try:
            fcntl.ioctl(fd, nr, bytearray(4096))
            out[d + " " + name] = 0
        except OSError as e:
            out[d + " " + name] = e.errno
    os.close(fd)
a = os.open("/workspace/a", os.O_RDWR | os.O_CREAT, 0o644)
os.write(a, b"x" * 65536)
b = os.open("/workspace/b", os.O_RDWR | os.O_CREAT, 0o644)
try:
    fcntl.ioctl(b, {ficlone:#x}, a)
    out["FICLONE"] = 0
except OSError as e:
    out["FICLONE"] = e.errno
print(json.dumps(out))
"#,
        list = numbers.join(", "),
        ficlone = burrow_linux::btrfs::FICLONE,
    );
    let r = py(&c, &id, &code).await;
    assert_eq!(r.exit_code, Some(0), "{}", r.stderr);
    let got: std::collections::BTreeMap<String, i32> =
        serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(
        got.len(),
        2 * burrow_linux::btrfs::SANDBOX_DENIED_IOCTLS.len() + 1
    );
    for (call, errno) in &got {
        if call == "FICLONE" {
            // ext4 has no reflinks (EOPNOTSUPP), but the call reaches it.
            assert_ne!(*errno, EPERM, "a reflink copy was refused by the filter");
        } else {
            assert_eq!(*errno, EPERM, "{call} was not refused by the filter");
        }
    }
    c.delete(&id).await.unwrap();
}

/// Unmounts a test's btrfs pool (its loop device detaches with the last mount), also when the
/// test fails half-way: the server stops first, so no sandbox holds it.
struct PoolMount(std::path::PathBuf);

impl Drop for PoolMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A server whose sandboxes live on a btrfs pool image (`--storage btrfs`), with a small plan
/// so the limit is reached quickly. `None` without root or without btrfs simple quotas.
async fn btrfs_server() -> Option<(TestServer, PoolMount, tempfile::NamedTempFile)> {
    if !require_root("a btrfs pool on a loop device") {
        return None;
    }
    if !std::path::Path::new("/sys/fs/btrfs/features/simple_quota").exists() {
        eprintln!("skipped: the kernel has no btrfs simple quotas (Linux 6.7+)");
        return None;
    }
    let plans = tempfile::NamedTempFile::new().unwrap();
    let small = serde_json::json!([{ "name": "small", "limits": {
        "cpu_millis": 1000, "memory_mib": 256, "pids": 256, "disk_mib": 64, "nofile": 1024,
        "output_bytes": 1048576, "max_duration_s": 3600 } }]);
    std::fs::write(plans.path(), small.to_string()).unwrap();
    let srv = TestServer::start_with_env(&[
        ("BURROW_STORAGE", "btrfs"),
        ("BURROW_STORAGE_POOL_SIZE", "1G"),
        ("BURROW_PLANS", plans.path().to_str().unwrap()),
    ])
    .await;
    let pool = PoolMount(srv.data.join("pool"));
    Some((srv, pool, plans))
}

/// Sandboxes on the btrfs pool: their volume is a subvolume (no loop device, no image under the
/// sandbox's directory), the plan's disk size stops writes inside with EDQUOT, mountinfo inside
/// shows no host path, and a hibernated sandbox comes back with its files; destroy leaves
/// nothing of it in the pool.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_btrfs_pool_a_sandbox_is_a_limited_subvolume_that_keeps_its_files() {
    let Some((mut srv, pool, _plans)) = btrfs_server().await else {
        return;
    };
    let c = srv.client();
    let id = c
        .create(&CreateSandbox {
            plan: Some("small".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    assert_eq!(
        std::fs::read_to_string(srv.data.join("storage.kind")).unwrap(),
        "btrfs\n"
    );
    assert!(!srv
        .data
        .join("sandboxes")
        .join(&id)
        .join("disk.img")
        .exists());
    assert!(srv.data.join("pool/volumes").join(&id).is_dir());

    let r = py(
        &c,
        &id,
        "import os\nopen('/workspace/keep', 'w').write('kept')\n\
         f = os.open('/workspace/fill', os.O_WRONLY | os.O_CREAT)\n\
         try:\n  [os.write(f, b'x' * 1048576) for _ in range(200)]; os.fsync(f); print('no limit')\n\
         except OSError as e: print(e.errno)",
    )
    .await;
    // EDQUOT (122) at the volume's own limit; ENOSPC (28) only if the pool itself filled.
    let stopped = r.stdout.trim();
    assert!(
        stopped == "122" || stopped == "28",
        "200 MiB into a 64 MiB volume: {r:?}"
    );
    let seen = py(&c, &id, "print(open('/proc/self/mountinfo').read())").await;
    for needle in ["/sandboxes/", srv.data.to_str().unwrap(), "burrow-test-"] {
        assert!(
            !seen.stdout.contains(needle),
            "{needle} is visible inside:\n{}",
            seen.stdout
        );
    }

    c.hibernate(&id).await.unwrap();
    c.resume(&id).await.unwrap();
    let back = py(&c, &id, "print(open('/workspace/keep').read())").await;
    assert_eq!(back.stdout.trim(), "kept", "{back:?}");

    c.delete(&id).await.unwrap();
    assert!(
        eventually(10, || !srv.data.join("pool/volumes").join(&id).exists()).await,
        "the volume is still in the pool"
    );
    srv.kill9();
    drop(pool);
}
