//! The sandbox's seccomp filter against the btrfs hole (attack R1 on a btrfs pool): an
//! unprivileged uid that may write to its volume can make a subvolume inside it, whose fresh
//! qgroup has no limit, and write past the volume's limit there. A child process (this test
//! binary, running the ignored `helper_try_btrfs_ioctls`) attaches a volume in a private mount
//! namespace as `burrow __init` would, becomes the sandbox's uid (all capabilities gone), installs
//! the real filter or not, and tries the ioctls. Until sandboxes run on the pool (the node's
//! wiring), this is the filter's test on btrfs; `burrow-cli/tests/storage.rs` checks the same
//! filter inside a real sandbox. Root only.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use burrow_storage::{Kind, Volume};
use common::*;

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[test]
#[ignore = "run by a_sandbox_uid_cannot_make_a_subvolume_or_touch_quotas_under_the_filter"]
fn helper_try_btrfs_ioctls() {
    let Ok(vol) = std::env::var("BURROW_STORAGE_IOCTL_VOLUME") else {
        return;
    };
    let vol: Volume = serde_json::from_str(&vol).unwrap();
    let mnt = PathBuf::from(std::env::var("BURROW_STORAGE_IOCTL_MNT").unwrap());
    let uid: u32 = std::env::var("BURROW_STORAGE_IOCTL_UID")
        .unwrap()
        .parse()
        .unwrap();
    let filter = std::env::var("BURROW_STORAGE_IOCTL_FILTER").as_deref() == Ok("1");
    let tag = std::env::var("BURROW_STORAGE_IOCTL_TAG").unwrap();
    let out = in_private_ns(move || {
        let a = attach(&vol, &mnt);
        // Each uid in the directory it owns: `workspace` is the user's, `upper` the root's.
        let ws = if uid == OWNERS.user {
            a.workspace()
        } else {
            a.upper()
        };
        // The whole process becomes the sandbox's uid (glibc changes every thread), with no
        // capabilities left, as a sandbox's user is.
        let (u, g) = (
            nix::unistd::Uid::from_raw(uid),
            nix::unistd::Gid::from_raw(uid),
        );
        nix::unistd::setgroups(&[]).unwrap();
        nix::unistd::setresgid(g, g, g).unwrap();
        nix::unistd::setresuid(u, u, u).unwrap();
        if filter {
            burrow_linux::caps::no_new_privs().unwrap();
            burrow_linux::seccomp::install().unwrap();
        }
        let mut r = BTreeMap::new();
        let wsfd = std::fs::File::open(&ws).unwrap();
        let nested = format!("nested-{tag}");
        r.insert(
            "subvol_create",
            errno_of(burrow_linux::btrfs::subvol_create(&wsfd, &nested, None)),
        );
        if r["subvol_create"] == 0 {
            let (n, _) = fill(&ws.join(&nested).join("f"), 48 * MIB);
            r.insert("written_in_nested_mib", (n / MIB) as i32);
        }
        // A snapshot of a subvolume this uid owns (made by an unfiltered run before).
        if let Ok(own) = std::fs::File::open(ws.join("nested-open")) {
            r.insert(
                "snapshot",
                errno_of(burrow_linux::btrfs::snapshot(
                    &own,
                    &wsfd,
                    &format!("snap-{tag}"),
                    false,
                    None,
                )),
            );
        }
        r.insert(
            "quota_ctl",
            errno_of(burrow_linux::btrfs::enable_simple_quotas(&wsfd)),
        );
        r.insert(
            "qgroup_limit",
            errno_of(burrow_linux::btrfs::set_limit(&wsfd, 5, None)),
        );
        write(&ws.join(format!("a-{tag}")), &vec![1u8; 256 * 1024]);
        let src = std::fs::File::open(ws.join(format!("a-{tag}"))).unwrap();
        let dst = std::fs::File::create(ws.join(format!("b-{tag}"))).unwrap();
        r.insert(
            "reflink",
            errno_of(burrow_linux::btrfs::reflink(&src, &dst)),
        );
        r
    });
    println!("result {}", serde_json::to_string(&out).unwrap());
    std::io::stdout().flush().unwrap();
}

fn try_ioctls(
    vol: &Volume,
    dir: &TestDir,
    uid: u32,
    filter: bool,
    tag: &str,
) -> BTreeMap<String, i32> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_try_btrfs_ioctls",
            "--ignored",
            "--nocapture",
        ])
        .env(
            "BURROW_STORAGE_IOCTL_VOLUME",
            serde_json::to_string(vol).unwrap(),
        )
        .env(
            "BURROW_STORAGE_IOCTL_MNT",
            dir.path.join(format!("mnt-{tag}")),
        )
        .env("BURROW_STORAGE_IOCTL_UID", uid.to_string())
        .env(
            "BURROW_STORAGE_IOCTL_FILTER",
            if filter { "1" } else { "0" },
        )
        .env("BURROW_STORAGE_IOCTL_TAG", tag)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .unwrap_or_else(|| {
            panic!(
                "{tag}: no result: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

#[test]
fn a_sandbox_uid_cannot_make_a_subvolume_or_touch_quotas_under_the_filter() {
    if !require_root("the btrfs seccomp rules") || !require_btrfs("the btrfs seccomp rules") {
        return;
    }
    let dir = TestDir::new("seccomp");
    let s = storage(Kind::Btrfs, &dir);
    let vol = s.create("sbx", 32 * MIB).unwrap();
    let (eperm, edquot) = (libc::EPERM, libc::EDQUOT);

    // Without the filter: the hole. The sandbox's user makes a subvolume and writes 48 MiB into
    // it from a volume limited to 32 MiB; reflinks work.
    let open = try_ioctls(&vol, &dir, OWNERS.user, false, "open");
    assert_eq!(open["subvol_create"], 0, "{open:?}");
    assert_eq!(open["written_in_nested_mib"], 48, "{open:?}");
    assert_eq!(open["reflink"], 0, "{open:?}");

    // With the filter: every subvolume and quota ioctl is EPERM, reflinks still work.
    let user = try_ioctls(&vol, &dir, OWNERS.user, true, "user");
    assert_eq!(user["subvol_create"], eperm, "{user:?}");
    assert_eq!(user["snapshot"], eperm, "{user:?}");
    assert_eq!(user["quota_ctl"], eperm, "{user:?}");
    assert_eq!(user["qgroup_limit"], eperm, "{user:?}");
    assert_eq!(user["reflink"], 0, "{user:?}");
    assert!(!user.contains_key("written_in_nested_mib"), "{user:?}");
    // The same for the sandbox's root (the filter does not depend on capabilities).
    let root = try_ioctls(&vol, &dir, OWNERS.root, true, "root");
    assert_eq!(root["subvol_create"], eperm, "{root:?}");
    assert_eq!(root["quota_ctl"], eperm, "{root:?}");
    // And the volume's own limit still holds for the filtered user.
    let mnt = dir.path.clone();
    let v2 = vol.clone();
    let (n, e) = in_private_ns(move || {
        let a = attach(&v2, &mnt);
        as_uid(OWNERS.user);
        fill(&a.workspace().join("big"), 64 * MIB)
    });
    assert_eq!(e, Some(edquot), "after {n} bytes");
    // The nested subvolume the unfiltered run made goes with the volume.
    s.destroy("sbx").unwrap();
    s.purge().unwrap();
    assert_eq!(s.list().unwrap().pending_deletes, 0);
}
