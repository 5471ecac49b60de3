//! Storage from inside a real sandbox (root). Sandboxes do not run on the btrfs pool yet (the
//! node's wiring comes after the node split); until then this checks that the sandbox's seccomp
//! filter refuses every btrfs subvolume, snapshot and quota ioctl by number inside a real
//! sandbox (on its ext4 disk an unfiltered call would reach the filesystem and fail with ENOTTY,
//! not EPERM), and that reflink copies are not refused. The same filter against a real btrfs
//! volume is `burrow-storage/tests/seccomp.rs`.

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
