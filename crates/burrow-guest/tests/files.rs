//! Files through the guest: transfers, metadata, listings, and the paths that must not hang.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use burrow_node::guest::GuestError;
use burrow_types::{codes, FileKind};
use common::*;

fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Fails the test if the guest takes more than 10 s: these paths must never hang.
async fn quick<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("guest hung")
}

async fn read_all(g: &Guest, path: &str) -> Result<(u64, Vec<u8>), GuestError> {
    let mut d = g.client.read_file(path).await?;
    let mut all = Vec::new();
    while let Some(c) = d.next_chunk().await? {
        assert!(c.len() <= 1 << 20);
        all.extend(c);
    }
    Ok((d.size, all))
}

async fn upload(
    g: &Guest,
    path: &str,
    data: &[u8],
    mode: Option<u32>,
) -> Result<burrow_types::FileStat, GuestError> {
    let mut u = g.client.write_file(path, mode, None).await?;
    // Odd-sized pieces, larger and smaller than a frame.
    for piece in data.chunks(3 * (1 << 20) + 7) {
        if let Err(e) = u.write(piece).await {
            return Err(u.finish().await.err().unwrap_or(e));
        }
    }
    u.finish().await
}

#[tokio::test]
async fn write_then_read_100_mib_byte_for_byte_with_parents_created() {
    let g = Guest::start();
    let data = pattern(100 << 20);
    let path = g.path("a/b/c/big.bin");
    let st = upload(&g, &path, &data, None).await.unwrap();
    assert_eq!(st.size, data.len() as u64);
    assert_eq!(st.kind, FileKind::File);
    assert_eq!(st.name, "big.bin");
    assert!(g.root().join("a/b/c").is_dir());
    let on_disk = std::fs::read(g.root().join("a/b/c/big.bin")).unwrap();
    assert!(on_disk == data, "file on disk differs");
    let (size, back) = read_all(&g, &path).await.unwrap();
    assert_eq!(size, data.len() as u64);
    assert!(back == data, "download differs");

    // Overwriting truncates; mode is applied.
    let st = upload(&g, &path, b"short", Some(0o600)).await.unwrap();
    assert_eq!((st.size, st.mode), (5, 0o600));
    assert_eq!(read_all(&g, &path).await.unwrap().1, b"short");
    // An empty upload makes an empty file.
    let st = upload(&g, &g.path("empty"), b"", None).await.unwrap();
    assert_eq!(st.size, 0);
    assert_eq!(read_all(&g, &g.path("empty")).await.unwrap(), (0, vec![]));
}

#[tokio::test]
async fn files_with_unknown_size_are_read_to_the_end() {
    let g = Guest::start();
    // /proc reports size 0; the guest reads to EOF anyway.
    let (size, data) = read_all(&g, "/proc/self/status").await.unwrap();
    assert_eq!(size, 0);
    assert!(String::from_utf8_lossy(&data).contains("Name:"));
}

#[tokio::test]
async fn stat_reports_kind_mode_and_symlink_targets() {
    let g = Guest::start();
    std::fs::write(g.root().join("f"), b"12345").unwrap();
    std::os::unix::fs::symlink("f", g.root().join("l")).unwrap();
    std::fs::create_dir(g.root().join("d")).unwrap();
    let st = g.client.stat(g.path("f")).await.unwrap();
    assert_eq!(
        (st.kind, st.size, st.name.as_str()),
        (FileKind::File, 5, "f")
    );
    let st = g.client.stat(g.path("l")).await.unwrap();
    assert_eq!(st.kind, FileKind::Symlink);
    assert_eq!(st.symlink_target.as_deref(), Some("f"));
    let st = g.client.stat(g.path("d")).await.unwrap();
    assert_eq!(st.kind, FileKind::Dir);
    // Relative paths resolve against /; `..` cannot climb above it.
    let st = g
        .client
        .stat(format!("../../..{}", g.path("f")))
        .await
        .unwrap();
    assert_eq!(st.path, g.path("f"));
    let e = g.client.stat(g.path("missing")).await.unwrap_err();
    assert_eq!(code(&e), codes::FILE_NOT_FOUND);
    let e = g.client.stat(g.path("f/x")).await.unwrap_err();
    assert_eq!(code(&e), codes::NOT_A_DIRECTORY);
}

#[tokio::test]
async fn listing_2500_entries_in_pages_returns_each_name_once() {
    let g = Guest::start();
    let dir = g.root().join("many");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..2500 {
        std::fs::write(dir.join(format!("entry-{i:05}")), b"").unwrap();
    }
    let path = g.path("many");
    let mut seen = HashSet::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let (entries, next) = g.client.list_dir(&path, cursor, 37).await.unwrap();
        assert!(entries.len() <= 37);
        pages += 1;
        for e in entries {
            assert_eq!(e.kind, FileKind::File);
            assert_eq!(e.path, format!("{path}/{}", e.name));
            assert!(seen.insert(e.name.clone()), "{} returned twice", e.name);
        }
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 1000, "pagination does not end");
    }
    assert_eq!(seen.len(), 2500);
    assert_eq!(pages, 2500usize.div_ceil(37));

    // The page size is clamped.
    let (entries, next) = g.client.list_dir(&path, None, 100_000).await.unwrap();
    assert_eq!(entries.len(), 1000);
    assert!(next.is_some());

    let e = g
        .client
        .list_dir(format!("{path}/entry-00001"), None, 10)
        .await
        .unwrap_err();
    assert_eq!(code(&e), codes::NOT_A_DIRECTORY);
}

#[tokio::test]
async fn make_dir_rename_and_remove() {
    let g = Guest::start();
    let st = g.client.make_dir(g.path("x/y/z"), None).await.unwrap();
    assert_eq!(st.kind, FileKind::Dir);
    assert!(g.root().join("x/y/z").is_dir());
    let e = g.client.make_dir(g.path("x/y/z"), None).await.unwrap_err();
    assert_eq!(code(&e), codes::ALREADY_EXISTS);
    std::fs::write(g.root().join("x/y/z/file"), b"1").unwrap();

    let st = g.client.rename(g.path("x/y"), g.path("x/w")).await.unwrap();
    assert_eq!((st.kind, st.name.as_str()), (FileKind::Dir, "w"));
    assert!(g.root().join("x/w/z/file").exists());
    let e = g
        .client
        .rename(g.path("nope"), g.path("x/q"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), codes::FILE_NOT_FOUND);

    let e = g.client.remove(g.path("x"), false).await.unwrap_err();
    assert_eq!(code(&e), codes::DIRECTORY_NOT_EMPTY);
    g.client.remove(g.path("x/w/z/file"), false).await.unwrap();
    assert!(!g.root().join("x/w/z/file").exists());
    g.client.remove(g.path("x"), true).await.unwrap();
    assert!(!g.root().join("x").exists());
    let e = g.client.remove(g.path("x"), true).await.unwrap_err();
    assert_eq!(code(&e), codes::FILE_NOT_FOUND);

    // The root is refused (non-recursive only: this test runs on the host).
    for root in ["/", "/..", "/tmp/.."] {
        let e = g.client.remove(root, false).await.unwrap_err();
        assert_eq!(code(&e), codes::PERMISSION_DENIED, "{root}: {e}");
    }
}

#[tokio::test]
async fn fifos_sockets_and_devices_are_refused_without_hanging() {
    let g = Guest::start();
    let fifo = g.root().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let _sock = std::os::unix::net::UnixListener::bind(g.root().join("sock")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", g.root().join("zero")).unwrap();

    for name in ["fifo", "sock", "zero"] {
        let e = quick(g.client.read_file(g.path(name)))
            .await
            .err()
            .expect(name);
        assert_eq!(code(&e), codes::NOT_REGULAR_FILE, "{name}: {e}");
    }
    let e = quick(g.client.read_file(g.root().to_string_lossy()))
        .await
        .err()
        .unwrap();
    assert_eq!(code(&e), codes::IS_A_DIRECTORY);

    // Writing "over" a FIFO, with and without a reader, fails fast.
    let e = quick(upload(&g, &g.path("fifo"), b"data", None))
        .await
        .unwrap_err();
    assert_eq!(code(&e), codes::NOT_REGULAR_FILE, "{e}");
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let e = quick(upload(&g, &g.path("fifo"), &vec![1u8; 4 << 20], None))
        .await
        .unwrap_err();
    assert_eq!(code(&e), codes::NOT_REGULAR_FILE, "{e}");
    drop(reader);
    let e = quick(upload(&g, &g.path("sock"), b"data", None))
        .await
        .unwrap_err();
    assert_eq!(code(&e), codes::NOT_REGULAR_FILE, "{e}");
    let e = quick(upload(&g, &g.root().to_string_lossy(), b"data", None))
        .await
        .unwrap_err();
    assert_eq!(code(&e), codes::IS_A_DIRECTORY, "{e}");
    // A parent that is a file.
    std::fs::write(g.root().join("plain"), b"").unwrap();
    let e = quick(upload(&g, &g.path("plain/child"), b"data", None))
        .await
        .unwrap_err();
    assert_eq!(code(&e), codes::NOT_A_DIRECTORY, "{e}");
    let e = quick(g.client.read_file(g.path("missing")))
        .await
        .err()
        .unwrap();
    assert_eq!(code(&e), codes::FILE_NOT_FOUND);
}

use std::os::unix::fs::OpenOptionsExt;

#[tokio::test]
async fn nul_bytes_and_overlong_paths_are_invalid() {
    let g = Guest::start();
    let long = format!("/{}", "a/".repeat(2500));
    let long_component = format!("/{}", "b".repeat(300));
    for bad in ["/tmp/a\0b".to_string(), long, long_component] {
        let e = g.client.stat(bad.clone()).await.unwrap_err();
        assert_eq!(code(&e), codes::INVALID_PATH);
        let e = g.client.read_file(bad.clone()).await.err().unwrap();
        assert_eq!(code(&e), codes::INVALID_PATH);
        let e = upload(&g, &bad, b"x", None).await.unwrap_err();
        assert_eq!(code(&e), codes::INVALID_PATH, "{e:?}");
        let e = g.client.list_dir(bad.clone(), None, 10).await.unwrap_err();
        assert_eq!(code(&e), codes::INVALID_PATH);
        let e = g.client.make_dir(bad.clone(), None).await.unwrap_err();
        assert_eq!(code(&e), codes::INVALID_PATH);
        let e = g.client.remove(bad.clone(), true).await.unwrap_err();
        assert_eq!(code(&e), codes::INVALID_PATH);
    }
}

#[tokio::test]
async fn new_files_and_parents_belong_to_the_request_user() {
    if !is_root() {
        println!("skipped: chown to another user needs the guest to run as root");
        return;
    }
    let g = Guest::start();
    use std::os::unix::fs::MetadataExt;
    let mut u = g
        .client
        .write_file(g.path("owned/dir/f"), None, Some("1000".into()))
        .await
        .unwrap();
    u.write(b"x").await.unwrap();
    let st = u.finish().await.unwrap();
    assert_eq!(st.uid, 1000);
    assert_eq!(
        std::fs::metadata(g.root().join("owned/dir")).unwrap().uid(),
        1000
    );
    let st = g
        .client
        .make_dir(g.path("owned2/sub"), Some("1000".into()))
        .await
        .unwrap();
    assert_eq!(st.uid, 1000);
    assert_eq!(
        std::fs::metadata(g.root().join("owned2")).unwrap().uid(),
        1000
    );
}
