//! The image store on the real filesystem: layers unpacked safely (hostile tars made here byte by
//! byte), imports of `docker save` tarballs and OCI layouts, layers shared and collected, and
//! every failure leaving the store as it was.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use burrow_image::unpack::LayerLimits;
use burrow_image::{Limits, Store};
use common::*;

fn store(data: &Path) -> Store {
    Store::open(data, Limits::default()).unwrap()
}

/// Imports a `docker save` tarball holding one image `tag` with `layers`.
fn import_layers(
    s: &Store,
    data: &Path,
    tag: &str,
    layers: &[Vec<u8>],
) -> burrow_image::Result<burrow_image::ImageRecord> {
    let f = data.join("in.tar");
    fs::write(&f, docker_save(&[(tag, layers)])).unwrap();
    let r = s.import(&f, None).map(|mut v| v.remove(0));
    fs::remove_file(&f).unwrap();
    r
}

/// The store's files, minus the index's own churn.
fn store_listing(data: &Path) -> std::collections::BTreeMap<std::path::PathBuf, (u32, u64, u32)> {
    listing(&data.join("images"))
}

#[test]
fn a_layer_keeps_its_files_links_modes_and_owners() {
    if !require_root("unpacking with owners") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let mut suid = file("usr/bin/su", b"#!/bin/sh\n");
    suid.mode = 0o4755;
    let mut owned = file("home/u/notes", b"mine");
    owned.uid = 1000;
    owned.gid = 1000;
    let mut capped = file("usr/bin/ping", b"ping");
    capped.pax = vec![
        ("SCHILY.xattr.user.origin".into(), b"layer".to_vec()),
        (
            "SCHILY.xattr.trusted.overlay.redirect".into(),
            b"/etc".to_vec(),
        ),
    ];
    let layer = tar(&[
        dir("etc"),
        file("etc/os-release", b"ID=test\n"),
        symlink("etc/passwd-link", "/etc/passwd"),
        symlink("etc/up", "../../../../../../"),
        hardlink("etc/os-release.hard", "etc/os-release"),
        suid,
        owned,
        capped,
        Member {
            kind: b'6',
            ..file("run/fifo", b"")
        },
    ]);
    let img = import_layers(
        &s,
        data.path(),
        "example.test/files:1",
        std::slice::from_ref(&layer),
    )
    .unwrap();
    assert_eq!(img.refs, ["example.test/files:1"]);
    assert_eq!(img.layers, [sha256(&layer).parse().unwrap()]);
    let root = s.layer_dir(&img.layers[0]);
    assert_eq!(
        fs::read_to_string(root.join("etc/os-release")).unwrap(),
        "ID=test\n"
    );
    assert_eq!(
        fs::read_link(root.join("etc/passwd-link")).unwrap(),
        Path::new("/etc/passwd"),
        "a link is stored as a link, pointing where the layer said"
    );
    assert_eq!(
        fs::read_link(root.join("etc/up")).unwrap(),
        Path::new("../../../../../../")
    );
    let a = fs::metadata(root.join("etc/os-release")).unwrap();
    let b = fs::metadata(root.join("etc/os-release.hard")).unwrap();
    assert_eq!(a.ino(), b.ino(), "a hard link is the same file");
    assert_eq!(
        fs::metadata(root.join("usr/bin/su")).unwrap().mode() & 0o7777,
        0o4755
    );
    let m = fs::metadata(root.join("home/u/notes")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    assert!(fs::symlink_metadata(root.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let xattrs: Vec<String> = xattr_names(&root.join("usr/bin/ping"));
    assert!(xattrs.contains(&"user.origin".to_string()), "{xattrs:?}");
    assert!(
        !xattrs.iter().any(|x| x.starts_with("trusted.")),
        "a layer must not set overlay metadata: {xattrs:?}"
    );
    // The store's layer directories are root's alone.
    let mode = fs::metadata(data.path().join("images/layers"))
        .unwrap()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
}

fn xattr_names(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::listxattr(p, &mut buf).unwrap();
    buf[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[test]
fn links_in_a_layer_never_lead_out_of_it() {
    if !require_root("unpacking with owners") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let target = host.path().to_str().unwrap();
    // A link to a host directory, then files "through" it: they land inside the layer, at the
    // same path under its root, or the layer is refused; never in the host directory.
    let layer = tar(&[
        symlink("escape", target),
        symlink("dots", "../../../../../../../../.."),
        file(&format!("{}/x", target.trim_start_matches('/')), b""),
    ]);
    let img = import_layers(&s, data.path(), "example.test/links:1", &[layer]).unwrap();
    let through = tar(&[symlink("escape", target), file("escape/pwned", b"pwned")]);
    let through_dots = tar(&[
        symlink("dots", "../../../../../../.."),
        file("dots/pwned2", b"x"),
    ]);
    for (i, l) in [through, through_dots].into_iter().enumerate() {
        let r = import_layers(&s, data.path(), &format!("example.test/through:{i}"), &[l]);
        if let Ok(img) = r {
            let root = s.layer_dir(&img.layers[0]);
            let inside = fs::read_dir(&root).unwrap().count();
            assert!(inside > 0);
        }
    }
    assert_eq!(
        fs::read_dir(host.path()).unwrap().count(),
        0,
        "a layer wrote on the host"
    );
    assert!(!Path::new("/pwned2").exists());
    assert!(s
        .layer_dir(&img.layers[0])
        .join(target.trim_start_matches('/'))
        .join("x")
        .exists());
}

#[test]
fn hostile_names_are_refused_and_nothing_is_stored() {
    if !require_root("unpacking with owners") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let good = tar(&[file("ok", b"ok")]);
    import_layers(
        &s,
        data.path(),
        "example.test/good:1",
        std::slice::from_ref(&good),
    )
    .unwrap();
    let before = store_listing(data.path());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dot-dot", tar(&[file("a", b""), file("../evil", b"x")])),
        ("deep dot-dot", tar(&[dir("a"), file("a/../../evil", b"x")])),
        ("absolute", tar(&[file("/etc/evil", b"x")])),
        ("hard link out", tar(&[hardlink("h", "../../etc/passwd")])),
        ("absolute hard link", tar(&[hardlink("h", "/etc/passwd")])),
        ("bare whiteout", tar(&[file("a/.wh.", b"")])),
    ];
    for (what, layer) in cases {
        let err = import_layers(
            &s,
            data.path(),
            "example.test/bad:1",
            &[good.clone(), layer],
        )
        .expect_err(what);
        assert_eq!(err.code(), "unsafe_layer_path", "{what}: {err}");
        assert_eq!(
            store_listing(data.path()),
            before,
            "{what}: the store changed"
        );
    }
    assert!(!data.path().join("evil").exists() && !Path::new("/etc/evil").exists());
    assert_eq!(s.list().len(), 1);
}

#[test]
fn device_nodes_are_never_made() {
    if !require_root("unpacking with owners") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let layer = tar(&[
        dir("dev"),
        chardev("dev/mem"),
        Member {
            kind: b'4',
            ..file("dev/sda", b"")
        },
    ]);
    let img = import_layers(&s, data.path(), "example.test/dev:1", &[layer]).unwrap();
    let root = s.layer_dir(&img.layers[0]);
    assert_eq!(fs::read_dir(root.join("dev")).unwrap().count(), 0);
    assert_eq!(s.layers()[0].skipped_devices, 2);
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_files_through_overlayfs() {
    if !require_root("whiteouts (device nodes) and an overlay mount") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let base = tar(&[
        dir("etc"),
        file("etc/keep", b"base"),
        file("etc/gone", b"base"),
        file("etc/replaced", b"old"),
        dir("cache"),
        file("cache/a", b""),
        file("cache/b", b""),
    ]);
    let top = tar(&[
        dir("etc"),
        file("etc/.wh.gone", b""),
        file("etc/replaced", b"new"),
        dir("cache"),
        file("cache/.wh..wh..opq", b""),
        file("cache/c", b""),
    ]);
    let img = import_layers(&s, data.path(), "example.test/wh:1", &[base, top]).unwrap();
    let top_dir = s.layer_dir(&img.layers[1]);
    let wh = fs::symlink_metadata(top_dir.join("etc/gone")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "an overlay whiteout"
    );
    // Stack them as a sandbox's root does and look.
    let lower = format!(
        "{}:{}",
        top_dir.display(),
        s.layer_dir(&img.layers[0]).display()
    );
    let mnt = tempfile::tempdir().unwrap();
    let script = format!(
        "mount -t overlay -o ro,lowerdir={lower} overlay {m} && ls {m}/etc && echo --- && ls {m}/cache && cat {m}/etc/replaced",
        m = mnt.path().display()
    );
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "keep\nreplaced\n---\nc\nnew"
    );
}

#[test]
fn a_layer_bomb_stops_at_the_limit_and_nothing_is_stored() {
    if !require_root("unpacking with owners") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let limits = Limits {
        layer: LayerLimits {
            max_bytes: 1 << 20,
            max_entries: 50,
        },
        ..Limits::default()
    };
    let s = Store::open(data.path(), limits).unwrap();
    let before = store_listing(data.path());
    // 8 MiB of zeros: a few KiB gzip'd.
    let bomb = gzip(&tar(&[file("zeros", &vec![0u8; 8 << 20])]));
    assert!(bomb.len() < 1 << 20);
    let f = data.path().join("bomb.tar");
    let cfg_layer = tar(&[file("zeros", &vec![0u8; 8 << 20])]);
    fs::write(&f, docker_save_with(&[cfg_layer], &[bomb])).unwrap();
    let err = s.import(&f, None).unwrap_err();
    assert_eq!(err.code(), "limit_exceeded", "{err}");
    assert!(err.to_string().contains("max_layer_bytes"), "{err}");
    fs::remove_file(&f).unwrap();
    assert_eq!(store_listing(data.path()), before);

    let many: Vec<Member> = (0..60).map(|i| file(&format!("f{i}"), b"")).collect();
    let err = import_layers(&s, data.path(), "example.test/many:1", &[tar(&many)]).unwrap_err();
    assert_eq!(err.code(), "limit_exceeded", "{err}");
    assert!(err.to_string().contains("max_layer_entries"), "{err}");
    assert_eq!(store_listing(data.path()), before);
}

/// A `docker save` tarball whose config describes `described` but whose layer files are `files`.
fn docker_save_with(described: &[Vec<u8>], files: &[Vec<u8>]) -> Vec<u8> {
    let cfg = config(described, "amd64", &[], "/");
    let mut members = vec![file("c.json", &cfg)];
    let mut names = vec![];
    for (i, l) in files.iter().enumerate() {
        members.push(file(&format!("l{i}.tar"), l));
        names.push(format!("l{i}.tar"));
    }
    let manifest = serde_json::json!([{ "Config": "c.json", "RepoTags": ["example.test/x:1"], "Layers": names }]);
    members.push(file(
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    ));
    tar(&members)
}

#[test]
fn corrupt_and_mismatched_layers_are_refused() {
    if !require_root("unpacking with owners") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let before = store_listing(data.path());
    let layer = tar(&[file("a", &vec![7u8; 100_000])]);
    let gz = gzip(&layer);
    let cases = [
        (
            "truncated gzip",
            gz[..gz.len() / 2].to_vec(),
            "image_corrupt",
        ),
        (
            "other bytes",
            tar(&[file("a", b"other")]),
            "digest_mismatch",
        ),
        (
            "not a tar",
            b"hello, this is not a tar archive at all".repeat(20),
            "image_corrupt",
        ),
        (
            "cut in a file",
            layer[..512 + 50_000].to_vec(),
            "image_corrupt",
        ),
    ];
    for (what, bytes, code) in cases {
        let f = data.path().join("in.tar");
        fs::write(&f, docker_save_with(std::slice::from_ref(&layer), &[bytes])).unwrap();
        let err = s.import(&f, None).unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err}");
        fs::remove_file(&f).unwrap();
        assert_eq!(store_listing(data.path()), before, "{what}");
    }
}

#[test]
fn shared_layers_are_stored_once_and_collected_with_their_last_image() {
    if !require_root("unpacking with owners") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let base = tar(&[dir("usr"), file("usr/base", b"base")]);
    let a = tar(&[file("a", b"a")]);
    let b = tar(&[file("b", b"b")]);
    let f = data.path().join("two.tar");
    fs::write(
        &f,
        docker_save(&[
            ("example.test/a:1", &[base.clone(), a]),
            ("example.test/b:1", &[base.clone(), b]),
        ]),
    )
    .unwrap();
    let imgs = s.import(&f, None).unwrap();
    assert_eq!(imgs.len(), 2);
    assert_eq!(s.layers().len(), 3, "the base layer is stored once");
    assert_eq!(imgs[0].layers[0], imgs[1].layers[0]);
    let layer_dirs = || {
        fs::read_dir(data.path().join("images/layers/sha256"))
            .unwrap()
            .count()
    };
    assert_eq!(layer_dirs(), 3);
    // Importing again adds nothing.
    s.import(&f, None).unwrap();
    assert_eq!((s.list().len(), layer_dirs()), (2, 3));

    // In use: refused, nothing removed.
    let err = s
        .remove("example.test/a:1", &|_| Some("sandbox sb-1".into()))
        .unwrap_err();
    assert_eq!(err.code(), "image_in_use");
    assert_eq!(s.list().len(), 2);
    let gone = s.remove("example.test/a:1", &|_| None).unwrap();
    assert_eq!(gone.layers_deleted, 1, "only a's own layer goes");
    assert_eq!(layer_dirs(), 2);
    assert!(s.layer_dir(&imgs[1].layers[0]).join("usr/base").exists());
    assert_eq!(
        s.get("example.test/a:1").unwrap_err().code(),
        "image_not_found"
    );
    // By id prefix.
    let gone = s.remove(&imgs[1].id.hex()[..12], &|_| None).unwrap();
    assert_eq!(gone.layers_deleted, 2);
    assert_eq!(layer_dirs(), 0);
    assert!(s.list().is_empty());
    // Reopening finds the same (empty) store.
    drop(s);
    assert!(store(data.path()).list().is_empty());
}

#[test]
fn an_oci_layout_imports_as_a_directory_or_a_tar_and_a_tag_moves() {
    if !require_root("unpacking with owners") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let layout = tempfile::tempdir().unwrap();
    let l1 = tar(&[file("v", b"1")]);
    let l2 = tar(&[file("v", b"2")]);
    oci_layout(
        layout.path(),
        &[("example.test/app:1", std::slice::from_ref(&l1), "amd64")],
    );
    let one = s.import(layout.path(), None).unwrap().remove(0);
    assert_eq!(one.refs, ["example.test/app:1"]);
    assert_eq!(
        one.config.env.as_deref(),
        Some(&["PATH=/usr/bin:/bin".to_string(), "HELLO=image".into()][..])
    );
    assert_eq!(one.config.working_dir.as_deref(), Some("/srv"));
    assert!(one.manifest.is_some());
    // A second version under the same name (as a tar of the layout): the tag moves, the old
    // image stays (a sandbox may use it) without a name.
    let layout2 = tempfile::tempdir().unwrap();
    oci_layout(layout2.path(), &[("example.test/app:1", &[l2], "amd64")]);
    let tarball = data.path().join("layout.tar");
    let st = std::process::Command::new("tar")
        .args([
            "-C",
            layout2.path().to_str().unwrap(),
            "-cf",
            tarball.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let two = s.import(&tarball, None).unwrap().remove(0);
    assert_ne!(one.id, two.id);
    assert_eq!(s.get("example.test/app:1").unwrap().id, two.id);
    assert!(s.get(one.id.as_str()).unwrap().refs.is_empty());
    // Another platform's image is refused.
    let arm = tempfile::tempdir().unwrap();
    oci_layout(arm.path(), &[("example.test/arm:1", &[l1], "arm64")]);
    let err = s.import(arm.path(), None).unwrap_err();
    assert_eq!(err.code(), "platform_not_found", "{err}");
    // A blob that is not what its name says.
    let bad = tempfile::tempdir().unwrap();
    oci_layout(
        bad.path(),
        &[("example.test/bad:1", &[tar(&[file("x", b"x")])], "amd64")],
    );
    let blobs = bad.path().join("blobs/sha256");
    for e in fs::read_dir(&blobs).unwrap() {
        let p = e.unwrap().path();
        let b = fs::read(&p).unwrap();
        if b.starts_with(&[0x1f, 0x8b]) {
            fs::write(&p, gzip(&tar(&[file("x", b"tampered")]))).unwrap();
        }
    }
    let before = store_listing(data.path());
    let err = s.import(bad.path(), None).unwrap_err();
    assert_eq!(err.code(), "digest_mismatch", "{err}");
    assert_eq!(store_listing(data.path()), before);
}

#[test]
fn a_crash_mid_import_is_cleaned_when_the_store_opens() {
    if !require_root("unpacking with owners") {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    import_layers(
        &s,
        data.path(),
        "example.test/keep:1",
        &[tar(&[file("k", b"k")])],
    )
    .unwrap();
    let before = store_listing(data.path());
    drop(s);
    // What a kill -9 can leave: a half-unpacked layer in tmp/, a layer moved into place that no
    // image names yet, a stray blob.
    let images = data.path().join("images");
    fs::create_dir_all(images.join("tmp/layer-1/usr")).unwrap();
    fs::create_dir_all(images.join(format!("layers/sha256/{}", "ab".repeat(32)))).unwrap();
    fs::write(
        images.join(format!("blobs/sha256/{}", "cd".repeat(32))),
        b"{}",
    )
    .unwrap();
    let s = store(data.path());
    assert_eq!(store_listing(data.path()), before);
    assert_eq!(s.list().len(), 1);
}

#[test]
fn a_layer_that_ends_right_after_its_last_data_is_whole() {
    if !require_root("unpacking with owners") {
        return;
    }
    // umoci 0.4 writes layers like this: no padding after the last file, no end blocks.
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let full = tar(&[dir("etc"), file("etc/greeting", b"hello\n")]);
    let cut = full[..512 * 2 + 6].to_vec();
    let img = import_layers(&s, data.path(), "example.test/cut:1", &[cut]).unwrap();
    let root = s.layer_dir(&img.layers[0]);
    assert_eq!(
        fs::read_to_string(root.join("etc/greeting")).unwrap(),
        "hello\n"
    );
}
