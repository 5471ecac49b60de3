//! Volumes, snapshots and clones on the real kernel, for both implementations: limits hold
//! (directly, through an overlay upper, for a clone), snapshots and clones are independent,
//! deleting a snapshot leaves its clones intact, usage and space figures follow writes, a full
//! pool is ENOSPC for everyone, destroy follows no link, and the pool survives a restart.
//! Root only; each test skips with the reason otherwise.

mod common;

use burrow_storage::{Kind, PoolMode, Storage, StorageError};
use common::*;

/// Writes as the sandbox's user into a volume's workspace until the limit stops it.
#[test]
fn writes_stop_at_the_limit_with_edquot_or_enospc_directly_and_through_an_overlay() {
    if !require_root("volume limits") {
        return;
    }
    for kind in kinds("btrfs volume limits") {
        let dir = TestDir::new("limit");
        let s = storage(kind, &dir);
        let limit = 64 * MIB;
        let vol = s.create("full", limit).unwrap();
        assert_eq!(vol.limit_bytes, limit);
        let mnt = dir.path.clone();
        let lower = dir.path.join("lower");
        std::fs::create_dir_all(&lower).unwrap();
        // A lower file bigger than the limit: its copy-up must fail at open.
        let (n, e) = fill(&lower.join("big"), 80 * MIB);
        assert_eq!((n, e), (80 * MIB, None));
        std::fs::set_permissions(
            lower.join("big"),
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .unwrap();
        let (direct, via_overlay, copy_up) = in_private_ns(move || {
            let a = attach(&vol, &mnt);
            let merged = mnt.join("merged");
            overlay(&lower, &a, &merged);
            // The workspace as its user, then the root through the overlay as the sandbox's root.
            as_uid(OWNERS.user);
            let direct = fill(&a.workspace().join("fill"), 200 * MIB);
            let _ = std::fs::remove_file(a.workspace().join("fill"));
            syncfs(&a.workspace());
            as_uid(OWNERS.root);
            // Space given back by the delete may take a commit or two to show.
            let mut via_overlay = (0, None);
            for _ in 0..20 {
                via_overlay = fill(&merged.join("fill"), 200 * MIB);
                if via_overlay.0 > 32 * MIB {
                    break;
                }
                let _ = std::fs::remove_file(merged.join("fill"));
                syncfs(&merged);
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            let copy_up = std::fs::OpenOptions::new()
                .write(true)
                .open(merged.join("big"))
                .err()
                .and_then(|e| e.raw_os_error());
            (direct, via_overlay, copy_up)
        });
        let want = limit_errno(kind);
        for (what, (written, errno)) in [("workspace", direct), ("overlay", via_overlay)] {
            assert_eq!(
                errno,
                Some(want),
                "{kind:?} {what}: stopped by {errno:?} after {written}"
            );
            assert!(
                written <= limit,
                "{kind:?} {what}: wrote {written} past {limit}"
            );
            // ext4 keeps some of the image for its own metadata and journal.
            assert!(
                written >= limit * 3 / 4,
                "{kind:?} {what}: only {written} of {limit} writable"
            );
        }
        assert_eq!(
            copy_up,
            Some(want),
            "{kind:?}: copy-up of a file past the limit"
        );
        // Another volume on the same storage is not affected.
        let other = s.create("other", 32 * MIB).unwrap();
        let mnt = dir.path.clone();
        let (n, e) = in_private_ns(move || {
            let a = attach(&other, &mnt);
            fill(&a.workspace().join("f"), 8 * MIB)
        });
        assert_eq!((n, e), (8 * MIB, None), "{kind:?}: the neighbour");
    }
}

#[test]
fn a_clone_has_its_own_limit_and_a_clone_below_an_ext4_snapshot_is_refused() {
    if !require_root("clone limits") {
        return;
    }
    for kind in kinds("btrfs clone limits") {
        let dir = TestDir::new("clonelimit");
        let s = storage(kind, &dir);
        let vol = s.create("src", 64 * MIB).unwrap();
        let mnt = dir.path.clone();
        in_private_ns(move || {
            let a = attach(&vol, &mnt);
            assert_eq!(fill(&a.workspace().join("data"), 8 * MIB), (8 * MIB, None));
        });
        s.snapshot("src", "snap").unwrap();
        // btrfs: a clone is charged for what it writes, so 32 MiB of new data. ext4: the clone is
        // a whole disk, which cannot be smaller than the snapshot's.
        let clone_limit = match kind {
            Kind::Btrfs => 32 * MIB,
            Kind::Ext4 => {
                match s.clone_snapshot("snap", "small", 32 * MIB) {
                    Err(e @ StorageError::LimitTooSmall { .. }) => {
                        assert_eq!(e.code(), "limit_too_small")
                    }
                    other => panic!("a clone smaller than its snapshot: {other:?}"),
                }
                96 * MIB
            }
        };
        let clone = s.clone_snapshot("snap", "clone", clone_limit).unwrap();
        assert_eq!(clone.limit_bytes, clone_limit);
        assert_eq!(s.usage("clone").unwrap().limit_bytes, clone_limit);
        let mnt = dir.path.clone();
        let (written, errno, kept) = in_private_ns(move || {
            let a = attach(&clone, &mnt);
            as_uid(OWNERS.user);
            let (w, e) = fill(&a.workspace().join("more"), 300 * MIB);
            let kept = std::fs::metadata(a.workspace().join("data"))
                .map(|m| m.len())
                .ok();
            (w, e, kept)
        });
        assert_eq!(errno, Some(limit_errno(kind)), "{kind:?}: after {written}");
        assert_eq!(kept, Some(8 * MIB), "{kind:?}: the cloned data");
        match kind {
            Kind::Btrfs => assert!(
                (24 * MIB..=32 * MIB).contains(&written),
                "btrfs clone wrote {written} new bytes under a 32 MiB limit"
            ),
            // The grown disk holds the snapshot's 8 MiB and the rest up to ~96 MiB.
            Kind::Ext4 => assert!(
                (64 * MIB..=88 * MIB).contains(&written),
                "ext4 clone wrote {written} bytes on a 96 MiB disk holding 8 MiB"
            ),
        }
    }
}

#[test]
fn snapshots_and_clones_are_independent_and_keep_buffered_writes() {
    if !require_root("snapshot independence") {
        return;
    }
    for kind in kinds("btrfs snapshots") {
        let dir = TestDir::new("indep");
        let s = storage(kind, &dir);
        let vol = s.create("a", 64 * MIB).unwrap();
        let mnt = dir.path.clone();
        let s: std::sync::Arc<dyn Storage> = std::sync::Arc::from(s);
        let s2 = s.clone();
        // Written without fsync, snapshotted while attached (the node freezes the sandbox; here
        // nothing else writes): the snapshot must hold the buffered bytes.
        in_private_ns(move || {
            let a = attach(&vol, &mnt);
            write(&a.workspace().join("f"), b"one");
            write(&a.upper().join("etc-file"), b"root layer");
            s2.snapshot("a", "s1").unwrap();
            write(&a.workspace().join("f"), b"a changed");
        });
        let b = s.clone_snapshot("s1", "b", 64 * MIB).unwrap();
        let c = s.clone_snapshot("s1", "c", 64 * MIB).unwrap();
        let a = s.open("a").unwrap();
        let mnt = dir.path.clone();
        let s3 = s.clone();
        let seen = in_private_ns(move || {
            let (aa, ba, ca) = (attach(&a, &mnt), attach(&b, &mnt), attach(&c, &mnt));
            write(&ba.workspace().join("f"), b"b changed");
            std::fs::remove_file(ca.workspace().join("f")).unwrap();
            write(&ca.workspace().join("only-c"), b"c");
            // A second clone of the same snapshot sees none of it.
            let d = s3.clone_snapshot("s1", "d", 64 * MIB).unwrap();
            let da = attach(&d, &mnt);
            let r = |a: &burrow_storage::Attached, f: &str| read(&a.workspace().join(f));
            (
                [r(&aa, "f"), r(&ba, "f"), r(&ca, "f"), r(&da, "f")],
                [r(&aa, "only-c"), r(&ba, "only-c"), r(&da, "only-c")],
                read(&da.upper().join("etc-file")),
            )
        });
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            seen.0,
            [some("a changed"), some("b changed"), None, some("one")],
            "{kind:?}"
        );
        assert_eq!(seen.1, [None, None, None], "{kind:?}");
        assert_eq!(seen.2, some("root layer"), "{kind:?}: the upper layer");
        let inv = s.list().unwrap();
        assert_eq!(inv.volumes, ["a", "b", "c", "d"], "{kind:?}");
        assert_eq!(inv.snapshots, ["s1"], "{kind:?}");
        match s.snapshot("a", "s1") {
            Err(e @ StorageError::SnapshotExists(_)) => assert_eq!(e.code(), "snapshot_exists"),
            other => panic!("{kind:?}: a second snapshot of the same name: {other:?}"),
        }
        match s.clone_snapshot("s1", "a", 64 * MIB) {
            Err(e @ StorageError::VolumeExists(_)) => assert_eq!(e.code(), "volume_exists"),
            other => panic!("{kind:?}: a clone over a volume: {other:?}"),
        }
        match s.clone_snapshot("nope", "e", 64 * MIB) {
            Err(e) => assert_eq!(e.code(), "snapshot_not_found"),
            other => panic!("{kind:?}: {other:?}"),
        }
    }
}

#[test]
fn deleting_a_snapshot_and_its_source_leaves_clones_intact() {
    if !require_root("snapshot deletion") {
        return;
    }
    for kind in kinds("btrfs snapshot deletion") {
        let dir = TestDir::new("delsnap");
        let s = storage(kind, &dir);
        let vol = s.create("src", 128 * MIB).unwrap();
        let mnt = dir.path.clone();
        let body: Vec<u8> = (0..20 * MIB as usize)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let b2 = body.clone();
        in_private_ns(move || {
            let a = attach(&vol, &mnt);
            write(&a.workspace().join("data"), &b2);
        });
        s.snapshot("src", "snap").unwrap();
        let clone = s.clone_snapshot("snap", "clone", 128 * MIB).unwrap();
        s.delete_snapshot("snap").unwrap();
        s.destroy("src").unwrap();
        s.purge().unwrap();
        // Twice is fine.
        s.delete_snapshot("snap").unwrap();
        s.destroy("src").unwrap();
        let inv = s.list().unwrap();
        assert_eq!(inv.volumes, ["clone"], "{kind:?}");
        assert!(inv.snapshots.is_empty(), "{kind:?}");
        assert_eq!(inv.pending_deletes, 0, "{kind:?}");
        let mnt = dir.path.clone();
        let (got, more) = in_private_ns(move || {
            let a = attach(&clone, &mnt);
            let got = std::fs::read(a.workspace().join("data")).unwrap();
            (got, fill(&a.workspace().join("more"), 16 * MIB))
        });
        assert!(got == body, "{kind:?}: the clone's data changed");
        assert_eq!(more, (16 * MIB, None), "{kind:?}: the clone is writable");
        match s.open("src") {
            Err(e) => assert_eq!(e.code(), "volume_not_found"),
            Ok(v) => panic!("{kind:?}: destroyed volume opens: {v:?}"),
        }
    }
}

#[test]
fn usage_follows_what_a_volume_writes_and_deletes() {
    if !require_root("usage figures") {
        return;
    }
    for kind in kinds("btrfs usage") {
        let dir = TestDir::new("usage");
        let s: std::sync::Arc<dyn Storage> = std::sync::Arc::from(storage(kind, &dir));
        let vol = s.create("u", 128 * MIB).unwrap();
        let before = s.usage("u").unwrap();
        assert_eq!(before.limit_bytes, 128 * MIB, "{kind:?}");
        let mnt = dir.path.clone();
        let s2 = s.clone();
        let (after_write, after_delete, df_total) = in_private_ns(move || {
            let a = attach(&vol, &mnt);
            // What `df` inside would show: the pool (btrfs), the disk (ext4).
            let st = rustix::fs::statvfs(a.workspace()).unwrap();
            let df_total = st.f_blocks * st.f_frsize;
            assert_eq!(fill(&a.workspace().join("f"), 40 * MIB), (40 * MIB, None));
            syncfs(&a.workspace());
            let w = s2.usage("u").unwrap().used_bytes;
            std::fs::remove_file(a.workspace().join("f")).unwrap();
            // Freed space is counted at a later commit (btrfs) or discard (ext4).
            let mut d = w;
            eventually(20, || {
                syncfs(&a.workspace());
                d = s2.usage("u").unwrap().used_bytes;
                d + 30 * MIB <= w
            });
            (w, d, df_total)
        });
        match kind {
            Kind::Btrfs => assert!(
                df_total > POOL_SIZE * 9 / 10,
                "df inside shows {df_total}, not the pool"
            ),
            Kind::Ext4 => assert!(
                (100 * MIB..=128 * MIB).contains(&df_total),
                "df inside shows {df_total}, not the 128 MiB disk"
            ),
        }
        let grew = after_write.saturating_sub(before.used_bytes);
        assert!(
            (40 * MIB..=44 * MIB).contains(&grew),
            "{kind:?}: 40 MiB written, usage grew by {grew}"
        );
        assert!(
            after_delete + 30 * MIB <= after_write,
            "{kind:?}: 40 MiB deleted, usage {after_write} -> {after_delete}"
        );
        match s.usage("missing") {
            Err(e) => assert_eq!(e.code(), "volume_not_found"),
            Ok(u) => panic!("{u:?}"),
        }
    }
}

#[test]
fn a_full_pool_is_enospc_for_a_volume_under_its_limit_and_space_says_so() {
    if !require_root("a full pool") || !require_btrfs("a full pool") {
        return;
    }
    let dir = TestDir::new("fullpool");
    let s = storage(Kind::Btrfs, &dir);
    let space = s.space().unwrap();
    assert_eq!(space.path, dir.data().canonicalize().unwrap().join("pool"));
    assert!(
        (POOL_SIZE * 9 / 10..=POOL_SIZE).contains(&space.total_bytes),
        "pool of {} bytes, total {}",
        POOL_SIZE,
        space.total_bytes
    );
    assert!(space.writable_bytes() <= space.free_bytes);
    assert!(space.unallocated_bytes.is_some() && space.metadata_free_bytes.is_some());
    // Two volumes each allowed 800 MiB in a 1 GiB pool: the second runs out of pool first.
    let a = s.create("a", 800 * MIB).unwrap();
    let b = s.create("b", 800 * MIB).unwrap();
    let mnt = dir.path.clone();
    let (ra, rb) = in_private_ns(move || {
        let (aa, ba) = (attach(&a, &mnt), attach(&b, &mnt));
        as_uid(OWNERS.user);
        (
            fill(&aa.workspace().join("f"), 600 * MIB),
            fill(&ba.workspace().join("f"), 800 * MIB),
        )
    });
    assert_eq!(ra, (600 * MIB, None));
    assert_eq!(rb.1, Some(libc::ENOSPC), "b stopped after {} bytes", rb.0);
    assert!(rb.0 < 500 * MIB, "b wrote {} bytes in a full pool", rb.0);
    let full = s.space().unwrap();
    assert!(
        full.writable_bytes() < 64 * MIB,
        "a full pool reports {full:?}"
    );
}

#[test]
fn destroy_follows_no_link_and_deletes_nested_subvolumes() {
    if !require_root("destroy") {
        return;
    }
    for kind in kinds("btrfs destroy") {
        let dir = TestDir::new("destroy");
        let s = storage(kind, &dir);
        let sentinel_dir = dir.path.join("host");
        std::fs::create_dir_all(sentinel_dir.join("sub")).unwrap();
        write(&sentinel_dir.join("secret"), b"host file");
        write(&sentinel_dir.join("sub/inner"), b"host inner");
        let vol = s.create("evil", 64 * MIB).unwrap();
        let mnt = dir.path.clone();
        let sd = sentinel_dir.clone();
        in_private_ns(move || {
            let a = attach(&vol, &mnt);
            let ws = a.workspace();
            std::os::unix::fs::symlink(sd.join("secret"), ws.join("link")).unwrap();
            std::os::unix::fs::symlink(&sd, ws.join("dirlink")).unwrap();
            std::os::unix::fs::symlink(&sd, a.upper().join("etc")).unwrap();
            if kind == Kind::Btrfs {
                // A subvolume inside the volume (what seccomp now refuses a sandbox), with one
                // inside it: destroy must delete them by id, not walk into them.
                let wsfd = std::fs::File::open(&ws).unwrap();
                burrow_linux::btrfs::subvol_create(&wsfd, "nested", None).unwrap();
                let n = std::fs::File::open(ws.join("nested")).unwrap();
                burrow_linux::btrfs::subvol_create(&n, "deeper", None).unwrap();
                write(&ws.join("nested/deeper/x"), b"x");
                std::os::unix::fs::symlink(&sd, ws.join("nested/deeper/back")).unwrap();
            }
        });
        s.destroy("evil").unwrap();
        assert!(s.list().unwrap().volumes.is_empty(), "{kind:?}");
        // The background thread may have finished first.
        s.purge().unwrap();
        let inv = s.list().unwrap();
        assert_eq!(inv.pending_deletes, 0, "{kind:?}: {inv:?}");
        assert_eq!(
            read(&sentinel_dir.join("secret")).as_deref(),
            Some("host file")
        );
        assert_eq!(
            read(&sentinel_dir.join("sub/inner")).as_deref(),
            Some("host inner")
        );
        if kind == Kind::Btrfs {
            let pool = dir.data().join("pool");
            let root = std::fs::File::open(&pool).unwrap();
            assert!(
                burrow_linux::btrfs::child_subvols(&root, 5)
                    .unwrap()
                    .is_empty(),
                "subvolumes left in the pool"
            );
        }
        // The name is free again.
        s.create("evil", 64 * MIB).unwrap();
    }
}

#[test]
fn the_btrfs_pool_survives_a_restart_and_a_remount() {
    if !require_root("pool restarts") || !require_btrfs("pool restarts") {
        return;
    }
    let dir = TestDir::new("restart");
    let first = burrow_storage::BtrfsPool::new(burrow_storage::BtrfsConfig {
        data_dir: dir.data(),
        image_size: Some(POOL_SIZE),
        background_purge: false,
    });
    assert_eq!(first.prepare().unwrap(), Default::default());
    assert_eq!(first.mode(), Some(PoolMode::Image));
    // One loop device, with direct I/O (the pool's pages are not cached twice).
    let loops = loops_under(&dir.path);
    assert_eq!(loops.len(), 1, "{loops:?}");
    let dio = std::fs::read_to_string(format!("/sys/block/{}/loop/dio", loops[0])).unwrap();
    assert_eq!(dio.trim(), "1");
    // Preallocated, not sparse.
    let img = std::fs::metadata(dir.data().join("pool.img")).unwrap();
    assert!(std::os::unix::fs::MetadataExt::blocks(&img) * 512 >= POOL_SIZE);
    let vol = first.create("keep", 64 * MIB).unwrap();
    let mnt = dir.path.clone();
    in_private_ns(move || {
        let a = attach(&vol, &mnt);
        write(&a.workspace().join("f"), b"kept");
    });
    first.snapshot("keep", "snap").unwrap();
    // A restarted server: the pool is still mounted.
    drop(first);
    let second = unprepared(Kind::Btrfs, &dir.data(), false);
    second.prepare().unwrap();
    assert_eq!(second.list().unwrap().volumes, ["keep"]);
    // A host reboot: nothing mounted, the image is mounted again.
    drop(second);
    nix::mount::umount2(&dir.data().join("pool"), nix::mount::MntFlags::empty()).unwrap();
    assert!(eventually(10, || loops_under(&dir.path).is_empty()));
    let third = burrow_storage::BtrfsPool::new(burrow_storage::BtrfsConfig {
        data_dir: dir.data(),
        image_size: Some(POOL_SIZE),
        background_purge: false,
    });
    third.prepare().unwrap();
    assert_eq!(third.mode(), Some(PoolMode::Image));
    let inv = third.list().unwrap();
    assert_eq!(
        (inv.volumes.as_slice(), inv.snapshots.as_slice()),
        (&["keep".to_string()][..], &["snap".to_string()][..])
    );
    let vol = third.open("keep").unwrap();
    assert_eq!(vol.limit_bytes, 64 * MIB);
    let mnt = dir.path.clone();
    let got = in_private_ns(move || read(&attach(&vol, &mnt).workspace().join("f")));
    assert_eq!(got.as_deref(), Some("kept"));
    third.unmount().unwrap();
    assert!(
        eventually(10, || loops_under(&dir.path).is_empty()),
        "loop devices left"
    );
}

#[test]
fn a_data_directory_on_btrfs_with_simple_quotas_gets_a_pool_subvolume() {
    if !require_root("pool modes") || !require_btrfs("pool modes") {
        return;
    }
    let dir = TestDir::new("subvolmode");
    let outer = storage(Kind::Btrfs, &dir);
    // A data directory inside the first pool: on btrfs, with simple quotas.
    let data2 = dir.data().join("pool").join("data2");
    let inner = burrow_storage::BtrfsPool::new(burrow_storage::BtrfsConfig {
        data_dir: data2.clone(),
        image_size: None,
        background_purge: false,
    });
    inner.prepare().unwrap();
    assert_eq!(inner.mode(), Some(PoolMode::Subvolume));
    assert!(
        !data2.join("pool.img").exists(),
        "no image on a btrfs data directory"
    );
    let vol = inner.create("v", 32 * MIB).unwrap();
    let mnt = dir.path.clone();
    let (n, e) = in_private_ns(move || fill(&attach(&vol, &mnt).workspace().join("f"), 64 * MIB));
    assert_eq!(e, Some(libc::EDQUOT), "after {n}");
    drop(inner);
    drop(outer);
}

#[test]
fn select_prefers_btrfs_where_the_kernel_has_simple_quotas() {
    let tmp = tempfile::tempdir().unwrap();
    let auto = burrow_storage::select(tmp.path(), burrow_storage::Choice::Auto, None).unwrap();
    match burrow_storage::btrfs_unsupported() {
        None => assert_eq!(auto.kind(), Kind::Btrfs),
        Some(_) => assert_eq!(auto.kind(), Kind::Ext4),
    }
    let ext4 =
        burrow_storage::select(tmp.path(), burrow_storage::Choice::Only(Kind::Ext4), None).unwrap();
    assert_eq!(ext4.kind(), Kind::Ext4);
    assert_eq!(ext4.costs().snapshot, burrow_storage::Cost::Data);
    // Nothing was touched before prepare.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn a_full_volume_attaches_again_with_new_owners_and_is_destroyed() {
    if !require_root("full volumes") {
        return;
    }
    for kind in kinds("full btrfs volumes") {
        let dir = TestDir::new("fullvol");
        let s = storage(kind, &dir);
        let vol = s.create("full", 32 * MIB).unwrap();
        let mnt = dir.path.join("m1");
        let v = vol.clone();
        let (_, e) = in_private_ns(move || {
            let a = attach(&v, &mnt);
            as_uid(OWNERS.user);
            fill(&a.workspace().join("f"), 64 * MIB)
        });
        assert_eq!(e, Some(limit_errno(kind)), "{kind:?}");
        // A cold resume: the same owners, then another uid range (a sandbox given a new slot).
        for (n, owners) in [
            (2, OWNERS),
            (
                3,
                burrow_storage::Owners {
                    root: OWNERS.root + 65536,
                    user: OWNERS.user + 65536,
                },
            ),
        ] {
            let mnt = dir.path.join(format!("m{n}"));
            std::fs::create_dir_all(&mnt).unwrap();
            let v = vol.clone();
            let r = in_private_ns(move || {
                let a = v.attach(&mnt, owners)?;
                let md = std::fs::metadata(a.workspace()).unwrap();
                Ok::<_, StorageError>(std::os::unix::fs::MetadataExt::uid(&md))
            });
            assert_eq!(
                r.unwrap(),
                owners.user,
                "{kind:?}: attach {n} of a full volume"
            );
        }
        s.destroy("full").unwrap();
        s.purge().unwrap();
        assert_eq!(s.list().unwrap().pending_deletes, 0, "{kind:?}");
    }
}

#[test]
fn an_ext4_disk_still_attached_is_busy_not_mounted_twice() {
    if !require_root("ext4 attach") {
        return;
    }
    let dir = TestDir::new("busy");
    let s = storage(Kind::Ext4, &dir);
    let vol = s.create("twice", 32 * MIB).unwrap();
    let (v1, v2) = (vol.clone(), vol.clone());
    let (m1, m2) = (dir.path.join("m1"), dir.path.join("m2"));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        in_private_ns(move || {
            let _a = attach(&v1, &m1);
            held_tx.send(()).unwrap();
            rx.recv().unwrap();
        })
    });
    held_rx.recv().unwrap();
    let second = in_private_ns(move || {
        std::fs::create_dir_all(&m2).unwrap();
        v2.attach(&m2, OWNERS).map(|_| ())
    });
    match second {
        Err(e) => assert_eq!(e.code(), "storage_busy", "{e}"),
        Ok(()) => panic!("the same ext4 image was mounted twice"),
    }
    tx.send(()).unwrap();
    holder.join().unwrap();
    // Once the first holder is gone (autoclear detaches its device), it attaches again.
    assert!(eventually(10, || loops_under(&dir.path).is_empty()));
    let m3 = dir.path.join("m3");
    in_private_ns(move || {
        attach(&vol, &m3);
    });
}

#[test]
fn an_operators_btrfs_mounted_at_the_pool_is_used_and_given_simple_quotas() {
    if !require_root("operator pools") || !require_btrfs("operator pools") {
        return;
    }
    let dir = TestDir::new("operator");
    std::fs::create_dir_all(dir.data().join("pool")).unwrap();
    let img = dir.path.join("operator.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    let out = std::process::Command::new("mkfs.btrfs")
        .args(["-q", "-f"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lo = burrow_linux::loopdev::attach(&img).unwrap();
    nix::mount::mount(
        Some(&lo.path),
        &dir.data().join("pool"),
        Some("btrfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    drop(lo);
    let s = burrow_storage::BtrfsPool::new(burrow_storage::BtrfsConfig {
        data_dir: dir.data(),
        image_size: None,
        background_purge: false,
    });
    s.prepare().unwrap();
    assert_eq!(s.mode(), Some(PoolMode::Mounted));
    assert!(!dir.data().join("pool.img").exists());
    let vol = s.create("v", 16 * MIB).unwrap();
    let mnt = dir.path.clone();
    let (n, e) = in_private_ns(move || fill(&attach(&vol, &mnt).workspace().join("f"), 64 * MIB));
    assert_eq!(e, Some(libc::EDQUOT), "after {n}");
    match s.grow(1024 * MIB) {
        Err(e) => assert_eq!(e.code(), "storage_unsupported"),
        Ok(()) => panic!("grew an operator's filesystem"),
    }
}

#[test]
fn a_pool_image_grows_online() {
    if !require_root("growing a pool") || !require_btrfs("growing a pool") {
        return;
    }
    let dir = TestDir::new("grow");
    let s = burrow_storage::BtrfsPool::new(burrow_storage::BtrfsConfig {
        data_dir: dir.data(),
        image_size: Some(512 * MIB),
        background_purge: false,
    });
    s.prepare().unwrap();
    let before = s.space().unwrap();
    s.grow(1024 * MIB).unwrap();
    let after = s.space().unwrap();
    assert!(
        after.total_bytes >= before.total_bytes + 450 * MIB,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        std::fs::metadata(dir.data().join("pool.img"))
            .unwrap()
            .len(),
        1024 * MIB
    );
    s.unmount().unwrap();
}
