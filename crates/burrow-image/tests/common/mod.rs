//! Fixtures for the image tests, made in the test: tar layers written byte by byte (so the
//! hostile ones can say anything a tar can), OCI layouts and `docker save` tarballs around them,
//! and a listing of the store to show it unchanged after a failure.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

pub fn require_root(what: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "skipping: {what} needs root (layer files keep their owners, whiteouts are device \
         nodes, opaque directories are trusted.* xattrs); CI runs it as root"
    );
    false
}

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// One tar member, as hostile as a test wants.
#[derive(Clone)]
pub struct Member {
    pub name: Vec<u8>,
    pub kind: u8,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub data: Vec<u8>,
    pub link: Vec<u8>,
    /// PAX records (`SCHILY.xattr.user.x` → value) written in an `x` header before it.
    pub pax: Vec<(String, Vec<u8>)>,
}

pub fn file(name: &str, data: &[u8]) -> Member {
    Member {
        name: name.as_bytes().to_vec(),
        kind: b'0',
        mode: 0o644,
        uid: 0,
        gid: 0,
        data: data.to_vec(),
        link: vec![],
        pax: vec![],
    }
}

pub fn dir(name: &str) -> Member {
    Member {
        kind: b'5',
        mode: 0o755,
        ..file(name, b"")
    }
}

pub fn symlink(name: &str, target: &str) -> Member {
    Member {
        kind: b'2',
        mode: 0o777,
        link: target.as_bytes().to_vec(),
        ..file(name, b"")
    }
}

pub fn hardlink(name: &str, target: &str) -> Member {
    Member {
        kind: b'1',
        link: target.as_bytes().to_vec(),
        ..file(name, b"")
    }
}

pub fn chardev(name: &str) -> Member {
    Member {
        kind: b'3',
        ..file(name, b"")
    }
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}\0", v, width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

fn header(
    name: &[u8],
    kind: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    link: &[u8],
) -> [u8; 512] {
    let mut h = [0u8; 512];
    assert!(
        name.len() <= 100 && link.len() <= 100,
        "keep fixture names short"
    );
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], mode as u64);
    octal(&mut h[108..116], uid as u64);
    octal(&mut h[116..124], gid as u64);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(512) {
        out.push(0);
    }
}

/// A tar of `members`, ended by two zero blocks.
pub fn tar(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        if !m.pax.is_empty() {
            let mut body = Vec::new();
            for (k, v) in &m.pax {
                // "<len> <key>=<value>\n", where len counts itself.
                let rest = k.len() + v.len() + 3;
                let mut len = rest + 1;
                while format!("{len}").len() + rest != len {
                    len += 1;
                }
                body.extend_from_slice(format!("{len} {k}=").as_bytes());
                body.extend_from_slice(v);
                body.push(b'\n');
            }
            out.extend_from_slice(&header(b"pax", b'x', 0o644, 0, 0, body.len() as u64, b""));
            out.extend_from_slice(&body);
            pad(&mut out);
        }
        out.extend_from_slice(&header(
            &m.name,
            m.kind,
            m.mode,
            m.uid,
            m.gid,
            m.data.len() as u64,
            &m.link,
        ));
        out.extend_from_slice(&m.data);
        pad(&mut out);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// An image config for `layers` (uncompressed tars), with the given env and working directory.
pub fn config(layers: &[Vec<u8>], arch: &str, env: &[&str], workdir: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": "2026-12-01T00:00:00Z",
        "config": { "Env": env, "WorkingDir": workdir, "User": "0:0", "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap()
}

/// Writes an OCI image layout at `dir` holding one image per `(ref name, layers, arch)`:
/// gzip'd layers, a config and a manifest each. Returns the manifests' digests.
pub fn oci_layout(dir: &Path, images: &[(&str, &[Vec<u8>], &str)]) -> Vec<String> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha256(b);
        fs::write(blobs.join(&d[7..]), b).unwrap();
        d
    };
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut manifests = vec![];
    let mut digests = vec![];
    for (name, layers, arch) in images {
        let cfg = config(layers, arch, &["PATH=/usr/bin:/bin", "HELLO=image"], "/srv");
        let cfg_d = put(&cfg);
        let layer_descs: Vec<_> = layers
            .iter()
            .map(|l| {
                let gz = gzip(l);
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": put(&gz), "size": gz.len(),
                })
            })
            .collect();
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": cfg_d, "size": cfg.len() },
            "layers": layer_descs,
        }))
        .unwrap();
        let md = put(&m);
        digests.push(md.clone());
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": m.len(),
            "annotations": { "org.opencontainers.image.ref.name": name },
        }));
    }
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "manifests": manifests }))
            .unwrap(),
    )
    .unwrap();
    digests
}

/// A `docker save` tarball (the classic layout: `<n>/layer.tar`, `<config>.json`,
/// `manifest.json`) holding one image per `(tag, layers)`.
pub fn docker_save(images: &[(&str, &[Vec<u8>])]) -> Vec<u8> {
    let mut members = vec![];
    let mut manifest = vec![];
    for (i, (tag, layers)) in images.iter().enumerate() {
        let cfg = config(layers, "amd64", &["FROM=docker"], "/");
        let cfg_name = format!("{}.json", &sha256(&cfg)[7..19]);
        members.push(file(&cfg_name, &cfg));
        let mut names = vec![];
        for (j, l) in layers.iter().enumerate() {
            let n = format!("i{i}l{j}/layer.tar");
            members.push(dir(&format!("i{i}l{j}")));
            members.push(file(&n, l));
            names.push(n);
        }
        manifest
            .push(serde_json::json!({ "Config": cfg_name, "RepoTags": [tag], "Layers": names }));
    }
    members.push(file(
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    ));
    tar(&members)
}

/// Every path under `dir` with its type, size and owner: equal before and after means unchanged.
pub fn listing(dir: &Path) -> BTreeMap<PathBuf, (u32, u64, u32)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, (u32, u64, u32)>) {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            let size = if m.is_dir() { 0 } else { m.size() };
            out.insert(
                e.path().strip_prefix(root).unwrap().to_owned(),
                (m.mode(), size, m.uid()),
            );
            if m.is_dir() {
                walk(root, &e.path(), out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}
