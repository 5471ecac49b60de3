//! Pulls from a real distribution registry (Debian's `docker-registry`), run by each test in a
//! network namespace of its own and spoken to from inside it: no packet leaves the namespace.
//! Images are built by the test (an OCI layout, or `umoci` over a directory) and pushed with
//! `skopeo`.

mod common;

use std::fs;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use burrow_image::{
    Credentials, Limits, Progress, Reference, RegistryClient, RegistryConfig, Store,
};
use common::*;

const ADDR: &str = "127.0.0.1:5000";

/// A registry in its own network namespace; removed (process and namespace) on drop.
struct Registry {
    ns: String,
    dir: tempfile::TempDir,
    child: Child,
}

fn tools_present(what: &str) -> bool {
    if !require_root(what) {
        return false;
    }
    for tool in [
        "/usr/bin/docker-registry",
        "/usr/bin/skopeo",
        "/usr/sbin/ip",
        "/usr/bin/nsenter",
    ] {
        if !Path::new(tool).exists() {
            eprintln!("skipping: {what} needs {tool} (scripts/deps installs it)");
            return false;
        }
    }
    true
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Registry {
    fn start(name: &str, basic: Option<(&str, &str)>) -> Registry {
        let ns = format!("burrow-img-{}-{name}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(Command::new("ip").args(["netns", "add", &ns]));
        run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        let dir = tempfile::tempdir().unwrap();
        let mut config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {ADDR}\n",
            dir.path().join("data").display()
        );
        if let Some((user, pass)) = basic {
            // The registry's htpasswd wants bcrypt; Python's crypt module makes it.
            let hash = run(Command::new("python3").args([
                "-c",
                "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))",
                pass,
            ]));
            fs::write(
                dir.path().join("htpasswd"),
                format!("{user}:{}", hash.trim()),
            )
            .unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["docker-registry", "serve"])
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let r = Registry { ns, dir, child };
        let up = r.in_netns(|| {
            (0..200).any(|_| {
                let ok = TcpStream::connect(ADDR).is_ok();
                if !ok {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                ok
            })
        });
        assert!(up, "the registry did not start: {}", r.log());
        r
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Runs `f` on a thread that has entered the registry's network namespace (sockets it and
    /// the threads it starts make are in there).
    fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let ns = fs::File::open(path).unwrap();
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// `skopeo copy` of the image `name` in the OCI layout `layout` to `repo` here.
    fn push(&self, layout: &Path, name: &str, repo: &str, all: bool, creds: Option<&str>) {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns)).args([
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if all {
            cmd.arg("--all");
        }
        if let Some(c) = creds {
            cmd.arg(format!("--dest-creds={c}"));
        }
        cmd.arg(format!("oci:{}:{name}", layout.display()))
            .arg(format!("docker://{ADDR}/{repo}"));
        run(&mut cmd);
    }

    /// Pulls `reference` into `store` from inside the namespace; returns the result and every
    /// progress report.
    fn pull(
        &self,
        store: &Store,
        reference: &str,
        creds: Option<(&str, &str)>,
    ) -> (
        burrow_image::Result<burrow_image::ImageRecord>,
        Vec<Progress>,
    ) {
        let store = store.clone();
        let reference = reference.to_owned();
        let mut config = RegistryConfig::default();
        if let Some((u, p)) = creds {
            config.credentials.insert(
                ADDR.into(),
                Credentials {
                    username: u.into(),
                    password: p.into(),
                },
            );
        }
        self.in_netns(move || {
            let seen = Arc::new(Mutex::new(vec![]));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let seen2 = seen.clone();
            let r = rt.block_on(async move {
                let client = RegistryClient::new(config)?;
                let r: Reference = reference.parse()?;
                store
                    .pull(&client, &r, &move |p| seen2.lock().unwrap().push(p.clone()))
                    .await
            });
            let seen = seen.lock().unwrap().clone();
            (r, seen)
        })
    }

    /// The file holding blob `digest` in the registry's own storage.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn store(data: &Path) -> Store {
    Store::open(data, Limits::default()).unwrap()
}

fn base_layer() -> Vec<u8> {
    tar(&[
        dir("etc"),
        file("etc/os-release", b"ID=burrow-test\n"),
        file("etc/motd", b"old motd\n"),
        dir("usr"),
        dir("usr/bin"),
        file("usr/bin/tool", b"#!/bin/sh\necho base\n"),
        symlink("bin", "usr/bin"),
    ])
}

#[test]
fn an_image_pushed_to_a_registry_is_pulled_verified_and_its_layers_shared() {
    if !tools_present("a local registry") {
        return;
    }
    let reg = Registry::start("pull", None);
    let layout = tempfile::tempdir().unwrap();
    let base = base_layer();
    let top = tar(&[
        dir("etc"),
        file("etc/.wh.motd", b""),
        file("etc/app.conf", b"v=1\n"),
    ]);
    let other = tar(&[file("other", b"other")]);
    let digests = oci_layout(
        layout.path(),
        &[
            ("app", &[base.clone(), top.clone()], "amd64"),
            ("other", &[base.clone(), other], "amd64"),
        ],
    );
    reg.push(layout.path(), "app", "test/app:1", false, None);
    reg.push(layout.path(), "other", "test/other:1", false, None);

    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let (img, progress) = reg.pull(&s, &format!("{ADDR}/test/app:1"), None);
    let img = img.unwrap();
    assert_eq!(img.refs, [format!("{ADDR}/test/app:1")]);
    assert_eq!(
        img.manifest.as_ref().map(|d| d.to_string()),
        Some(digests[0].clone())
    );
    assert_eq!(img.config.env.as_ref().unwrap()[1], "HELLO=image");
    let last = progress.last().unwrap();
    assert_eq!((last.layers_done, last.layers_total), (2, 2));
    assert_eq!(last.bytes_done, last.bytes_total);
    assert_eq!(
        last.bytes_total,
        (gzip(&base).len() + gzip(&top).len()) as u64
    );
    assert!(progress
        .windows(2)
        .all(|w| w[0].bytes_done <= w[1].bytes_done));
    let top_dir = s.layer_dir(&img.layers[1]);
    assert_eq!(
        fs::read_to_string(top_dir.join("etc/app.conf")).unwrap(),
        "v=1\n"
    );
    assert_eq!(
        fs::read_link(s.layer_dir(&img.layers[0]).join("bin")).unwrap(),
        Path::new("usr/bin")
    );

    // A second image with the same base: one more layer, not two.
    let (other, _) = reg.pull(&s, &format!("{ADDR}/test/other:1"), None);
    assert_eq!(other.unwrap().layers[0], img.layers[0]);
    assert_eq!(s.layers().len(), 3);
    // Pulled again, by digest: nothing is downloaded.
    let (again, progress) = reg.pull(&s, &format!("{ADDR}/test/app@{}", digests[0]), None);
    assert_eq!(again.unwrap().id, img.id);
    assert_eq!(progress[0].bytes_done, 0);
    assert_eq!(s.layers().len(), 3);
    assert_eq!(s.list().len(), 2);
}

#[test]
fn an_image_built_by_umoci_pulls_with_the_same_files() {
    if !tools_present("a local registry") {
        return;
    }
    if !Path::new("/usr/bin/umoci").exists() {
        eprintln!("skipping: needs umoci (scripts/deps installs it)");
        return;
    }
    let reg = Registry::start("umoci", None);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("usr/share/doc")).unwrap();
    fs::write(src.join("usr/share/doc/readme"), "from umoci\n").unwrap();
    fs::hard_link(
        src.join("usr/share/doc/readme"),
        src.join("usr/share/doc/hard"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/usr/share/doc/readme", src.join("link")).unwrap();
    let layout = work.path().join("layout");
    let l = layout.to_str().unwrap();
    run(Command::new("umoci").args(["init", "--layout", l]));
    run(Command::new("umoci").args(["new", "--image", &format!("{l}:t")]));
    run(Command::new("umoci")
        .args(["insert", "--image", &format!("{l}:t")])
        .arg(&src)
        .arg("/"));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &format!("{l}:t"),
        "--config.env=HELLO=umoci",
        "--config.workingdir=/srv",
    ]));
    reg.push(&layout, "t", "test/umoci:t", false, None);
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let img = reg
        .pull(&s, &format!("{ADDR}/test/umoci:t"), None)
        .0
        .unwrap();
    assert!(img.config.env.unwrap().contains(&"HELLO=umoci".to_string()));
    assert_eq!(img.config.working_dir.as_deref(), Some("/srv"));
    let top = s.layer_dir(img.layers.last().unwrap());
    assert_eq!(
        fs::read_to_string(top.join("usr/share/doc/readme")).unwrap(),
        "from umoci\n"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(top.join("usr/share/doc/readme"))
            .unwrap()
            .ino(),
        fs::metadata(top.join("usr/share/doc/hard")).unwrap().ino()
    );
    assert_eq!(
        fs::read_link(top.join("link")).unwrap(),
        Path::new("/usr/share/doc/readme")
    );
}

#[test]
fn a_manifest_list_resolves_to_this_platform_and_a_foreign_one_is_refused() {
    if !tools_present("a local registry") {
        return;
    }
    let reg = Registry::start("platform", None);
    let layout = tempfile::tempdir().unwrap();
    let amd = tar(&[file("arch", b"amd64")]);
    let arm = tar(&[file("arch", b"arm64")]);
    let digests = oci_layout(
        layout.path(),
        &[
            ("amd", &[amd], "amd64"),
            ("arm", std::slice::from_ref(&arm), "arm64"),
        ],
    );
    // An index of both, named "multi" in the layout, pushed as a manifest list.
    add_index(
        layout.path(),
        "multi",
        &[(&digests[0], "amd64"), (&digests[1], "arm64")],
    );
    reg.push(layout.path(), "multi", "test/multi:1", true, None);
    reg.push(layout.path(), "arm", "test/arm:1", false, None);
    add_index(layout.path(), "armonly", &[(&digests[1], "arm64")]);
    reg.push(layout.path(), "armonly", "test/armlist:1", true, None);

    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let img = reg
        .pull(&s, &format!("{ADDR}/test/multi:1"), None)
        .0
        .unwrap();
    assert_eq!(img.platform.architecture, "amd64");
    assert_eq!(img.manifest.as_ref().unwrap().to_string(), digests[0]);
    assert_eq!(
        fs::read_to_string(s.layer_dir(&img.layers[0]).join("arch")).unwrap(),
        "amd64"
    );
    let before = listing(&data.path().join("images"));
    for r in ["test/arm:1", "test/armlist:1"] {
        let err = reg.pull(&s, &format!("{ADDR}/{r}"), None).0.unwrap_err();
        assert_eq!(err.code(), "platform_not_found", "{r}: {err}");
        assert!(err.to_string().contains("linux/arm64"), "{err}");
    }
    assert_eq!(listing(&data.path().join("images")), before);
}

/// Adds to the layout's index.json an image index `name` over `manifests` (digest, arch).
fn add_index(layout: &Path, name: &str, manifests: &[(&str, &str)]) {
    let mut descs = vec![];
    for (d, arch) in manifests {
        let size = fs::metadata(layout.join("blobs/sha256").join(&d[7..]))
            .unwrap()
            .len();
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d, "size": size,
            "platform": { "os": "linux", "architecture": arch },
        }));
    }
    let idx = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descs,
    }))
    .unwrap();
    let d = sha256(&idx);
    fs::write(layout.join("blobs/sha256").join(&d[7..]), &idx).unwrap();
    let mut top: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    top["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": d, "size": idx.len(),
            "annotations": { "org.opencontainers.image.ref.name": name },
        }));
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

#[test]
fn bad_pulls_are_structured_errors_and_leave_the_store_unchanged() {
    if !tools_present("a local registry") {
        return;
    }
    let reg = Registry::start("bad", None);
    let layout = tempfile::tempdir().unwrap();
    let good = tar(&[file("good", b"good")]);
    let victim = tar(&[file("victim", &vec![b'v'; 50_000])]);
    oci_layout(
        layout.path(),
        &[
            ("ok", std::slice::from_ref(&good), "amd64"),
            ("victim", &[good.clone(), victim.clone()], "amd64"),
        ],
    );
    reg.push(layout.path(), "ok", "test/ok:1", false, None);
    reg.push(layout.path(), "victim", "test/victim:1", false, None);
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    reg.pull(&s, &format!("{ADDR}/test/ok:1"), None).0.unwrap();
    let before = listing(&data.path().join("images"));

    let cases = [
        (format!("{ADDR}/test/nothere:1"), "image_not_found"),
        (format!("{ADDR}/test/ok:nosuchtag"), "image_not_found"),
        (
            "127.0.0.1:5999/test/ok:1".to_string(),
            "registry_unreachable",
        ),
        (format!("{ADDR}/Test/Upper"), "bad_reference"),
    ];
    for (r, code) in &cases {
        let err = reg.pull(&s, r, None).0.unwrap_err();
        assert_eq!(err.code(), *code, "{r}: {err}");
    }
    // The registry serves other bytes for the second layer (same length): the pull fails on
    // its digest, and the first layer (shared with `ok`) stays as it was.
    let blob = reg.blob_file(&sha256(&gzip(&victim)));
    let mut bytes = fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let err = reg
        .pull(&s, &format!("{ADDR}/test/victim:1"), None)
        .0
        .unwrap_err();
    assert_eq!(err.code(), "digest_mismatch", "{err}");
    // Cut short: fewer bytes than the manifest says.
    fs::write(&blob, &bytes[..n / 2]).unwrap();
    let err = reg
        .pull(&s, &format!("{ADDR}/test/victim:1"), None)
        .0
        .unwrap_err();
    assert!(
        ["image_corrupt", "registry_error"].contains(&err.code()),
        "{err}"
    );
    assert_eq!(listing(&data.path().join("images")), before);
    assert_eq!(s.list().len(), 1);
}

#[test]
fn basic_auth_is_answered_with_the_credentials_given() {
    if !tools_present("a local registry") {
        return;
    }
    let reg = Registry::start("auth", Some(("agent", "s3cret")));
    let layout = tempfile::tempdir().unwrap();
    oci_layout(layout.path(), &[("x", &[tar(&[file("x", b"x")])], "amd64")]);
    reg.push(
        layout.path(),
        "x",
        "test/private:1",
        false,
        Some("agent:s3cret"),
    );
    let data = tempfile::tempdir().unwrap();
    let s = store(data.path());
    let r = format!("{ADDR}/test/private:1");
    let err = reg.pull(&s, &r, None).0.unwrap_err();
    assert_eq!(err.code(), "registry_auth_required", "{err}");
    let err = reg.pull(&s, &r, Some(("agent", "wrong"))).0.unwrap_err();
    assert_eq!(err.code(), "registry_auth_failed", "{err}");
    assert!(s.list().is_empty());
    let img = reg.pull(&s, &r, Some(("agent", "s3cret"))).0.unwrap();
    assert_eq!(img.refs, [r]);
}
